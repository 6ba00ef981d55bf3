"""The run directory, and the one place that knows its layout.

A training script opens its directory with `open_for_training`: the flags and inputs are checked
first, then the directory is locked (a second run gets one line naming the holder's PID), the
leftovers of killed runs are swept, and its manifest (run.json) decides what happens: a fresh
directory starts, an unfinished run of the same data and settings resumes, anything else is
refused unless the user passes --overwrite=True. Every artefact is written under a temporary name
and renamed into place; vocabulary, labels, configs, thresholds and weights get a sha256 in the
manifest, checked whenever a later step (`open_finished`) reads them.

The epoch backup keeps the previous complete state until the new one is on disk: weights (with the
optimizer state) go to a new file, then a small state file is renamed over the old one to point
at it, and only then is the older file removed. It is the last thing written at an epoch's end.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from typing import Callable

import keras
import numpy as np

import data_util_hdf5 as data_util

# ---------------------------------------------------------------------------- file names
MANIFEST = "run.json"
LOCK = "lock"
CONFIG = "config.json"
DATA_CONFIG = "data_config.json"
VOCAB = "vocab.txt"
LABELS = "labels.txt"
THRESHOLDS = "thresholds.json"
BACKBONE_WEIGHTS = "backbone.weights.h5"
CLASSIFIER_WEIGHTS = "classifier.weights.h5"
HISTORY = "history.json"
HISTORY_PLOT = "history.png"
BEST = "best.json"
BACKUP = "backup"
LOGS = "logs"
TEST_DATA = "test_data"

# Files a later step reads and trusts: their sha256 is recorded when written, checked on reading.
CHECKSUMMED = (CONFIG, DATA_CONFIG, VOCAB, LABELS, THRESHOLDS, BACKBONE_WEIGHTS,
               CLASSIFIER_WEIGHTS)
# Everything a run writes; a fresh run (or --overwrite) removes these and nothing else, so a
# --ckpt_dir pointed at a folder holding other files never loses them.
ARTEFACTS = CHECKSUMMED + (HISTORY, HISTORY_PLOT, BEST, "test_report.json", "valid_report.json",
                           "test_corpus.txt")
ARTEFACT_DIRS = (BACKUP, LOGS, TEST_DATA)
KINDS = ("pretrain", "classifier")


class RunError(Exception):
    """A run directory that cannot be used as asked; the message is the one line to print."""


HELD: list["Run"] = []  # runs this process has locked, released on any way out


def release_all() -> None:
    for run in HELD:
        run.release()


# ---------------------------------------------------------------------------- writing
def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """`data_util.write_file_atomically` for a run's files: `write(temporary_path)`, then a
    rename; a failed write keeps the previous file, and its error says a rerun resumes."""
    data_util.write_file_atomically(path, write, then=f"{data_util.RERUN} to resume")


def write_json_file(path: str, value) -> None:
    write_atomically(path, lambda temporary: _dump_json(temporary, value))


def read_json_file(path: str, default=None):
    if not os.path.exists(path):
        return default
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise RunError(f"{path}: unreadable ({error}); it was damaged after the run wrote it") \
            from None


# ---------------------------------------------------------------------------- the run
class Run:
    """An open run directory: where each artefact goes and how it is written."""

    def __init__(self, path: str, kind: str, manifest: dict):
        self.path, self.kind, self.manifest = path, kind, manifest
        self._locked = False

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # -- writing (only by the run that holds the lock)
    def write(self, name: str, write: Callable[[str], None]) -> None:
        """Write artefact `name` atomically through `write(temporary_path)`; checksummed
        artefacts get their sha256 recorded in the manifest.

        Between the manifest's update and the rename a kill would leave file and checksum
        disagreeing, so during the swap the manifest allows both the old and the new digest.
        """
        if name not in CHECKSUMMED:
            write_atomically(self.file(name), write)
            return
        checksums = self.manifest.setdefault("checksums", {})
        digest = []

        def write_then_allow(temporary: str) -> None:
            write(temporary)
            digest.append(sha256_of(temporary))
            checksums[name] = _digests(checksums.get(name)) + digest
            self._save_manifest()

        write_atomically(self.file(name), write_then_allow)
        checksums[name] = digest[0]
        self._save_manifest()

    def write_json(self, name: str, value) -> None:
        self.write(name, lambda tmp: _dump_json(tmp, value))

    def write_text(self, name: str, text: str) -> None:
        self.write(name, lambda tmp: data_util.write_utf8(tmp, text))

    def save_weights(self, model: keras.Model, name: str) -> None:
        data_util.ensure_free_space(self.file(name), weights_bytes(model))
        self.write(name, model.save_weights)

    def finish(self, summary: dict) -> None:
        """Mark the run finished (from now on it is only overwritten when asked) and drop its
        backup, which nothing needs any more."""
        checksums = self.manifest.setdefault("checksums", {})
        for name, recorded in checksums.items():  # settle a swap a killed run left open
            if isinstance(recorded, list) and os.path.exists(self.file(name)):
                checksums[name] = sha256_of(self.file(name))
        self.manifest.update(status="finished", finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                             summary=summary)
        self._save_manifest()
        shutil.rmtree(self.file(BACKUP), ignore_errors=True)

    def release(self) -> None:
        if self._locked:
            data_util.remove_quietly(self.file(LOCK))
            self._locked = False

    def _save_manifest(self) -> None:
        write_json_file(self.file(MANIFEST), self.manifest)

    # -- reading (finished or running runs alike)
    def verified(self, name: str) -> str:
        """Path of artefact `name` after checking it is there and unchanged since training."""
        path = self.file(name)
        recorded = _digests(self.manifest.get("checksums", {}).get(name))
        if not recorded or not os.path.exists(path):
            raise RunError(f"{path} is missing; point the flag at a run directory that a "
                           f"finished {self.kind} run wrote")
        if sha256_of(path) not in recorded:
            raise RunError(f"{path} has changed since training (its sha256 differs from the one "
                           f"in {MANIFEST}); restore the original file or train again")
        return path

    def read_json_object(self, name: str) -> dict:
        value = read_json_file(self.verified(name))
        if not isinstance(value, dict):
            raise RunError(f"{self.file(name)}: expected a JSON object; train again to rewrite it")
        return value


def _digests(recorded) -> list[str]:
    """A manifest checksum entry as a list: one digest, or two during a swap."""
    if recorded is None:
        return []
    return list(recorded) if isinstance(recorded, list) else [recorded]


def weights_bytes(model: keras.Model) -> int:
    """About what `model.save_weights` writes: every weight and optimizer variable."""
    variables = list(model.weights)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)


def _dump_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=1)


def open_finished(path: str, kind: str, flag: str) -> Run:
    """A run directory to read from (pretrained backbone, classifier for predict.py).

    Raises RunError when it is not a run of `kind` written by this version. An unfinished run
    (still training, or killed) may be read, with a warning: its best epoch so far is on disk.
    """
    manifest = read_json_file(os.path.join(path, MANIFEST)) if os.path.isdir(path) else None
    if not isinstance(manifest, dict) or manifest.get("kind") != kind:
        what = "train_bert_lm.py" if kind == "pretrain" else \
            "train_bert_fine_tuning.py or train_transform.py"
        found = "" if manifest is None else \
            f" (its {MANIFEST} says kind {manifest.get('kind')!r})" \
            if isinstance(manifest, dict) else f" (its {MANIFEST} is not an object)"
        raise RunError(f"{flag}={path} is not a run directory of {what}{found}; point it at "
                       f"the directory that script wrote")
    if manifest.get("status") != "finished":
        print(f"warning: {path}: the run is not finished; using its best epoch so far",
              file=sys.stderr)
    return Run(path, kind, manifest)


# ---------------------------------------------------------------------------- opening to train
def open_for_training(path: str, kind: str, fingerprint: dict, overwrite: bool,
                      flag: str = "--ckpt_dir", test_run: bool = False) -> tuple[Run, bool]:
    """Lock `path` and decide: start fresh, resume, or refuse. Returns (run, resuming).

    `fingerprint`: everything the run's results depend on (data checksums, vocabulary, labels,
    model config, training settings), JSON-serialisable. Call it after the inputs have been
    checked, so that a typo never costs a finished model. `test_run`: this is a quick trial,
    which may replace an earlier finished trial (fingerprint with test_mode) without asking.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunError(f"{flag}={path} is a file; give a directory (it is created if missing)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise RunError(f"{flag}={path}: cannot create it ({error.strerror}); choose another "
                       "directory") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunError(f"{flag}={path} is not writable; choose another directory")
    fingerprint = json.loads(json.dumps(fingerprint))  # as it will read back from the file
    run = Run(path, kind, {})
    _lock(run, flag)
    try:
        for directory in (path, os.path.join(path, BACKUP)):
            data_util.remove_dead_temporaries(directory)
        resuming = _decide(run, fingerprint, overwrite, flag, test_run)
    except BaseException:
        run.release()
        raise
    return run, resuming


def open_for_worker(path: str, kind: str, fingerprint: dict, overwrite: bool) -> Run:
    """The run of a worker that is not the chief, in multi-worker training: a scratch directory,
    removed at exit, for the artefacts every worker's callbacks write (only the chief's `path`
    is the user's). It starts with a copy of the chief's epoch backup when the chief will resume
    from it (the same rule as open_for_training's), so that every worker restores the same
    epoch; the workers must therefore see `path` (one machine, or a shared file system)."""
    _remove_dead_workers_scratch()
    scratch = tempfile.mkdtemp(prefix=f"{WORKER_SCRATCH_PREFIX}{os.getpid()}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    manifest = read_json_file(os.path.join(path, MANIFEST), None) \
        if os.path.isfile(os.path.join(path, MANIFEST)) else None
    fingerprint = json.loads(json.dumps(fingerprint))
    backup = os.path.join(path, BACKUP)
    if _resumes(manifest, kind, fingerprint, overwrite) and os.path.isdir(backup):
        shutil.copytree(backup, os.path.join(scratch, BACKUP))
    run = Run(scratch, kind, {})
    _start(run, fingerprint)
    return run


WORKER_SCRATCH_PREFIX = "bert_lm-worker-"


def _remove_dead_workers_scratch() -> None:
    """A killed worker never reaches its exit handler; its scratch run goes on the next start."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        pid = name[len(WORKER_SCRATCH_PREFIX):].split("-", 1)[0]
        if name.startswith(WORKER_SCRATCH_PREFIX) and pid.isdigit() \
                and not data_util.process_alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _lock(run: Run, flag: str) -> None:
    lock = run.file(LOCK)
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is not None:
                raise RunError(f"{flag}={run.path} is in use by another run (PID {holder}, see "
                               f"{lock}); wait for it to end or choose another directory")
            data_util.remove_quietly(lock)  # its holder was killed
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        run._locked = True
        atexit.register(run.release)
        HELD.append(run)
        return
    raise RunError(f"{lock}: cannot take the lock; remove the file if no run is using "
                   f"{run.path}")


def _read_lock(lock: str) -> str | None:
    """The holder's PID (as text) while it may be alive; None for a dead holder."""
    try:
        with open(lock, encoding="utf-8") as f:
            pid, _, host = f.read().strip().partition(" ")
    except FileNotFoundError:
        return None
    if not pid.isdigit():
        return None
    if host and host != socket.gethostname():
        return f"{pid} on {host}"  # cannot tell whether it lives: assume it does
    return pid if data_util.process_alive(int(pid)) and int(pid) != os.getpid() else None


def _resumes(manifest, kind: str, fingerprint: dict, overwrite: bool) -> bool:
    """Whether a run directory with this manifest resumes: an unfinished run of this kind made
    with the same fingerprint, and no --overwrite."""
    return isinstance(manifest, dict) and manifest.get("kind") == kind \
        and manifest.get("status") != "finished" \
        and manifest.get("fingerprint") == fingerprint and not overwrite


def _decide(run: Run, fingerprint: dict, overwrite: bool, flag: str, test_run: bool) -> bool:
    try:
        manifest = read_json_file(run.file(MANIFEST))
    except RunError:
        manifest = "damaged"
    leftovers = [name for name in os.listdir(run.path)
                 if name in ARTEFACTS or name in ARTEFACT_DIRS]
    if _resumes(manifest, run.kind, fingerprint, overwrite):
        run.manifest = manifest
        return True
    earlier_trial = isinstance(manifest, dict) and manifest.get("kind") == run.kind \
        and manifest.get("status") == "finished" \
        and manifest.get("fingerprint", {}).get("test_mode") is True
    if overwrite or (manifest is None and not leftovers) or (test_run and earlier_trial):
        _clear(run)
        return _start(run, fingerprint)
    if not isinstance(manifest, dict):
        raise RunError(f"{flag}={run.path} holds files of an earlier run but no readable "
                       f"{MANIFEST} (written by an older version, or damaged); pass "
                       "--overwrite=True to replace them, or choose another directory")
    if manifest.get("kind") != run.kind:
        raise RunError(f"{flag}={run.path} holds a {manifest.get('kind')} run, not a {run.kind} "
                       "run; choose another directory")
    if manifest.get("status") == "finished":
        raise RunError(f"{flag}={run.path} holds a finished run ({_describe(manifest)}); pass "
                       "--overwrite=True to replace it, or choose another directory")
    saved = manifest.get("fingerprint", {})
    changed = sorted(k for k in set(fingerprint) | set(saved) if fingerprint.get(k) != saved.get(k))
    listed = "; ".join(_difference(k, saved, fingerprint) for k in changed[:6]) + \
        (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
    raise RunError(f"{flag}={run.path} holds an unfinished run made with other data or settings "
                   f"({listed}); rerun its original command to resume it, "
                   "pass --overwrite=True to start afresh, or choose another directory")


def _difference(key: str, then: dict, now: dict) -> str:
    """One setting of a refused resume, with both values where they are short enough to read
    (so the user sees which flag value would resume it)."""
    if key not in then:
        return f"{key}: not recorded (the run began under an older version)"
    if key not in now:
        return f"{key}: no longer a setting"
    before, after = repr(then[key]), repr(now[key])
    return f"{key}: {before} then, {after} now" if len(before + after) <= 40 else f"{key}: changed"


def _describe(manifest: dict) -> str:
    summary = manifest.get("summary", {})
    scores = ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if isinstance(v, float))
    return f"finished {manifest.get('finished', '?')}" + (f", {scores}" if scores else "")


def _clear(run: Run) -> None:
    for name in ARTEFACTS + (MANIFEST,):
        data_util.remove_quietly(run.file(name))
    for name in ARTEFACT_DIRS:
        shutil.rmtree(run.file(name), ignore_errors=True)


def _start(run: Run, fingerprint: dict) -> bool:
    run.manifest = {"kind": run.kind, "status": "running", "fingerprint": fingerprint,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "checksums": {}}
    run._save_manifest()
    return False


# ---------------------------------------------------------------------------- epochs
class EpochBackup(keras.callbacks.Callback):
    """Saves the model (and optimizer) state at each epoch's end, the last writer of the epoch,
    so that a rerun resumes after the last complete epoch. List it after every callback that
    writes the epoch's artefacts (best weights, history)."""

    def __init__(self, run: Run, best: "BestEpoch"):
        super().__init__()
        self.run, self.best = run, best
        self.directory = run.file(BACKUP)

    def on_epoch_end(self, epoch, logs=None):
        self._save(epoch + 1, done=False)

    def on_train_end(self, logs=None):
        self._save(self.state().get("epoch", 0), done=True, weights=False)

    def state(self) -> dict:
        return read_json_file(os.path.join(self.directory, "state.json"), {})

    def _save(self, epoch: int, done: bool, weights: bool = True) -> None:
        os.makedirs(self.directory, exist_ok=True)
        previous = self.state()
        name = previous.get("weights")
        if weights:
            name = f"epoch-{epoch:04d}.weights.h5"
            path = os.path.join(self.directory, name)
            data_util.ensure_free_space(path, weights_bytes(self.model))
            write_atomically(path, self.model.save_weights)
        write_json_file(os.path.join(self.directory, "state.json"),
                        {"epoch": epoch, "weights": name, "training_done": done,
                         **self.best.state()})
        if previous.get("weights") not in (None, name):
            data_util.remove_quietly(os.path.join(self.directory, previous["weights"]))


def restore(run: Run, model: keras.Model, epochs: int) -> tuple[int, bool, dict]:
    """Load the last complete epoch's backup into `model` (built and compiled).

    Returns (epochs already done, whether training had ended, the best-epoch state saved with
    the backup) — (0, False, {}) for a fresh run."""
    state = read_json_file(os.path.join(run.file(BACKUP), "state.json"), {})
    if not state.get("weights"):
        return 0, False, {}
    # the optimizer's slots belong to the strategy the model was built under, whatever scope
    # the caller is in now (the classifier scripts restore outside theirs)
    with model.distribute_strategy.scope():
        model.optimizer.build(model.trainable_variables)
    try:
        model.load_weights(os.path.join(run.file(BACKUP), state["weights"]))
    except (OSError, ValueError) as error:
        raise RunError(f"{run.file(BACKUP)}: the backup does not load ({str(error)[:100]}); pass "
                       "--overwrite=True to start afresh") from None
    done = bool(state.get("training_done"))
    print(f"resuming from epoch {state['epoch']} of {epochs}"
          + (" (training had ended; writing the reports)" if done else ""), flush=True)
    return int(state["epoch"]), done, {k: state[k] for k in ("best", "best_epoch") if k in state}


class BestEpoch(keras.callbacks.Callback):
    """Keeps the best epoch's weights (by `monitor`), writes best.json and the history each
    epoch (its logs and its wall time in seconds), and stops after `patience` epochs without
    improvement (0: never). Its state travels with the epoch backup, so a resumed run continues
    the same count."""

    def __init__(self, run: Run, monitor: str, mode: str, save: Callable[[], None],
                 patience: int = 0, restored: dict | None = None):
        super().__init__()
        self.run, self.monitor, self.mode, self.save, self.patience = run, monitor, mode, save, \
            patience
        restored = restored or {}
        self.best, self.best_epoch = restored.get("best"), restored.get("best_epoch", 0)
        self.epoch_start = time.monotonic()

    def state(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        seconds = round(time.monotonic() - self.epoch_start, 1)
        value = logs.get(self.monitor)
        if value is not None and self.improved(float(value)):
            self.best, self.best_epoch = float(value), epoch + 1
            self.save()
            self.run.write_json(BEST, {"best": self.best, "epoch": epoch + 1,
                                       "monitor": self.monitor})
            print(f"\nepoch {epoch + 1}: {self.monitor} improved to {value:.4f}, saved")
        history = [h for h in read_json_file(self.run.file(HISTORY), []) if h["epoch"] <= epoch]
        history.append({"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()},
                        "seconds": seconds})
        self.run.write_json(HISTORY, history)
        if self.patience and epoch + 1 - self.best_epoch >= self.patience:
            print(f"\nepoch {epoch + 1}: no better {self.monitor} for {self.patience} epochs; "
                  f"stopping (best: epoch {self.best_epoch})")
            self.model.stop_training = True
