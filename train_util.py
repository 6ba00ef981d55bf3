"""Pieces every training script shares: distribution, optimiser, F1, callbacks, reports."""
from __future__ import annotations

import errno
import os
import sys
import time
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import flags
from sklearn.metrics import f1_score, precision_recall_fscore_support

import model

STRATEGIES = ("one_device", "mirrored", "multi_worker_mirrored", "tpu")
FLAGS = flags.FLAGS


def define_common_flags(learning_rate: float, weight_decay: float, test_mode_help: str,
                        num_epochs: int | None = 10,
                        num_epochs_help: str = "Passes over the training data.") -> None:
    """Flags every training script has, with the same meaning everywhere."""
    flags.DEFINE_boolean("test_mode", False, test_mode_help)
    flags.DEFINE_string("data_path", None, "Directory of the sample data; built there on first "
                        "use when it is missing. Default: data/ next to these scripts.")
    flags.DEFINE_string("cache_dir", None, "Where tokenized HDF5 caches go. Default: cache/ next "
                        "to the input text file.")
    flags.DEFINE_enum("tokenize_style", None, ["space", "word", "char"], "How text becomes "
                      "tokens: 'space' for already segmented text (the sample data and the "
                      "original's format), 'word' for jieba segmentation of raw Chinese, 'char' "
                      "for one token per character. Default: space; fine-tuning takes the "
                      "pretraining run's and refuses a different one.")
    flags.DEFINE_float("learning_rate", learning_rate, "Peak Adam learning rate.")
    flags.DEFINE_integer("warmup_steps", None, "Steps of linear learning-rate warm-up from 0; 0 "
                         "turns it off. Default: a tenth of the run's steps for a classifier (a "
                         "fresh head and post-LN blocks both start badly with a full step), a "
                         "tenth of an epoch when pretraining a Transformer, else 0.")
    flags.DEFINE_integer("decay_steps", None, "Give it for the original's exponential decay, lr * "
                         "decay_rate^(step / decay_steps). Default: after warm-up the rate falls "
                         "linearly to 0 at the run's last step (--num_epochs x steps an epoch), "
                         "so the schedule fits the data size.")
    flags.DEFINE_float("decay_rate", 0.95, "Exponential decay factor; used with --decay_steps.")
    flags.DEFINE_float("weight_decay", weight_decay, "Decoupled weight decay (AdamW) standing in "
                       "for the original's L2 term; 0 turns it off.")
    flags.DEFINE_float("dropout_keep_prob", 0.9, "1 - dropout rate, as in the original.")
    flags.DEFINE_integer("batch_size", 64, "Examples per step, over all replicas.")
    flags.DEFINE_integer("num_epochs", num_epochs, num_epochs_help, lower_bound=1)
    flags.DEFINE_integer("process_num", None, "Tokenizing processes. Default: the number of cores "
                         "for --tokenize_style=word, 1 for char and space (splitting is cheaper "
                         "than shipping lines to workers).")
    flags.DEFINE_string("encoding", "utf-8", "Text encoding of the input files, e.g. gb18030 for "
                        "GBK files.")
    flags.DEFINE_enum("distribution_strategy", "one_device", list(STRATEGIES),
                      "tf.distribute strategy to build and train under (mirrored: all local "
                      "GPUs; multi_worker_mirrored: TF_CONFIG cluster; tpu).")
    flags.DEFINE_boolean("jit_compile", False, "Compile the train step with XLA.")
    flags.DEFINE_integer("seed", 42, "Random seed for splits, initialisation, shuffling, masking.")
    flags.DEFINE_boolean("overwrite", False, "Replace what the run directory holds: a finished "
                         "run, or an unfinished one made with other data or settings. Without "
                         "it such a directory is refused, and rerunning an interrupted command "
                         "resumes it. A test-mode run may replace an earlier finished test-mode "
                         "run.")


def validate_common_flags() -> None:
    """Refuse, in one line each, the values of the shared flags that cannot work; called before
    any file is read or written."""
    import data_util_hdf5 as data_util

    checks = [("batch_size", FLAGS.batch_size >= 1, "at least 1"),
              ("learning_rate", FLAGS.learning_rate > 0, "above 0"),
              ("dropout_keep_prob", 0 < FLAGS.dropout_keep_prob <= 1, "in (0, 1]"),
              ("warmup_steps", (FLAGS.warmup_steps or 0) >= 0, "0 or more"),
              ("decay_steps", FLAGS.decay_steps is None or FLAGS.decay_steps >= 1,
               "at least 1"),
              ("decay_rate", 0 < FLAGS.decay_rate <= 1, "in (0, 1]"),
              ("weight_decay", FLAGS.weight_decay >= 0, "0 or more"),
              ("process_num", FLAGS.process_num is None or FLAGS.process_num >= 1, "at least 1")]
    check_flag_values(checks)
    try:
        data_util.check_encoding(FLAGS.encoding)
    except data_util.DataError as error:
        raise UsageError(str(error)) from None
    if FLAGS.cache_dir:
        check_writable_directory(FLAGS.cache_dir, "--cache_dir")


def check_flag_values(checks: list[tuple[str, bool, str]]) -> None:
    """`checks`: (flag name, whether its value is fine, what it must be)."""
    for name, fine, wanted in checks:
        if not fine:
            raise UsageError(f"--{name}={FLAGS[name].value} must be {wanted}")


def check_writable_directory(path: str, flag: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag}={path} is a file; give a directory")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(os.path.abspath(probe))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}={path} is not writable; choose another directory")


def run_dir_flag(name: str) -> str:
    """A run-directory flag's value. In test mode its default gains a test_ prefix (runs/lm ->
    runs/test_lm), so a quick trial never touches the model a real run left there."""
    value = FLAGS[name].value
    if FLAGS.test_mode and not FLAGS[name].present:
        head, tail = os.path.split(os.path.normpath(value))
        value = os.path.join(head, f"test_{tail}")
    return value


# Flags that change where things go or how fast they run, not what a run computes: a run may
# resume with other values of these.
RESUME_NEUTRAL_FLAGS = {"ckpt_dir", "ckpt_dir_save", "overwrite", "process_num", "cache_dir",
                        "data_path", "training_data_file", "valid_data_file", "test_data_file",
                        "mask_lm_source_file", "pretrained_dir", "jit_compile",
                        "distribution_strategy"}


FOREIGN_FLAG_MODULES = ("absl", "tensorflow", "keras")


def run_fingerprint(files: dict[str, str], **extra) -> dict:
    """What a run's results depend on: the sha256 of each input file, every flag of this
    project's modules and scripts (but RESUME_NEUTRAL_FLAGS), and `extra`. A run directory
    resumes only under the same fingerprint."""
    import data_util_hdf5 as data_util

    values = {flag.name: flag.value for module, defined in FLAGS.flags_by_module_dict().items()
              if not module.startswith(FOREIGN_FLAG_MODULES) for flag in defined
              if flag.name not in RESUME_NEUTRAL_FLAGS}
    return {"files": {name: data_util.file_fingerprint(path) for name, path in files.items()},
            **values, **extra}


def define_model_flags(default_backbone: str = "textcnn") -> None:
    """Architecture flags shared by the scripts that build a backbone from nothing."""
    flags.DEFINE_enum("backbone", default_backbone, ["textcnn", "transformer"],
                      "Which backbone: the original's TextCNN or a Transformer encoder.")
    flags.DEFINE_enum("preset", "small", ["tiny", "small", "big"], "Model size preset (the "
                      "original's tiny 64/8, small 128/16, big 512/64: d_model/d_k; 8 heads, 6 "
                      "layers); the flags below override single values.")
    flags.DEFINE_integer("d_model", None, "Hidden size. Default: from --preset.")
    flags.DEFINE_integer("num_layer", None, "Transformer blocks. Default: from --preset.")
    flags.DEFINE_integer("num_header", None, "Attention heads. Default: from --preset.")
    flags.DEFINE_integer("d_k", None, "Key/query size per head. Default: from --preset.")
    flags.DEFINE_integer("d_v", None, "Value size per head. Default: from --preset.")
    flags.DEFINE_integer("max_position", 512, "Rows of the position table: the longest sequence "
                         "any later step (fine-tuning, prediction) may use.")
    flags.DEFINE_integer("vocab_size", 30000, "Vocabulary size including the 5 special tokens; "
                         "the most frequent tokens of the corpus are kept.")


# A classifier's default number of epochs gives it at least this many steps: a labelled set of
# 1,000 lines is 16 steps an epoch, and ten such epochs barely move a fresh head.
MIN_CLASSIFIER_STEPS = 1000
CLASSIFIER_EPOCHS_RANGE = (10, 100)


def epochs_to_run(test_mode_default: int, steps_per_epoch: int | None = None) -> int:
    """--num_epochs; in test mode a short default unless it is given; when the flag has no
    default (the classifiers), enough epochs for MIN_CLASSIFIER_STEPS steps, within
    CLASSIFIER_EPOCHS_RANGE."""
    if FLAGS.test_mode and not FLAGS["num_epochs"].present:
        return test_mode_default
    if FLAGS.num_epochs:
        return FLAGS.num_epochs
    low, high = CLASSIFIER_EPOCHS_RANGE
    return int(np.clip(-(-MIN_CLASSIFIER_STEPS // max(steps_per_epoch or 1, 1)), low, high))


def config_from_flags(vocab_size: int, preset: str):
    """ModelConfig from --preset with the single-value flags laid over it."""
    import model
    return model.config_from_preset(
        preset, backbone=FLAGS.backbone, vocab_size=vocab_size, d_model=FLAGS.d_model,
        num_layer=FLAGS.num_layer, num_header=FLAGS.num_header, d_k=FLAGS.d_k, d_v=FLAGS.d_v,
        dropout=1.0 - FLAGS.dropout_keep_prob, max_position=FLAGS.max_position)


# ----------------------------------------------------------------------------- distribution
def start_run() -> tuple["Timer", tf.distribute.Strategy]:
    """What every training script does first: start the clock, seed everything, pick the
    --distribution_strategy and say how many replicas it trains on."""
    timer = Timer()
    keras.utils.set_random_seed(FLAGS.seed)
    strategy = get_distribution_strategy(FLAGS.distribution_strategy)
    print(f"distribution: {FLAGS.distribution_strategy}, "
          f"num_replicas_in_sync={strategy.num_replicas_in_sync}")
    return timer, strategy


def get_distribution_strategy(name: str) -> tf.distribute.Strategy:
    """Map the --distribution_strategy flag to a tf.distribute strategy (one_device = no-op)."""
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as error:
            raise UsageError(f"--distribution_strategy=tpu: no TPU found "
                             f"({str(error).splitlines()[0][:100]}); run on a TPU host or drop "
                             "the flag") from None
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"--distribution_strategy={name!r} is not one of {', '.join(STRATEGIES)}")


def split_cpu_for_testing(count: int) -> None:
    """Expose `count` logical CPU devices (to try MirroredStrategy on a machine without GPUs)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])


# ------------------------------------------------------------------------------- optimiser
@keras.saving.register_keras_serializable(package="bert_lm")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `learning_rate` over `warmup_steps`, then a decay.

    With `decay_steps` None (the default): linear decay to 0 at `total_steps`, so the schedule
    fits the run's real length whatever the data size. With `decay_steps` given: the original's
    exponential decay, lr * decay_rate^(step / decay_steps).
    """

    def __init__(self, learning_rate: float, total_steps: int, warmup_steps: int = 0,
                 decay_steps: int | None = None, decay_rate: float = 0.95):
        self.learning_rate = learning_rate
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.decay_rate = decay_rate

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        if self.decay_steps:
            decayed = self.learning_rate * keras.ops.power(
                self.decay_rate, step / float(self.decay_steps))
        else:
            span = float(max(self.total_steps - self.warmup_steps, 1))
            decayed = self.learning_rate * keras.ops.clip((self.total_steps - step) / span,
                                                          0.0, 1.0)
        if self.warmup_steps <= 0:
            return decayed
        warm = self.learning_rate * (step + 1.0) / float(self.warmup_steps)
        return keras.ops.where(step < self.warmup_steps, warm, decayed)

    def get_config(self) -> dict:
        return {"learning_rate": self.learning_rate, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps,
                "decay_rate": self.decay_rate}


@keras.saving.register_keras_serializable(package="bert_lm")
class DiscriminativeAdamW(keras.optimizers.AdamW):
    """AdamW in which some variables (a pretrained backbone) take steps `scale` times smaller.

    Scaling their gradients would not do it: Adam divides the scale out again. The scale lives in
    a variable so that a callback can hold it at 0 for the first epochs (gradual unfreezing)
    without retracing the train step.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._scaled_keys: set = set()
        self.scale = 1.0
        self.current_scale = keras.Variable(1.0, trainable=False, name="variable_lr_scale")

    def scale_learning_rate(self, variables: list, scale: float) -> None:
        self._scaled_keys = {self._var_key(v) for v in variables}
        self.scale = scale
        self.current_scale.assign(scale)

    def update_step(self, gradient, variable, learning_rate):
        if self._var_key(variable) in self._scaled_keys:
            learning_rate = learning_rate * keras.ops.cast(self.current_scale, "float32")
        super().update_step(gradient, variable, learning_rate)


def make_optimizer(learning_rate: float, total_steps: int, warmup_steps: int = 0,
                   decay_steps: int | None = None, decay_rate: float = 0.95,
                   weight_decay: float = 0.0, clip_norm: float = 5.0) -> DiscriminativeAdamW:
    """Adam(W) with warm-up + decay and global-norm clipping at 5, as the original."""
    schedule = WarmupDecay(learning_rate, total_steps, warmup_steps, decay_steps, decay_rate)
    optimizer = DiscriminativeAdamW(schedule, weight_decay=weight_decay, global_clipnorm=clip_norm)
    # LayerNorm scales and biases are not weights to shrink towards zero.
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "layer_norm"])
    return optimizer


# ------------------------------------------------------------------------------------ F1
def predict_labels(probabilities: np.ndarray, thresholds: np.ndarray | None = None) -> np.ndarray:
    """Every label whose probability reaches its threshold, or the single label closest to its
    threshold when none does. thresholds None: 0.5 for every label, the original's rule."""
    cut = np.full(probabilities.shape[1], 0.5) if thresholds is None else np.asarray(thresholds)
    predicted = (probabilities >= cut).astype(np.uint8)
    empty = predicted.sum(axis=1) == 0
    predicted[empty, (probabilities[empty] - cut).argmax(axis=1)] = 1
    return predicted


def f1_scores(gold: np.ndarray, probabilities: np.ndarray,
              thresholds: np.ndarray | None = None) -> dict[str, float]:
    """micro-F1, macro-F1 and their mean (the original's reported F1) over all train labels."""
    predicted = predict_labels(probabilities, thresholds)
    labels = list(range(gold.shape[1]))
    micro = f1_score(gold, predicted, average="micro", labels=labels, zero_division=0)
    macro = f1_score(gold, predicted, average="macro", labels=labels, zero_division=0)
    return {"micro_f1": float(micro), "macro_f1": float(macro), "f1": float((micro + macro) / 2)}


THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)
# A label gets a threshold of its own only when validation holds this many of its examples;
# below that a tuned value fits one or two documents, and the shared threshold serves better.
MIN_POSITIVES_FOR_OWN_THRESHOLD = 5


def tune_thresholds(gold: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Per-label decision thresholds that maximise F1 on held-out (validation) data.

    First one threshold shared by all labels, by the average of micro- and macro-F1; then each
    label with enough validation examples takes the threshold that maximises its own F1 (ties go
    to the value nearest the shared one). Returns float [num_labels].
    """
    shared = max(THRESHOLD_GRID, key=lambda t: f1_scores(
        gold, probabilities, np.full(gold.shape[1], t))["f1"])
    thresholds = np.full(gold.shape[1], shared)
    for label in np.flatnonzero(gold.sum(axis=0) >= MIN_POSITIVES_FOR_OWN_THRESHOLD):
        truth, p = gold[:, label] > 0, probabilities[:, label]
        chosen = p[None, :] >= THRESHOLD_GRID[:, None]
        f1 = 2 * (chosen & truth).sum(axis=1) / (chosen.sum(axis=1) + truth.sum())
        best = np.flatnonzero(f1 >= f1.max() - 1e-12)
        thresholds[label] = THRESHOLD_GRID[best[np.argmin(np.abs(THRESHOLD_GRID[best] - shared))]]
    return thresholds


def per_label_report(gold: np.ndarray, probabilities: np.ndarray, names: list[str],
                     thresholds: np.ndarray | None = None) -> list[dict]:
    predicted = predict_labels(probabilities, thresholds)
    precision, recall, f1, support = precision_recall_fscore_support(
        gold, predicted, labels=list(range(len(names))), zero_division=0)
    cut = np.full(len(names), 0.5) if thresholds is None else thresholds
    return [{"label": n, "threshold": float(t), "precision": float(p), "recall": float(r),
             "f1": float(f), "support": int(s)}
            for n, t, p, r, f, s in zip(names, cut, precision, recall, f1, support)]


# ------------------------------------------------------------------------------- callbacks
class F1Evaluation(keras.callbacks.Callback):
    """Adds val_micro_f1, val_macro_f1 and val_f1 to the epoch logs; list it before the callbacks
    that read them (checkpointing, history, TensorBoard).

    With `tune` the scores are those of thresholds tuned on this same data, as the run will use
    after training (an optimistic figure, for choosing the epoch; the test split reports honestly).
    """

    def __init__(self, token_ids: np.ndarray, gold: np.ndarray, batch_size: int,
                 tune: bool = False):
        super().__init__()
        self.token_ids, self.gold, self.batch_size, self.tune = token_ids, gold, batch_size, tune

    def on_epoch_end(self, epoch, logs=None):
        probabilities = sigmoid(model.predict_logits(self.model, self.token_ids, self.batch_size))
        if logs is not None:
            thresholds = tune_thresholds(self.gold, probabilities) if self.tune else None
            scores = f1_scores(self.gold, probabilities, thresholds)
            logs.update({f"val_{k}": v for k, v in scores.items()})


class SetBackboneScale(keras.callbacks.Callback):
    """Gradual unfreezing: the backbone's learning-rate scale is 0 for the first `frozen_epochs`
    epochs (only the new head learns), then the optimizer's configured scale."""

    def __init__(self, optimizer: "DiscriminativeAdamW", frozen_epochs: int):
        super().__init__()
        self.optimizer, self.frozen_epochs = optimizer, frozen_epochs

    def on_epoch_begin(self, epoch, logs=None):
        self.optimizer.current_scale.assign(0.0 if epoch < self.frozen_epochs
                                            else self.optimizer.scale)


# ----------------------------------------------------------------------------- utilities
def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def head_file(source: str, num_lines: int, target: str, encoding: str = "utf-8") -> str:
    """Copy the first `num_lines` lines of `source` to `target` (test_mode's small slice), in the
    source's own encoding so that the later reads with the same --encoding see the same text."""
    import data_util_hdf5 as data_util

    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    with open(target + ".tmp", "w", encoding=encoding, newline="\n") as dst:
        for line_no, line in data_util.read_lines(source, encoding):
            if line_no > num_lines:
                break
            dst.write(line + "\n")
    os.replace(target + ".tmp", target)
    return target


def summary_line(name: str, **values) -> str:
    """The one grep-able `name key=value ...` line every script ends with."""
    parts = [name] + [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in values.items()]
    line = " ".join(parts)
    print(line, flush=True)
    return line


def plot_history(history: list[dict], keys: list[str], path: str, title: str) -> None:
    """A PNG of the chosen metrics against epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        points = [(h["epoch"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class Timer:
    def __init__(self):
        self.start = time.time()

    def seconds(self) -> int:
        return int(round(time.time() - self.start))


def guard(main: Callable) -> Callable:
    """Wrap a script's main so that a user mistake (bad data, config or flag) ends in one line."""
    import data_util_hdf5 as data_util
    import model

    import run_directory

    user_errors = (data_util.DataError, model.ConfigError, model.BackboneMismatchError, UsageError,
                   run_directory.RunError)

    def guarded(argv):
        try:
            return main(argv)
        except data_util.DiskFullError as error:
            # straight out: a normal shutdown would free the failed write's HDF5 objects, which
            # can crash the interpreter after the message
            run_directory.release_all()
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(2)
        except user_errors as error:
            fail(str(error))
        except KeyboardInterrupt:
            print("\ninterrupted: rerun the same command to resume after the last complete "
                  "epoch", file=sys.stderr)
            sys.exit(130)
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
                raise
            where = f"{error.filename}: " if error.filename else ""
            fail(f"{where}{error.strerror or error}; free disk space or fix the permissions, "
                 "then rerun the same command (an interrupted run resumes)")
    return guarded


class UsageError(Exception):
    """A flag combination that cannot work; `guard` turns it into one line."""


def fail(message: str) -> None:
    """Stop a script with one clear line instead of a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
