"""benchmarks/bench_quality.py's classic rows on a tiny labelled set, with the real libraries:
scikit-learn always, fastText where benchmarks/requirements.txt is installed."""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_quality  # noqa: E402


def labelled_files(tmp_path) -> dict[str, str]:
    """Lines of filler words in which 'good' marks __label__pos and 'bad' __label__neg."""
    rng = np.random.default_rng(0)
    files = {}
    for split, rows in (("train", 200), ("valid", 60), ("test", 60)):
        lines = []
        for row in range(rows):
            label = "pos" if row % 2 else "neg"
            words = [f"w{i}" for i in rng.integers(0, 40, size=8)]
            words.insert(int(rng.integers(0, 8)), "good" if label == "pos" else "bad")
            lines.append(" ".join(words) + f" __label__{label}")
        files[split] = str(tmp_path / f"{split}.txt")
        open(files[split], "w", encoding="utf-8").write("\n".join(lines) + "\n")
    return files


def test_tfidf_row_picks_c_on_valid_and_scores_test(tmp_path):
    row = bench_quality.run_tfidf(labelled_files(tmp_path), (1.0, 10.0))
    assert row["chosen"] in ("C=1.0", "C=10.0")
    assert row["test_f1"] > 0.95 and row["valid_f1_best"] > 0.95


def test_fasttext_row_picks_its_grid_on_valid_and_scores_test(tmp_path):
    pytest.importorskip("fasttext")
    row = bench_quality.run_fasttext(labelled_files(tmp_path), [(0.5, 25)], multi_label=False)
    assert row["chosen"] == "lr=0.5 epoch=25"
    assert row["test_f1"] > 0.9


def test_a_finished_run_is_recognised_from_another_clone():
    def command(data: str, work: str, seed: int = 42) -> list[str]:
        return ["train_bert_fine_tuning.py", f"--training_data_file={data}/data/entities/train.txt",
                f"--seed={seed}", f"--pretrained_dir={work}/benchmarks/work/lm_textcnn",
                f"--ckpt_dir_save={work}/benchmarks/work/entities/small/textcnn_pretrained_seed42"]

    here = bench_quality.ROOT
    same = bench_quality.same_command
    assert same(command("/tmp/clone", "/tmp/clone"), command(here, here))
    assert same(command("/tmp/clone", here), command(here, here))  # its pretraining elsewhere
    assert not same(command("/tmp/clone", "/tmp/clone", 43), command(here, here))
    assert not same(command(here, here) + ["--bag_of_words=False"], command(here, here))
    assert not same(command(here, here)[:-1] + ["--ckpt_dir_save=/tmp/x/other_seed42"],
                    command(here, here))


@pytest.mark.slow
def test_a_pretraining_is_named_by_its_epochs_and_read_back_only_with_its_flags(
        tmp_path, monkeypatch, small_corpus):
    monkeypatch.setattr(bench_quality, "WORK", str(tmp_path))
    flags = ["--preset=tiny", "--num_layer=1", "--vocab_size=300", "--learning_rate=1e-3"]
    settings = {"pretrain": {"textcnn": [*flags, "--num_epochs=1"]}}
    made = bench_quality.pretrain("textcnn", settings, small_corpus, "", resume=True)
    assert made["run_dir"] == str(tmp_path / "lm_textcnn_1ep") and made["epochs"] == "1"
    assert os.path.exists(tmp_path / "lm_textcnn_1ep" / "backbone.weights.h5")
    # read back, not trained again, whatever the order of the flags (the budget study writes
    # --num_epochs last)
    settings["pretrain"]["textcnn"].reverse()
    assert bench_quality.pretrain("textcnn", settings, small_corpus, "", resume=True) == made
    settings["pretrain"]["textcnn"] = [*flags, "--num_epochs=3"]
    assert bench_quality.pretrain("textcnn", settings, small_corpus, "", resume=True,
                                  epochs=1) == made  # the budget study's way of asking
    settings["pretrain"]["textcnn"][0] = "--preset=small"
    with pytest.raises(SystemExit, match="was pretrained with --preset=tiny"):
        bench_quality.pretrain("textcnn", settings, small_corpus, "", resume=True, epochs=1)
