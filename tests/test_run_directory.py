"""The run directory's rules, on real directories, real processes and real Keras weights."""
import errno
import json
import os
import re
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

import data_util_hdf5 as data_util
import run_directory


def open_run(path, fingerprint=None, overwrite=False, test_run=False, kind="classifier"):
    return run_directory.open_for_training(str(path), kind,
                                           fingerprint or {"data": "a", "test_mode": False},
                                           overwrite, test_run=test_run)


def test_fresh_then_resume_then_refuse_other_settings(tmp_path):
    run, resuming = open_run(tmp_path / "r")
    assert not resuming and json.load(open(run.file(run_directory.MANIFEST)))["status"] == "running"
    run.write_json(run_directory.CONFIG, {"d_model": 32})
    run.release()
    run, resuming = open_run(tmp_path / "r")
    assert resuming
    run.release()
    with pytest.raises(run_directory.RunError,
                       match=r"unfinished run made with other data or settings "
                             r"\(data: 'a' then, 'b' now\).*--overwrite=True"):
        open_run(tmp_path / "r", {"data": "b", "test_mode": False})
    with pytest.raises(run_directory.RunError,
                       match=r"\(data: 'a' then, 'b' now; learning_rate: not recorded \(the "
                             r"run began under an older version\); "
                             r"test_mode: no longer a setting\)"):
        open_run(tmp_path / "r", {"data": "b", "learning_rate": 0.001})
    assert not os.path.exists(tmp_path / "r" / run_directory.LOCK), "a refused run keeps no lock"


def test_a_finished_run_is_only_replaced_when_asked(tmp_path):
    run, _ = open_run(tmp_path / "r")
    run.write_json(run_directory.CONFIG, {"d_model": 32})
    (tmp_path / "r" / "my_notes.txt").write_text("mine")
    run.finish({"test_f1": 0.8123})
    run.release()
    with pytest.raises(run_directory.RunError,
                       match="holds a finished run .*test_f1 0.8123.*--overwrite"):
        open_run(tmp_path / "r")
    # a trial never replaces a real run
    with pytest.raises(run_directory.RunError, match="finished run"):
        open_run(tmp_path / "r", {"data": "a", "test_mode": True}, test_run=True)
    assert json.load(open(tmp_path / "r" / run_directory.CONFIG)) == {"d_model": 32}
    run, resuming = open_run(tmp_path / "r", overwrite=True)
    assert not resuming and not os.path.exists(run.file(run_directory.CONFIG))
    assert (tmp_path / "r" / "my_notes.txt").read_text() == "mine", "only our files are cleared"
    run.release()


def test_a_trial_replaces_an_earlier_finished_trial(tmp_path):
    run, _ = open_run(tmp_path / "r", {"data": "a", "test_mode": True}, test_run=True)
    run.release()
    with pytest.raises(run_directory.RunError, match="unfinished run"):  # it may want resuming
        open_run(tmp_path / "r", {"data": "b", "test_mode": True}, test_run=True)
    run, _ = open_run(tmp_path / "r", {"data": "a", "test_mode": True}, test_run=True)
    run.finish({})
    run.release()
    run, resuming = open_run(tmp_path / "r", {"data": "b", "test_mode": True}, test_run=True)
    assert not resuming
    run.release()


def test_files_of_an_unknown_run_are_refused(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / run_directory.HISTORY).write_text("[]")
    with pytest.raises(run_directory.RunError, match="no readable run.json"):
        open_run(tmp_path / "r")
    open_run(tmp_path / "r", overwrite=True)[0].release()
    (tmp_path / "file").write_text("x")
    with pytest.raises(run_directory.RunError, match="is a file"):
        open_run(tmp_path / "file")


def test_the_lock_keeps_a_second_run_out_and_a_dead_holder_does_not(tmp_path, dead_pid):
    directory = tmp_path / "r"
    directory.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (directory / run_directory.LOCK).write_text(f"{holder.pid} {socket.gethostname()}\n")
        with pytest.raises(run_directory.RunError,
                           match=f"in use by another run \\(PID {holder.pid}"):
            open_run(directory)
    finally:
        holder.kill()
        holder.wait()
    (directory / run_directory.LOCK).write_text(f"{dead_pid} {socket.gethostname()}\n")
    run, _ = open_run(directory)
    assert (directory / run_directory.LOCK).read_text().split()[0] == str(os.getpid())
    run.release()
    assert not (directory / run_directory.LOCK).exists()


def test_leftover_temporaries_of_dead_writers_are_swept(tmp_path, dead_pid):
    directory = tmp_path / "r"
    (directory / run_directory.BACKUP).mkdir(parents=True)
    dead = directory / run_directory.BACKUP / f".tmp-{dead_pid}-epoch-0001.weights.h5"
    alive = directory / f".tmp-{os.getpid()}-vocab.txt"
    dead.write_bytes(b"half")
    alive.write_text("being written")
    open_run(directory, overwrite=True)[0].release()
    assert not dead.exists() and alive.exists()


def test_an_interrupted_write_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "thresholds.json")
    run_directory.write_json_file(path, {"v": 1})

    def half_then_crash(temporary):
        with open(temporary, "w") as f:
            f.write('{"v": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_directory.write_atomically(path, half_then_crash)
    assert run_directory.read_json_file(path) == {"v": 1}
    assert os.listdir(tmp_path) == ["thresholds.json"]


def test_a_failed_write_names_the_artefact_and_says_a_rerun_resumes(tmp_path, monkeypatch):
    run, _ = open_run(tmp_path / "r")
    vocab = data_util.Vocabulary(data_util.SPECIAL_TOKENS + ["a"])

    def refused(path, text):
        raise PermissionError(errno.EACCES, "Permission denied")

    with monkeypatch.context() as patch:
        patch.setattr(data_util, "write_utf8", refused)
        # vocab.save writes atomically too: the temporary's own temporary must not be named
        vocab_file = re.escape(run.file(run_directory.VOCAB))
        with pytest.raises(data_util.DataError, match=f"^{vocab_file}: cannot write "
                           r"\(Permission denied\); fix the permissions"):
            run.write(run_directory.VOCAB, vocab.save)

    def full(temporary):
        raise OSError(errno.ENOSPC, "No space left on device")

    history_file = re.escape(run.file(run_directory.HISTORY))
    with pytest.raises(data_util.DiskFullError, match=f"^{history_file}: no space left on the "
                       "device; .* rerun the same command to resume$"):
        run.write(run_directory.HISTORY, full)
    assert sorted(os.listdir(run.path)) == [run_directory.LOCK, run_directory.MANIFEST]
    run.write(run_directory.VOCAB, vocab.save)
    assert data_util.Vocabulary.load(run.verified(run_directory.VOCAB)).tokens == vocab.tokens
    assert not [name for name in os.listdir(run.path) if name.startswith(".tmp-")]
    run.release()


def test_a_directory_is_swapped_in_whole(tmp_path, dead_pid):
    export = str(tmp_path / "export")

    def saved_model(version, then_fail=False):
        def write(temporary):
            os.makedirs(os.path.join(temporary, "variables"))
            with open(os.path.join(temporary, "saved_model.pb"), "w") as f:
                f.write(version)
            if then_fail:
                raise KeyboardInterrupt
        return write

    def version():
        return open(os.path.join(export, "saved_model.pb")).read()

    (tmp_path / f".tmp-{dead_pid}-export").mkdir()  # a killed export's leftover
    data_util.write_directory_atomically(export, saved_model("1"))
    data_util.write_directory_atomically(export, saved_model("2"))
    assert version() == "2" and os.listdir(tmp_path) == ["export"]
    with pytest.raises(KeyboardInterrupt):
        data_util.write_directory_atomically(export, saved_model("3", then_fail=True))
    assert version() == "2" and os.listdir(tmp_path) == ["export"]


def test_checksums_catch_an_edited_file(tmp_path):
    run, _ = open_run(tmp_path / "r")
    run.write_text(run_directory.VOCAB, "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n北京\n上海\n")
    run.write_json(run_directory.DATA_CONFIG, {"tokenize_style": "space"})
    run.finish({})
    run.release()
    done = run_directory.open_finished(str(tmp_path / "r"), "classifier", "--ckpt_dir")
    assert data_util.Vocabulary.load(done.verified(run_directory.VOCAB)).id_of("上海") == 6
    assert done.read_json_object(run_directory.DATA_CONFIG) == {"tokenize_style": "space"}
    (tmp_path / "r" / \
     run_directory.VOCAB).write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n上海\n北京\n")
    with pytest.raises(run_directory.RunError, match="vocab.txt has changed since training"):
        done.verified(run_directory.VOCAB)
    with pytest.raises(run_directory.RunError, match="labels.txt is missing"):
        done.verified(run_directory.LABELS)
    with pytest.raises(run_directory.RunError, match="not a run directory of train_bert_lm.py"):
        run_directory.open_finished(str(tmp_path / "r"), "pretrain", "--pretrained_dir")
    with pytest.raises(run_directory.RunError, match="not a run directory"):
        run_directory.open_finished(str(tmp_path), "classifier", "--ckpt_dir")


def test_no_write_starts_without_room_for_it(tmp_path):
    with pytest.raises(data_util.DiskFullError, match="not enough disk space"):
        data_util.ensure_free_space(str(tmp_path / "big.h5"), 1 << 60)


# ------------------------------------------------------------------------- epochs
def tiny_model() -> keras.Model:
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    net.compile(keras.optimizers.Adam(0.01), "mse")
    return net


def fit(net, run, epochs, patience=0, restored=None, initial_epoch=0):
    best = run_directory.BestEpoch(run, "loss", "min",
                                   lambda: run.save_weights(net, run_directory.CLASSIFIER_WEIGHTS),
                                   patience, restored)
    x = np.random.default_rng(0).normal(size=(32, 3))
    # Unshuffled: a reordered sum shifts the mean loss in its last bits, which a frozen model
    # (learning rate 0) would otherwise count as an improvement.
    net.fit(x, x[:, :2] * 2, epochs=epochs, initial_epoch=initial_epoch, verbose=0,
            shuffle=False, callbacks=[best, run_directory.EpochBackup(run, best)])


def test_the_backup_restores_weights_optimizer_and_best_epoch(tmp_path):
    run, _ = open_run(tmp_path / "r")
    net = tiny_model()
    fit(net, run, epochs=2)
    assert sorted(os.listdir(run.file(run_directory.BACKUP))) == [
                  "epoch-0002.weights.h5", "state.json"]
    again = tiny_model()
    done, ended, best = run_directory.restore(run, again, epochs=5)
    assert (done, ended) == (2, True) and best["best_epoch"] == 2
    for a, b in zip(net.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(again.optimizer.iterations.numpy()) == int(net.optimizer.iterations.numpy()) > 0
    history = run_directory.read_json_file(run.file(run_directory.HISTORY))
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(isinstance(h["seconds"], float) and h["seconds"] >= 0 for h in history)
    fit(again, run, epochs=4, restored=best, initial_epoch=done)
    assert [h["epoch"] for h in run_directory.read_json_file(
        run.file(run_directory.HISTORY))] == [1, 2, 3, 4]
    run.release()


def test_a_model_built_under_a_strategy_restores_outside_its_scope(tmp_path):
    """The classifier scripts build under strategy.scope() and restore after leaving it; the
    optimizer's slots must still be made under the model's own strategy."""
    import tensorflow as tf

    run, _ = open_run(tmp_path / "r")
    fit(tiny_model(), run, epochs=1)
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        again = tiny_model()
    done, _, _ = run_directory.restore(run, again, epochs=3)
    assert done == 1 and int(again.optimizer.iterations.numpy()) > 0
    run.release()


def test_patience_stops_a_stalled_run_and_survives_a_resume(tmp_path):
    run, _ = open_run(tmp_path / "r")
    net = tiny_model()
    net.optimizer.learning_rate.assign(0.0)  # the loss cannot improve after epoch 1
    fit(net, run, epochs=10, patience=2)
    assert [h["epoch"] for h in run_directory.read_json_file(
        run.file(run_directory.HISTORY))] == [1, 2, 3]
    done, ended, best = run_directory.restore(run, tiny_model(), epochs=10)
    assert (done, ended, best["best_epoch"]) == (3, True, 1)
    run.release()


def test_a_kill_between_checksum_and_rename_leaves_a_verifiable_file(tmp_path, monkeypatch):
    run, _ = open_run(tmp_path / "r")
    run.write_text(run_directory.LABELS, "a\nb\n")

    real_replace = os.replace

    def killed(source, target):
        # SIGKILL after the manifest's update, before the rename
        if target.endswith(run_directory.LABELS):
            raise KeyboardInterrupt
        real_replace(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(run_directory.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            run.write_text(run_directory.LABELS, "b\na\n")
    reopened = run_directory.open_finished(str(tmp_path / "r"), "classifier", "--ckpt_dir")
    assert len(reopened.manifest["checksums"][run_directory.LABELS]) == 2, "both digests allowed"
    assert open(reopened.verified(run_directory.LABELS)).read() == "a\nb\n"
    run.finish({})
    assert isinstance(run_directory.read_json_file(run.file(run_directory.MANIFEST))[
                      "checksums"][run_directory.LABELS], str)
    run.release()
