"""The user's journey end to end, as subprocesses in test mode on the real sample data (built once
for the session in a temporary directory, conftest.sample_data): pretrain -> fine-tune from that
directory -> predict; from scratch; resume after a kill. The slow tier."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import classifier_task
import data_util_hdf5 as data_util
import model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
# under pytest-xdist, the tests that read the module's pretrained and fine-tuned runs go to one
# worker, so the runs are made once
SHARES_THE_RUNS = pytest.mark.xdist_group("pipeline_runs")


def run(script: str, *flags: str, stdin: str | None = None, check: bool = True):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=ROOT,
                            input=stdin, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        # the head of stderr too: a crash's cause comes before its long list of modules
        raise AssertionError(f"{script} failed (rc {result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[:1500]}\n...\n"
                             f"{result.stderr[-1500:]}")
    return result


def summary(output: str, name: str) -> dict:
    """Parse the script's last `name key=value ...` line."""
    lines = [line for line in output.splitlines() if line.startswith(name + " ")]
    assert lines, f"no summary line starting with {name!r} in:\n{output[-2000:]}"
    return dict(part.split("=", 1) for part in lines[-1].split()[1:])


@pytest.fixture(scope="module")
def data_flag(sample_data) -> str:
    return f"--data_path={sample_data}"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_flag):
    run_dir = str(tmp_path_factory.mktemp("lm"))
    result = run("train_bert_lm.py", "--test_mode=True", data_flag, f"--ckpt_dir={run_dir}")
    return run_dir, summary(result.stdout, "pretrain")


@pytest.fixture(scope="module")
def fine_tuned(pretrained, tmp_path_factory, data_flag):
    run_dir = str(tmp_path_factory.mktemp("ft"))
    result = run("train_bert_fine_tuning.py", "--test_mode=True", data_flag,
                 f"--pretrained_dir={pretrained[0]}", f"--ckpt_dir_save={run_dir}")
    return run_dir, summary(result.stdout, "fine_tune")


def best_constant_f1(run_dir: str) -> float:
    """F1 on the run's test slice of the label priors alone (the same probabilities for every
    document), with thresholds tuned on that test slice itself: the best an untrained head at
    its starting point can do, and a generous bar."""
    labels = open(os.path.join(run_dir, "labels.txt"), encoding="utf-8").read().split()
    index = {label: i for i, label in enumerate(labels)}

    def multi_hot(path: str) -> np.ndarray:
        rows = [data_util.parse_label_line(line)[1] for _, line in data_util.read_lines(path)]
        return np.array([[int(label in row) for label in index] for row in rows])

    train, test = (multi_hot(os.path.join(run_dir, "test_data", f"{split}.txt"))
                   for split in ("train", "test"))
    priors = np.tile(train.mean(axis=0), (len(test), 1))
    return model.f1_scores(test, priors, model.tune_thresholds(test, priors))["f1"]


@SHARES_THE_RUNS
def test_pretraining_writes_a_usable_run_directory(pretrained):
    run_dir, values = pretrained
    for name in ("config.json", "vocab.txt", "data_config.json", "backbone.weights.h5",
                 "history.json", "history.png"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    assert os.listdir(os.path.join(run_dir, "logs"))
    assert 0.0 < float(values["best_valid_mlm_accuracy"]) < 1.0
    assert float(values["best_valid_mlm_loss"]) < np.log(30000)


@SHARES_THE_RUNS
def test_fine_tuning_reports_sane_scores_and_files(fine_tuned):
    run_dir, values = fine_tuned
    for key in ("test_micro_f1", "test_macro_f1", "test_f1", "best_valid_f1"):
        assert 0.0 <= float(values[key]) <= 1.0, key
    # two test-mode epochs learn something from the text: more than the priors can give
    assert float(values["test_f1"]) > best_constant_f1(run_dir) + 0.05
    report = json.load(open(os.path.join(run_dir, "test_report.json"), encoding="utf-8"))
    labels = open(os.path.join(run_dir, "labels.txt"), encoding="utf-8").read().split()
    assert [r["label"] for r in report["per_label"]] == labels
    assert set(labels) <= {"person", "place", "org", "time", "number", "other_proper", "none"}
    history = json.load(open(os.path.join(run_dir, "history.json"), encoding="utf-8"))
    assert [h["epoch"] for h in history] == [1, 2] and "val_f1" in history[0]
    thresholds = json.load(open(os.path.join(run_dir, "thresholds.json"), encoding="utf-8"))
    assert list(thresholds["thresholds"]) == labels
    assert all(0.0 < t < 1.0 for t in thresholds["thresholds"].values())
    assert report["decision_rule"] == "tuned"
    # the bag-of-words rate the trial chose, and the averaging the default gave (none: test
    # mode's 2,000 lines make fewer than 100 steps an epoch), are recorded with the run
    data_config = json.load(open(os.path.join(run_dir, "data_config.json"), encoding="utf-8"))
    assert data_config["bag_of_words_learning_rate"] in classifier_task.BAG_OF_WORDS_RATES
    assert data_config["weight_averaging"] == 0.0
    assert [r["threshold"] for r in report["per_label"]] == list(
        thresholds["thresholds"].values())


def backbone_weights(backbone) -> list[np.ndarray]:
    return [np.asarray(w) for w in backbone.get_weights()]


@SHARES_THE_RUNS
def test_fine_tuning_starts_from_the_pretrained_backbone(pretrained, fine_tuned):
    import predict

    saved, config = model.load_backbone(os.path.join(pretrained[0], "config.json"),
                                        os.path.join(pretrained[0], "backbone.weights.h5"))
    tuned = predict.Predictor(fine_tuned[0]).classifier.get_layer("backbone")
    fresh = model.build_backbone(config)
    # Two epochs at a small learning rate move the weights a little; a fresh start would be
    # as far away as two random draws are from each other.
    for before, after, random in zip(backbone_weights(saved), backbone_weights(tuned),
                                     backbone_weights(fresh)):
        assert before.shape == after.shape
        if random.ndim >= 2:  # kernels and embeddings: randomly initialised
            assert np.abs(after - before).mean() < 0.5 * np.abs(random - before).mean()


@SHARES_THE_RUNS
def test_predict_labels_stdin_and_exports(fine_tuned, tmp_path, sample_data):
    run_dir, _ = fine_tuned
    text = "中国 政府 今天 在 北京 宣布 一 项 新 政策\n1998年 1月 人民 生活\n"
    result = run("predict.py", f"--ckpt_dir={run_dir}", "--min_prob=0.0", stdin=text)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2
    labels = open(os.path.join(run_dir, "labels.txt"), encoding="utf-8").read().split()
    for row in rows:
        assert row["labels"] and set(row["labels"]) <= set(labels)
        assert set(row["probabilities"]) == set(labels)
        assert all(0.0 <= p <= 1.0 for p in row["probabilities"].values())
    valid_file = os.path.join(sample_data, "entities", "valid.txt")
    # the run's tuned thresholds decide, unless --decision_rule=half asks for p >= 0.5
    import predict
    predictor = predict.Predictor(run_dir)
    texts = [line for _, line in zip(range(100), open(valid_file, encoding="utf-8"))]
    probs = predictor.probabilities(texts)
    for flags, thresholds in (([], predictor.thresholds), (["--decision_rule=half"], None)):
        out = run("predict.py", f"--ckpt_dir={run_dir}", "--test_mode=True",
                  f"--input_file={valid_file}", *flags).stdout.splitlines()
        assert len(out) == 100
        chosen = model.predict_labels(probs, thresholds)
        assert [sorted(json.loads(line)["labels"]) for line in out] == [
            sorted(labels[i] for i in np.flatnonzero(row)) for row in chosen]
    # a missing run directory and --export_jit_compile without --export_dir are cases of
    # bench_robustness's catalogue, which test_hostile_input_ends_in_one_line runs
    gbk_stdin = subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"),
                                f"--ckpt_dir={run_dir}"], input="北京\n".encode("gb18030"),
                               capture_output=True, cwd=ROOT, timeout=600)
    assert gbk_stdin.returncode == 2 and b"Traceback" not in gbk_stdin.stderr
    assert "<stdin>:1: cannot decode as utf-8" in gbk_stdin.stderr.decode()
    export_dir = str(tmp_path / "export")
    run("predict.py", f"--ckpt_dir={run_dir}", f"--export_dir={export_dir}")
    import tensorflow as tf
    loaded = tf.saved_model.load(export_dir)  # keep a reference: it owns the variables
    served = loaded.serve_token_ids(tf.constant([[2, 7, 8, 9, 0, 0]], tf.int32))
    assert served["probabilities"].shape == (1, len(labels))


# bfloat16 with a 2-block Transformer, which learns the task in one epoch: on a CPU without
# bfloat16 instructions a TextCNN took 150 s of the slow tier for three, 6 blocks 50 s for one
@pytest.mark.parametrize("backbone, precision, epochs, size",
                         [("textcnn", "off", 3, []),
                          ("transformer", "bfloat16", 1, ["--num_layer=2"])])
def test_toy_task_summary(backbone, precision, epochs, size):
    toy = run("train_transform.py", "--toy_task=True", f"--backbone={backbone}",
              "--test_mode=True", f"--num_epochs={epochs}", f"--mixed_precision={precision}", *size)
    assert float(summary(toy.stdout, "toy_task")["accuracy"]) >= 0.9
    policy = "mixed_bfloat16" if precision == "bfloat16" else "float32"
    assert f"dtype policy: {policy}" in toy.stdout


def test_many_labels_start_at_their_priors_and_a_stalled_run_stops(tmp_path, data_flag):
    """On the 200-label task a fresh head at p = 0.5 would cost ln 2 per label; at the priors
    the start is a fraction of that. Learning rates of 1e-12 (0 is refused) move no float32
    weight enough to change validation F1, so patience 1 stops after the second epoch."""
    run_dir = tmp_path / "many"
    result = run("train_transform.py", "--test_mode=True", data_flag, "--task=mentions",
                 "--num_epochs=6",
                 "--learning_rate=1e-12", "--bag_of_words_learning_rate=1e-12",
                 "--early_stopping_patience=1", "--sequence_length=64",
                 f"--ckpt_dir_save={run_dir}")
    values = summary(result.stdout, "scratch")
    labels = open(run_dir / "labels.txt", encoding="utf-8").read().splitlines()
    assert len(labels) > 100
    assert float(values["initial_valid_loss"]) < 0.3 * len(labels) * np.log(2)
    assert values["epochs"] == "2"


def kill_when_written(command: list[str], artefact: str) -> None:
    """Start `command`, SIGKILL it the moment `artefact` exists (not after a guessed delay)."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.exists(artefact) and time.time() < deadline and process.poll() is None:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert os.path.exists(artefact), f"{artefact} never appeared"


def test_bad_flags_and_files_end_in_one_line(tmp_path):
    missing = run("train_bert_fine_tuning.py", f"--pretrained_dir={tmp_path / 'nothing'}",
                  check=False)
    assert missing.returncode == 2
    assert "is not a run directory of train_bert_lm.py" in missing.stderr
    assert "Traceback" not in missing.stderr
    train = tmp_path / "train.txt"
    train.write_text("北京 __label__a\n上海 __label__b\n", encoding="utf-8")
    no_valid = run("train_transform.py", f"--training_data_file={train}",
                   f"--ckpt_dir_save={tmp_path / 'run'}", check=False)
    assert no_valid.returncode == 2 and "Traceback" not in no_valid.stderr
    assert no_valid.stderr.strip().splitlines()[-1].startswith("error: --valid_data_file is needed")


def test_a_killed_classifier_resumes_and_other_data_is_refused(tmp_path, data_flag):
    run_dir = str(tmp_path / "s")
    # a given bag-of-words rate: the rate trial (10 s a launch) has tests of its own
    flags = ["--test_mode=True", data_flag, f"--ckpt_dir_save={run_dir}", "--num_epochs=2",
             "--early_stopping_patience=0", "--sequence_length=32",
             "--bag_of_words_learning_rate=10", "--task=sentiment"]
    # between the backup's weights and its state file
    kill_when_written([sys.executable, os.path.join(ROOT, "train_transform.py"), *flags],
                      os.path.join(run_dir, "backup", "epoch-0001.weights.h5"))
    other = run("train_transform.py", *flags[:-1], "--task=entities", check=False)
    assert other.returncode == 2 and "unfinished run made with other data" in other.stderr
    result = run("train_transform.py", *flags)
    assert "Epoch 2/2" in result.stdout
    history = json.load(open(os.path.join(run_dir, "history.json"), encoding="utf-8"))
    assert [h["epoch"] for h in history] == [1, 2]
    assert 0.0 < float(summary(result.stdout, "scratch")["test_f1"]) <= 1.0


@SHARES_THE_RUNS
def test_hostile_input_ends_in_one_line(pretrained, fine_tuned, tmp_path, sample_data):
    """The fast half of benchmarks/bench_robustness.py: each case exits 2 with one line (the
    cases of one script share a fork of one process here; the benchmark gives each its own)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_robustness as br
    br.DATA_PATH = sample_data
    cases = [case for case in br.catalogue({"lm": pretrained[0], "ft": fine_tuned[0]})
             if not case.trains]
    try:
        results = br.run_cases_batched(cases, str(tmp_path))
    finally:
        br.unmount_all()
    assert len(results) >= 28
    assert [r for r in results if not r["clean"]] == []


def mirrored_pretraining(run_dir: str, corpus: str) -> list[str]:
    """The real script under MirroredStrategy with 2 replicas (2 logical CPUs, set up before
    TensorFlow starts, which is why it runs in a process of its own), for 2 short epochs."""
    code = (
        "import sys, train_util; train_util.split_cpu_for_testing(2)\n"
        "import tensorflow as tf; assert len(tf.config.list_logical_devices('CPU')) == 2\n"
        "from absl import app; import cli, train_bert_lm\n"
        f"sys.argv = ['train_bert_lm.py', '--test_mode=True', '--distribution_strategy=mirrored',"
        f" '--num_epochs=2', '--ckpt_dir={run_dir}', '--mask_lm_source_file={corpus}',"
        " '--batch_size=32', '--sequence_length_lm=32']\n"
        "app.run(cli.guard(train_bert_lm.main))\n")
    return [sys.executable, "-c", code]


def test_a_killed_pretraining_under_mirrored_strategy_resumes(tmp_path, small_corpus):
    run_dir = str(tmp_path / "lm")
    command = mirrored_pretraining(run_dir, small_corpus)
    kill_when_written(command, os.path.join(run_dir, "backup", "state.json"))
    # the killed run's lock is taken over, not obeyed
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "num_replicas_in_sync=2" in result.stdout
    assert "resuming from epoch 1 of 2" in result.stdout
    assert "Epoch 1/2" not in result.stdout and "Epoch 2/2" in result.stdout
    history = json.load(open(os.path.join(run_dir, "history.json"), encoding="utf-8"))
    assert [h["epoch"] for h in history] == [1, 2]
    manifest = json.load(open(os.path.join(run_dir, "run.json"), encoding="utf-8"))
    assert manifest["status"] == "finished" and not os.path.exists(os.path.join(run_dir, "lock"))
    values = summary(result.stdout, "pretrain")
    assert 0.0 < float(values["best_valid_mlm_accuracy"]) < 1.0
