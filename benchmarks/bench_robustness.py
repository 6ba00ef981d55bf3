"""Tried as a hostile user would: bad input must end in one line (exit 2), a kill must never lose
a run, and a plain rerun must carry on.

    python benchmarks/bench_robustness.py              # the catalogue + 20 kill trials (~40 min)
    python benchmarks/bench_robustness.py --fast       # the catalogue only (tests run this part)
    python benchmarks/bench_robustness.py --kills=5    # fewer kill trials

Each catalogue case runs a script the way a user would and expects exit status 2, no traceback,
and a last line `error: ...` that names what is wrong. Each kill trial starts a real run, watches
the run directory for a chosen artefact (a backup being written, the best weights, the report, a
cache file ...), sends SIGKILL the moment it appears, then reruns the same command and checks
that it finished with every epoch in its history and files that verify. The last line reads
`robustness cases=N clean=N tracebacks=0 kills=K resumed=K lost=0`; results go to
benchmarks/results/robustness.md.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results")
TIMEOUT = 900


def run_script(script: str, flags: list[str], prefix: list[str] | None = None,
               timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([*(prefix or []), sys.executable, os.path.join(ROOT, script), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------ the catalogue
@dataclass
class Case:
    name: str
    script: str
    flags: list[str]
    expect: str  # a piece of the one-line error
    setup: Callable[[str], None] | None = None  # gets the case's scratch directory
    prefix: list[str] = field(default_factory=list)
    after: Callable[[], str | None] | None = None  # a problem left behind, or None
    trains: bool = False  # reaches training before it fails (too slow for the test suite)
    own_process: bool = False  # cannot share a process with other cases


def without_file_permissions() -> list[str]:
    """Root reads any file; drop that capability so that permissions bite as for a user."""
    if os.geteuid() != 0:
        return []
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


def write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def labelled_files(tmp: str) -> list[str]:
    lines = "".join(f"北京 上海 {i} __label__{'ab'[i % 2]}\n" for i in range(40))
    train, valid = write(f"{tmp}/train.txt", lines), write(f"{tmp}/valid.txt", lines)
    return [f"--training_data_file={train}", f"--valid_data_file={valid}"]


def fake_unfinished_run(directory: str, kind: str) -> None:
    """A directory that an interrupted (full, not test-mode) run with other settings left."""
    import run_directory
    run, _ = run_directory.open_for_training(directory, kind,
                                             {"test_mode": False, "backbone": "transformer",
                                              "d_model": 32}, overwrite=True)
    run.release()


def catalogue(shared: dict) -> list[Case]:
    """`shared`: run directories made once (a finished classifier and pretraining run)."""
    lm, ft = shared["lm"], shared["ft"]
    lm_flags = ["--test_mode=True"]
    cases = [
        Case("unreadable input file", "train_transform.py",
             ["--training_data_file={tmp}/secret.txt", "--valid_data_file={tmp}/secret.txt",
              "--ckpt_dir_save={tmp}/run"], "permission denied",
             lambda tmp: os.chmod(write(f"{tmp}/secret.txt", "a __label__x\n"), 0),
             without_file_permissions()),
        Case("unknown --encoding", "train_bert_lm.py",
             [*lm_flags, "--encoding=foo", "--ckpt_dir={tmp}/lm"], "not a known text encoding"),
        Case("--sequence_length_lm=0", "train_bert_lm.py",
             [*lm_flags, "--sequence_length_lm=0", "--ckpt_dir={tmp}/lm"], "at least 3"),
        Case("--sequence_length_lm=-4", "train_bert_lm.py",
             [*lm_flags, "--sequence_length_lm=-4", "--ckpt_dir={tmp}/lm"], "at least 3"),
        Case("--sequence_length_lm=2", "train_bert_lm.py",
             [*lm_flags, "--sequence_length_lm=2", "--ckpt_dir={tmp}/lm"], "at least 3"),
        Case("--batch_size=0", "train_bert_lm.py",
             [*lm_flags, "--batch_size=0", "--ckpt_dir={tmp}/lm"], "--batch_size=0 must be"),
        Case("--batch_size=-3", "train_transform.py",
             ["--test_mode=True", "--batch_size=-3", "--ckpt_dir_save={tmp}/s"], "--batch_size"),
        Case("--mask_rate=1", "train_bert_lm.py",
             [*lm_flags, "--mask_rate=1", "--ckpt_dir={tmp}/lm"], "--mask_rate"),
        Case("--mask_rate=0", "train_bert_lm.py",
             [*lm_flags, "--mask_rate=0", "--ckpt_dir={tmp}/lm"], "--mask_rate"),
        Case("--learning_rate=0", "train_bert_fine_tuning.py",
             ["--test_mode=True", "--learning_rate=0", f"--pretrained_dir={lm}",
              "--ckpt_dir_save={tmp}/ft"], "--learning_rate"),
        Case("--valid_fraction=0", "train_bert_lm.py",
             [*lm_flags, "--valid_fraction=0", "--ckpt_dir={tmp}/lm"], "--valid_fraction"),
        Case("--valid_fraction=1", "train_bert_lm.py",
             [*lm_flags, "--valid_fraction=1", "--ckpt_dir={tmp}/lm"], "--valid_fraction"),
        Case("--ckpt_dir is a file", "train_bert_lm.py",
             [*lm_flags, "--ckpt_dir={tmp}/file"], "is a file",
             lambda tmp: write(f"{tmp}/file", "x")),
        Case("--ckpt_dir under a file", "train_bert_lm.py",
             [*lm_flags, "--ckpt_dir={tmp}/file/run"], "cannot create",
             lambda tmp: write(f"{tmp}/file", "x")),
        Case("--ckpt_dir not writable", "train_bert_lm.py",
             [*lm_flags, "--ckpt_dir={tmp}/locked/run"], "Permission denied",
             lambda tmp: os.makedirs(f"{tmp}/locked", mode=0o555), without_file_permissions()),
        Case("--cache_dir is a file", "train_bert_lm.py",
             [*lm_flags, "--cache_dir={tmp}/file", "--ckpt_dir={tmp}/lm"], "is a file",
             lambda tmp: write(f"{tmp}/file", "x")),
        Case("resume with another --backbone", "train_bert_lm.py",
             ["--backbone=textcnn", "--ckpt_dir={tmp}/lm"], "backbone",
             lambda tmp: fake_unfinished_run(f"{tmp}/lm", "pretrain")),
        Case("resume with another --d_model", "train_transform.py",
             ["--d_model=48", "--ckpt_dir_save={tmp}/s"], "d_model",
             lambda tmp: fake_unfinished_run(f"{tmp}/s", "classifier")),
        Case("a finished run is not overwritten", "train_transform.py",
             ["--test_mode=False", "--num_epochs=1", f"--ckpt_dir_save={ft}"],
             "--overwrite=True"),
        Case("typo in an input file keeps the finished model", "train_transform.py",
             ["--training_data_file={tmp}/typo.txt", "--valid_data_file={tmp}/typo.txt",
              f"--ckpt_dir_save={ft}", "--overwrite=True"], "no such file",
             after=lambda: finished_and_verified(ft, "classifier", 2)),
        Case("a second run at once", "train_transform.py",
             ["--test_mode=True", "--ckpt_dir_save={tmp}/busy"], "in use by another run (PID",
             lambda tmp: hold_lock(f"{tmp}/busy")),
        Case("truncated classifier.weights.h5", "predict.py",
             ["--ckpt_dir={tmp}/ft", "--input_file=" + os.path.join(ROOT, "README.md")],
             "changed since training", lambda tmp: damaged_copy(ft, f"{tmp}/ft", truncate=True)),
        Case("vocab.txt lines swapped", "predict.py",
             ["--ckpt_dir={tmp}/ft", "--input_file=" + os.path.join(ROOT, "README.md")],
             "changed since training", lambda tmp: damaged_copy(ft, f"{tmp}/ft", swap="vocab.txt")),
        Case("labels.txt lines swapped", "predict.py",
             ["--ckpt_dir={tmp}/ft", "--input_file=" + os.path.join(ROOT, "README.md")],
             "changed since training",
             lambda tmp: damaged_copy(ft, f"{tmp}/ft", swap="labels.txt")),
        Case("data_config.json not an object", "predict.py",
             ["--ckpt_dir={tmp}/ft", "--input_file=" + os.path.join(ROOT, "README.md")],
             "data_config.json", lambda tmp: damaged_copy(ft, f"{tmp}/ft", data_config="[1, 2]")),
        Case("pretraining directory without data_config.json", "train_bert_fine_tuning.py",
             ["--test_mode=True", "--pretrained_dir={tmp}/lm", "--ckpt_dir_save={tmp}/ft"],
             "data_config.json is missing", lambda tmp: damaged_copy(lm, f"{tmp}/lm",
                                                                     remove="data_config.json")),
        Case("--export_dir is a file", "predict.py",
             [f"--ckpt_dir={ft}", "--export_dir={tmp}/file"], "is a file",
             lambda tmp: write(f"{tmp}/file", "x")),
        Case("--distribution_strategy=tpu without a TPU", "train_bert_lm.py",
             [*lm_flags, "--distribution_strategy=tpu", "--ckpt_dir={tmp}/lm"], "no TPU"),
        Case("not a run directory", "predict.py", ["--ckpt_dir={tmp}"],
             "is not a run directory"),
        Case("--export_jit_compile without --export_dir", "predict.py",
             [f"--ckpt_dir={ft}", "--export_jit_compile=True"],
             "--export_jit_compile=True compiles an export: give --export_dir as well"),
    ]
    if can_mount_tmpfs():
        cases += [
            Case("disk full while writing a cache", "train_bert_lm.py",
                 [*lm_flags, "--cache_dir={tmp}/full", "--ckpt_dir={tmp}/lm"], "disk space",
                 lambda tmp: small_disk(f"{tmp}/full"), own_process=True),
            Case("disk full while writing a checkpoint", "train_bert_lm.py",
                 [*lm_flags, "--ckpt_dir={tmp}/full/lm"], "disk space",
                 lambda tmp: small_disk(f"{tmp}/full", "3m"), trains=True, own_process=True),
        ]
    return cases


def hold_lock(directory: str) -> None:
    """Leave `directory` locked by a live process (this one) as a running run would."""
    import socket
    os.makedirs(directory, exist_ok=True)
    write(os.path.join(directory, "lock"), f"{os.getpid()} {socket.gethostname()}\n")


def damaged_copy(source: str, target: str, truncate: bool = False, swap: str | None = None,
                 data_config: str | None = None, remove: str | None = None) -> None:
    shutil.copytree(source, target)
    if truncate:
        path = os.path.join(target, "classifier.weights.h5")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    if swap:
        path = os.path.join(target, swap)
        lines = open(path, encoding="utf-8").read().splitlines()
        lines[-1], lines[-2] = lines[-2], lines[-1]
        write(path, "\n".join(lines) + "\n")
    if data_config:
        write(os.path.join(target, "data_config.json"), data_config)
    if remove:
        os.remove(os.path.join(target, remove))


MOUNTS: list[str] = []


def can_mount_tmpfs() -> bool:
    probe = tempfile.mkdtemp()
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", probe], capture_output=True)
        return ok
    except FileNotFoundError:
        return False
    finally:
        os.rmdir(probe)


def small_disk(path: str, size: str = "600k") -> None:
    """A file system too small for a cache or a checkpoint, to fill up for real."""
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], check=True)
    MOUNTS.append(path)


def unmount_all() -> None:
    while MOUNTS:
        subprocess.run(["umount", MOUNTS.pop()], capture_output=True)


def run_case(case: Case, scratch: str) -> dict:
    """One case in a process of its own, exactly as a user runs it."""
    tmp, flags = prepare(case, scratch)
    result = run_script(case.script, flags, case.prefix)
    return judge(case, result.returncode, result.stderr)


# Sample data for the training scripts' cases (None: the scripts' default, data/ in the repo);
# the test suite points it at its own temporary copy.
DATA_PATH: str | None = None


def prepare(case: Case, scratch: str) -> tuple[str, list[str]]:
    tmp = tempfile.mkdtemp(dir=scratch)
    if case.setup:
        case.setup(tmp)
    flags = [f.replace("{tmp}", tmp) for f in case.flags]
    if DATA_PATH and case.script != "predict.py":
        flags.append(f"--data_path={DATA_PATH}")
    return tmp, flags


def judge(case: Case, returncode: int, stderr: str) -> dict:
    lines = stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    traceback = "Traceback" in stderr or returncode not in (0, 2)
    left = case.after() if case.after else None
    clean = (returncode == 2 and not traceback and last.startswith("error: ")
             and case.expect in last and left is None)
    return {"case": case.name, "clean": clean, "traceback": traceback,
            "returncode": returncode, "last_line": (left or last)[:300]}


# Several command lines of one script in one process, each through the script's own guarded
# main with its flags parsed afresh: the same exit status and error line a user gets, without
# paying TensorFlow's import once a case (the test suite runs the catalogue this way).
# The cases of each script run one after another in one fork (tools/script_forks.py) of this
# child: {script module: [argv, ...]} on stdin, {script module: [outcome, ...]} on stdout
_BATCH_DRIVER = """
import contextlib, io, json, sys, traceback
sys.path[:0] = [{root!r}, {tools!r}]
import script_forks
argvs_by_module = json.loads(sys.stdin.read())

def run_all(script):
    from absl import flags
    import cli
    outcomes = []
    for argv in argvs_by_module[script.__name__]:
        flags.FLAGS.unparse_flags()
        captured, code = io.StringIO(), 0
        with contextlib.redirect_stderr(captured):
            try:
                flags.FLAGS([script.__name__ + ".py", *argv])
                cli.guard(script.main)([script.__name__])
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
        outcomes.append({{"returncode": code, "stderr": captured.getvalue()}})
    return outcomes

print("BATCH_RESULTS " + json.dumps(script_forks.each_in_a_fork(list(argvs_by_module), run_all)))
"""


def run_cases_batched(cases: list[Case], scratch: str) -> list[dict]:
    """`run_case` for every case, those of one script sharing a process where they can (not
    under a permission-dropping prefix, not the disk-full ones, which end with os._exit)."""
    results: dict[int, dict] = {}
    groups: dict[str, list[int]] = {}
    for i, case in enumerate(cases):
        if case.prefix or case.own_process:
            results[i] = run_case(case, scratch)
        else:
            groups.setdefault(case.script.removesuffix(".py"), []).append(i)
    argvs = {module: [prepare(cases[i], scratch)[1] for i in members]
             for module, members in groups.items()}
    code = _BATCH_DRIVER.format(root=ROOT, tools=os.path.join(ROOT, "tools"))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, input=json.dumps(argvs),
                          capture_output=True, text=True, timeout=TIMEOUT)
    marked = [line for line in done.stdout.splitlines() if line.startswith("BATCH_RESULTS ")]
    if not marked:
        raise RuntimeError(f"the batched cases failed: {done.stderr[-2000:]}")
    outcomes = json.loads(marked[-1].split(" ", 1)[1])
    for module, members in groups.items():
        for i, outcome in zip(members, outcomes[module]):
            results[i] = judge(cases[i], outcome["returncode"], outcome["stderr"])
    return [results[i] for i in range(len(cases))]


def make_shared_runs(scratch: str) -> dict:
    """One finished pretraining run and one finished classifier, for the cases that read them."""
    lm, ft = os.path.join(scratch, "shared_lm"), os.path.join(scratch, "shared_ft")
    for script, flags in (("train_bert_lm.py", ["--test_mode=True", f"--ckpt_dir={lm}"]),
                          ("train_bert_fine_tuning.py", ["--test_mode=True",
                                                         f"--pretrained_dir={lm}",
                                                         f"--ckpt_dir_save={ft}"])):
        result = run_script(script, flags)
        if result.returncode != 0:
            raise RuntimeError(f"{script} failed: {result.stderr[-2000:]}")
    return {"lm": lm, "ft": ft}


# ------------------------------------------------------------------------ kill trials
@dataclass
class KillTrial:
    stage: str
    script: str
    flags: list[str]
    watch: str  # glob under the run's scratch directory; SIGKILL when it matches
    check: Callable[[str, subprocess.CompletedProcess], str | None]  # problem or None


def history_complete(run_dir: str, epochs: int) -> str | None:
    path = os.path.join(run_dir, "history.json")
    if not os.path.exists(path):
        return "no history.json"
    got = [h["epoch"] for h in json.load(open(path, encoding="utf-8"))]
    if got != list(range(1, len(got) + 1)) or not got or len(got) > epochs:
        return f"history epochs {got}"
    return None


def finished_and_verified(run_dir: str, kind: str, epochs: int) -> str | None:
    import run_directory
    try:
        run = run_directory.open_finished(run_dir, kind, "--ckpt_dir")
        for name in run.manifest.get("checksums", {}):
            run.verified(name)
    except run_directory.RunError as error:
        return str(error)
    if run.manifest.get("status") != "finished":
        return "not finished"
    return history_complete(run_dir, epochs)


def kill_trials(shared: dict) -> list[KillTrial]:
    lm = shared["lm"]

    def lm_check(epochs):
        return lambda tmp, result: finished_and_verified(f"{tmp}/run", "pretrain", epochs)

    def ft_check(epochs):
        return lambda tmp, result: finished_and_verified(f"{tmp}/run", "classifier", epochs)

    def export_check(tmp, result):
        return None if os.path.exists(f"{tmp}/export/saved_model.pb") else "no saved_model.pb"

    lm_flags = ["--test_mode=True", "--num_epochs=2", "--ckpt_dir={tmp}/run"]
    ft_flags = ["--test_mode=True", "--num_epochs=3", f"--pretrained_dir={lm}",
                "--ckpt_dir_save={tmp}/run", "--early_stopping_patience=0"]
    sc_flags = ["--test_mode=True", "--num_epochs=2", "--ckpt_dir_save={tmp}/run",
                "--task=sentiment"]
    return [
        KillTrial("cache building", "train_bert_lm.py",
                  [*lm_flags, "--cache_dir={tmp}/cache"], "cache/.tmp-*", lm_check(2)),
        KillTrial("vocabulary written", "train_bert_lm.py", [*lm_flags, "--cache_dir={tmp}/cache"],
                  "run/vocab.txt", lm_check(2)),
        KillTrial("pretraining: best weights being written", "train_bert_lm.py", lm_flags,
                  "run/.tmp-*backbone.weights.h5", lm_check(2)),
        KillTrial("pretraining: history written", "train_bert_lm.py", lm_flags,
                  "run/history.json", lm_check(2)),
        KillTrial("pretraining: backup being written", "train_bert_lm.py", lm_flags,
                  "run/backup/.tmp-*", lm_check(2)),
        KillTrial("pretraining: backup state written", "train_bert_lm.py", lm_flags,
                  "run/backup/state.json", lm_check(2)),
        KillTrial("pretraining: final plot", "train_bert_lm.py", lm_flags,
                  "run/history.png", lm_check(2)),
        KillTrial("fine-tuning: config written", "train_bert_fine_tuning.py", ft_flags,
                  "run/config.json", ft_check(3)),
        KillTrial("fine-tuning: best weights being written", "train_bert_fine_tuning.py",
                  ft_flags, "run/.tmp-*classifier.weights.h5", ft_check(3)),
        KillTrial("fine-tuning: best.json written", "train_bert_fine_tuning.py", ft_flags,
                  "run/best.json", ft_check(3)),
        KillTrial("fine-tuning: backup being written", "train_bert_fine_tuning.py", ft_flags,
                  "run/backup/.tmp-*", ft_check(3)),
        KillTrial("fine-tuning: second backup", "train_bert_fine_tuning.py", ft_flags,
                  "run/backup/epoch-0002.weights.h5", ft_check(3)),
        KillTrial("fine-tuning: thresholds being written", "train_bert_fine_tuning.py",
                  ft_flags, "run/.tmp-*thresholds.json", ft_check(3)),
        KillTrial("fine-tuning: test report written", "train_bert_fine_tuning.py", ft_flags,
                  "run/test_report.json", ft_check(3)),
        KillTrial("fine-tuning: plot written", "train_bert_fine_tuning.py", ft_flags,
                  "run/history.png", ft_check(3)),
        KillTrial("from scratch: classification cache", "train_transform.py",
                  [*sc_flags, "--cache_dir={tmp}/cache"], "cache/.tmp-*", ft_check(2)),
        KillTrial("from scratch: backup being written", "train_transform.py", sc_flags,
                  "run/backup/.tmp-*", ft_check(2)),
        KillTrial("from scratch: history written", "train_transform.py", sc_flags,
                  "run/history.json", ft_check(2)),
        KillTrial("from scratch: final save", "train_transform.py", sc_flags,
                  "run/.tmp-*test_report.json", ft_check(2)),
        KillTrial("export", "predict.py",
                  [f"--ckpt_dir={shared['ft']}", "--export_dir={tmp}/export"], "export/*",
                  export_check),
    ]


def run_kill(trial: KillTrial, scratch: str) -> dict:
    tmp = tempfile.mkdtemp(dir=scratch)
    flags = [f.replace("{tmp}", tmp) for f in trial.flags]
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, trial.script), *flags],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pattern = os.path.join(tmp, trial.watch)
    deadline = time.time() + TIMEOUT
    killed = False
    while time.time() < deadline and process.poll() is None:
        if glob.glob(pattern):
            process.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.002)
    process.wait()
    rerun = run_script(trial.script, flags)
    traceback = "Traceback" in rerun.stderr or rerun.returncode not in (0, 2)
    problem = None if rerun.returncode == 0 else (rerun.stderr.strip().splitlines() or ["?"])[-1]
    problem = problem or trial.check(tmp, rerun)
    return {"stage": trial.stage, "killed": killed, "resumed": killed and problem is None,
            "lost": problem is not None, "problem": (problem or "")[:300],
            "said_resuming": "resuming from epoch" in rerun.stdout, "traceback": traceback}


# ------------------------------------------------------------------------------ report
def report(cases: list[dict], kills: list[dict], seconds: float, name: str) -> str:
    lines = [f"Robustness, {time.strftime('%Y-%m-%d')}, {seconds:.0f} s on {os.cpu_count()} "
             "cores. Catalogue: exit 2 and one `error:` line expected.", "",
             "| case | clean | exit | last line |", "|---|---|---|---|"]
    lines += [f"| {c['case']} | {'yes' if c['clean'] else 'NO'} | {c['returncode']} | "
              f"{c['last_line'].replace('|', '/')} |" for c in cases]
    if kills:
        lines += ["", "Kill trials (SIGKILL when the artefact appears, then the same command "
                  "again):", "", "| stage | killed | rerun said 'resuming' | finished intact | "
                  "problem |", "|---|---|---|---|---|"]
        lines += [f"| {k['stage']} | {k['killed']} | {k['said_resuming']} | "
                  f"{'yes' if not k['lost'] else 'NO'} | {k['problem'].replace('|', '/')} |"
                  for k in kills]
    summary = (f"robustness cases={len(cases)} clean={sum(c['clean'] for c in cases)} "
               f"tracebacks={sum(c['traceback'] for c in cases + kills)} "
               f"kills={sum(k['killed'] for k in kills)} "
               f"resumed={sum(k['resumed'] for k in kills)} lost={sum(k['lost'] for k in kills)}")
    lines += ["", summary]
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="the catalogue only, no kills")
    parser.add_argument("--kills", type=int, default=20, help="kill trials to run (of 20)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.time()
    scratch = tempfile.mkdtemp(prefix="robustness-")
    try:
        shared = make_shared_runs(scratch)
        cases = []
        for case in catalogue(shared):
            cases.append(run_case(case, scratch))
            print(f"{'clean' if cases[-1]['clean'] else 'NOT CLEAN'}: {case.name}: "
                  f"{cases[-1]['last_line']}", flush=True)
        kills = []
        if not args.fast:
            trials = kill_trials(shared)
            random.Random(args.seed).shuffle(trials)
            for trial in trials[:args.kills]:
                kills.append(run_kill(trial, scratch))
                print(json.dumps(kills[-1], ensure_ascii=False), flush=True)
        print(report(cases, kills, time.time() - start,
                     "robustness_fast" if args.fast else "robustness"))
    finally:
        unmount_all()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
