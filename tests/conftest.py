"""What every test shares: the repository on the import path (so a plain `pytest` works from any
directory), the two tiers, and the sample data built once per session in a temporary directory
(once for all workers when pytest-xdist runs the tests in parallel, `-n 2`).

Default tier (`python -m pytest -q tests`): layers, models, data code, one training step each;
what a developer runs after every change. Slow tier (`--run_slow`): the scripts end to end in
subprocesses, sample-data builds, kill-and-resume and multi-replica runs; CI runs both.
"""
import fcntl
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_addoption(parser):
    parser.addoption("--run_slow", action="store_true", default=False,
                     help="also run the tests marked slow (the scripts end to end, sample-data "
                          "builds, kills and resumes: several minutes on 2 cores)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a script-level, subprocess or data-build test; "
                                       "runs only with --run_slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run_slow"):
        return
    skip = pytest.mark.skip(reason="slow tier: run with --run_slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> str:
    """The sample data built once for the session under a temporary directory (never the repo's
    data/), with its caches beside it; pass it to the scripts as --data_path."""
    from data.prepare import ensure_sample_data

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's directory, above every worker's own
    root = base / "sample_data"
    root.mkdir(exist_ok=True)
    # the first worker builds, the others wait for it and then find the build complete
    with open(base / "sample_data.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ensure_sample_data(str(root))
    return str(root)


@pytest.fixture(scope="session")
def small_corpus(sample_data, tmp_path_factory) -> str:
    """600 lines of the sample pretraining corpus: a dozen steps an epoch at batch 32, for the
    kill-and-resume runs, whose subject is the run directory and not the learning."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    with open(os.path.join(sample_data, "pretrain_corpus.txt"), encoding="utf-8") as source:
        path.write_text("".join(line for _, line in zip(range(600), source)), encoding="utf-8")
    return str(path)


@pytest.fixture
def dead_pid() -> int:
    """The PID of a process that has just ended: a killed writer, for leftover-file tests."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid
