"""Two workers on this machine under MultiWorkerMirroredStrategy, started the way a user would
(tools/launch_local_cluster.py): the same loss as one worker, one set of artefacts, and a run
that resumes after one worker is killed. Slow tier (about two minutes on 2 cores)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "tools", "launch_local_cluster.py")
pytestmark = pytest.mark.slow


def pretraining_flags(corpus: str, run_dir: str) -> list[str]:
    return [os.path.join(ROOT, "train_bert_lm.py"), "--test_mode=True", "--num_epochs=2",
            f"--mask_lm_source_file={corpus}", f"--ckpt_dir={run_dir}", "--batch_size=32",
            "--sequence_length_lm=32", f"--cache_dir={os.path.dirname(run_dir)}/cache"]


def history(run_dir: str) -> list[dict]:
    return json.load(open(os.path.join(run_dir, "history.json"), encoding="utf-8"))


def launch(flags: list[str], scratch: str, log: str) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": scratch}
    return subprocess.Popen([sys.executable, LAUNCHER, "2", "--", sys.executable, *flags,
                             "--distribution_strategy=multi_worker_mirrored"], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def worker_pids(log: str) -> dict[int, int]:
    pids = {}
    for line in open(log, encoding="utf-8", errors="replace"):
        if line.startswith("[launcher] worker "):
            index, rest = line[len("[launcher] worker "):].split(":", 1)
            pids[int(index)] = int(rest.split(",")[0].split()[1])
    return pids


def test_two_workers_match_one_write_once_and_resume_after_a_kill(small_corpus, tmp_path):
    reference = str(tmp_path / "one" / "lm")
    done = subprocess.run([sys.executable, *pretraining_flags(small_corpus, reference)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    run_dir, scratch = str(tmp_path / "two" / "lm"), tmp_path / "scratch"
    scratch.mkdir()
    flags, log = pretraining_flags(small_corpus, run_dir), str(tmp_path / "killed.log")
    cluster = launch(flags, str(scratch), log)
    state = os.path.join(run_dir, "backup", "state.json")
    deadline = time.time() + 300
    while not os.path.exists(state) and time.time() < deadline and cluster.poll() is None:
        time.sleep(0.05)
    assert os.path.exists(state), open(log, encoding="utf-8").read()[-3000:]
    os.kill(worker_pids(log)[1], signal.SIGKILL)
    assert cluster.wait(timeout=120) != 0  # the launcher stops the chief too

    cluster = launch(flags, str(scratch), str(tmp_path / "resumed.log"))
    assert cluster.wait(timeout=600) == 0, open(tmp_path / "resumed.log").read()[-3000:]
    resumed = open(tmp_path / "resumed.log", encoding="utf-8").read()
    for worker in (0, 1):
        assert f"[worker {worker}] resuming from epoch 1 of 2" in resumed
        assert f"[worker {worker}] distribution: multi_worker_mirrored, " \
               "num_replicas_in_sync=2" in resumed
    assert [h["epoch"] for h in history(run_dir)] == [1, 2]
    manifest = json.load(open(os.path.join(run_dir, "run.json"), encoding="utf-8"))
    assert manifest["status"] == "finished"
    # one set of artefacts: the chief's; the other worker's scratch runs are gone
    assert os.listdir(os.path.dirname(run_dir)) == ["lm"] or \
        sorted(os.listdir(os.path.dirname(run_dir))) == ["cache", "lm"]
    assert not [name for name in os.listdir(scratch) if name.startswith("bert_lm-worker-")]
    # the same learning as one worker with the same global batch (the data order differs)
    one, two = history(reference), history(run_dir)
    for key in ("val_mlm_loss", "mlm_loss"):
        assert two[-1][key] == pytest.approx(one[-1][key], rel=0.05), key
    assert two[-1]["val_mlm_loss"] < two[0]["val_mlm_loss"] < np.log(30000)
