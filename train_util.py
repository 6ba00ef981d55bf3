"""Pieces every training script shares: distribution, optimiser, schedule, callbacks, reports.
Plain arguments only; the flags live in cli.py."""
from __future__ import annotations

import sys
import time

import keras
import numpy as np
import tensorflow as tf

import model

STRATEGIES = ("one_device", "mirrored", "multi_worker_mirrored", "tpu")
PRECISIONS = {"off": "float32", "bfloat16": "mixed_bfloat16"}


def set_precision(name: str) -> str:
    """Set the Keras dtype policy of every model built afterwards from a --mixed_precision value
    ('off' or 'bfloat16') and return the policy's name. Under 'bfloat16' layers compute in
    bfloat16 while weights, optimizer state, logits and losses stay float32, so weight files are
    the same either way. bfloat16 has float32's range: no loss scaling is needed."""
    if name not in PRECISIONS:
        raise ValueError(f"--mixed_precision={name!r} is not one of {', '.join(PRECISIONS)}")
    keras.mixed_precision.set_global_policy(PRECISIONS[name])
    return PRECISIONS[name]


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags (avx2, avx512_bf16 ...) as the kernel lists them, or None where
    it does not (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def slow_precision_warning(precision: str, flags: set[str] | None, on_accelerator: bool) -> str:
    """A one-line warning when --mixed_precision=bfloat16 is asked for on a CPU that has no
    bfloat16 instructions (it then runs slower than float32), else ''."""
    if precision != "bfloat16" or on_accelerator or flags is None:
        return ""
    if flags & {"avx512_bf16", "amx_bf16"}:
        return ""
    return ("warning: --mixed_precision=bfloat16 on a CPU without bfloat16 instructions "
            "(no avx512_bf16 or amx_bf16 in /proc/cpuinfo) trained 0.23-0.87x as fast as "
            "float32 in benchmarks/results/speed_zen3.md; --mixed_precision=off is faster here")


def get_distribution_strategy(name: str) -> tf.distribute.Strategy:
    """Map the --distribution_strategy flag to a tf.distribute strategy (one_device = no-op)."""
    if name == "one_device":
        # TensorFlow's default strategy, whose scope does nothing: TensorFlow places the work on
        # the first GPU, if any, by itself. OneDeviceStrategy routes every fit and predict
        # through a multi-device iterator: on one CPU core the sample sentiment fine-tuning
        # took 1.57x as long with it (benchmarks/results/finetune_epoch.md).
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker_mirrored":
        return MultiWorkerStrategy()
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


class MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy (cluster from TF_CONFIG) that Keras 3's fit can drive.

    Keras 3.15 hands the collective strategy two reductions it cannot do (keras-team/keras
    #20585, #20329): a dict of per-replica input tensors (to build the model symbolically, our
    inputs are dicts), and per-replica scalar logs with axis=0. Both are reduced here leaf by
    leaf, scalars over the replicas; everything else goes to the strategy unchanged.
    """

    def reduce(self, reduce_op, value, axis):
        parent = super(MultiWorkerStrategy, self)
        if isinstance(value, (dict, list, tuple)):
            return tf.nest.map_structure(lambda leaf: parent.reduce(reduce_op, leaf, axis), value)
        if axis is not None and self.experimental_local_results(value)[0].shape.rank == 0:
            axis = None
        return parent.reduce(reduce_op, value, axis)

    def is_chief(self) -> bool:
        """The worker that writes the run directory: the `chief` task if the cluster names one,
        else worker 0 (TF_CONFIG's convention)."""
        resolver = self.cluster_resolver
        if resolver.task_type == "chief":
            return True
        return resolver.task_type == "worker" and resolver.task_id == 0 \
            and "chief" not in resolver.cluster_spec().as_dict()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run directory (always, unless several workers)."""
    return strategy.is_chief() if isinstance(strategy, MultiWorkerStrategy) else True


def worker_shard(strategy: tf.distribute.Strategy) -> tuple[int, int]:
    """(workers, this worker's index): each worker reads shard `index` of `workers` of the data.
    (1, 0) unless several workers; the chief, when the cluster names one, is worker 0."""
    if not isinstance(strategy, MultiWorkerStrategy):
        return 1, 0
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec().as_dict()
    chiefs = len(spec.get("chief", []))
    index = 0 if resolver.task_type == "chief" else resolver.task_id + chiefs
    return chiefs + len(spec.get("worker", [])), index


def agreed_minimum(strategy: tf.distribute.Strategy, value: int) -> int:
    """The smallest of every worker's `value`, known to all (one all-reduce): a synchronous
    strategy needs the same number of steps on every worker, and shards differ by a few."""
    workers, index = worker_shard(strategy)
    if workers == 1:
        return value
    local_replicas = strategy.num_replicas_in_sync // workers
    mine = np.zeros(workers, np.float32)
    mine[index] = value / local_replicas
    # in a tf.function: run eagerly, a multi-worker strategy warns of its overhead
    summed = tf.function(lambda: strategy.reduce("SUM", strategy.run(lambda: tf.constant(mine)),
                                                 axis=None))()
    return int(round(float(tf.reduce_min(summed))))


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
        self._sgd_keys: set = set()
        self.sgd_scale, self.sgd_momentum = 1.0, 0.9

    def scale_learning_rate(self, variables: list, scale: float) -> None:
        self._scaled_keys = {self._var_key(v) for v in variables}
        self.scale = scale
        self.current_scale.assign(scale)

    def learn_by_sgd(self, variables: list, scale: float, momentum: float = 0.9) -> None:
        """Give `variables` plain SGD-with-momentum steps at `scale` times the schedule's rate,
        without weight decay; call before the first step.

        For a linear model over sparse word features (the bag-of-words logits): Adam divides
        each weight's step by its own gradient size, so a word seen in one training document
        moves as fast as a common one and the model memorises documents by their rare words
        (on the many-label sample task: test F1 0.23 with Adam at any rate, 0.35 with SGD). SGD
        moves a word's weight in proportion to how often it occurs, as logistic regression's
        solvers and fastText do.
        """
        self._sgd_keys = {self._var_key(v) for v in variables}
        self.sgd_scale, self.sgd_momentum = scale, momentum
        self.exclude_from_weight_decay(var_list=variables)

    def update_step(self, gradient, variable, learning_rate):
        if self._var_key(variable) in self._sgd_keys:
            # Adam's first-moment slot serves as the momentum buffer
            velocity = self._momentums[self._get_variable_index(variable)]
            self.assign(velocity, velocity * self.sgd_momentum + gradient)
            self.assign_sub(variable, velocity * (learning_rate * self.sgd_scale))
            return
        if self._var_key(variable) in self._scaled_keys:
            learning_rate = learning_rate * keras.ops.cast(self.current_scale, "float32")
        super().update_step(gradient, variable, learning_rate)


def make_optimizer(learning_rate: float, total_steps: int, warmup_steps: int = 0,
                   decay_steps: int | None = None, decay_rate: float = 0.95,
                   weight_decay: float = 0.0, clip_norm: float = 5.0,
                   average_momentum: float | None = None) -> DiscriminativeAdamW:
    """Adam(W) with warm-up + decay and global-norm clipping at 5, as the original.
    `average_momentum`: also keep an exponential moving average of the weights (Keras' EMA;
    `SwapAveragedWeights` puts it in the model)."""
    schedule = WarmupDecay(learning_rate, total_steps, warmup_steps, decay_steps, decay_rate)
    averaging = {"use_ema": True, "ema_momentum": average_momentum} if average_momentum else {}
    optimizer = DiscriminativeAdamW(schedule, weight_decay=weight_decay, global_clipnorm=clip_norm,
                                    **averaging)
    # LayerNorm scales and biases are not weights to shrink towards zero.
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "layer_norm"])
    return optimizer


# ------------------------------------------------------------------------------- callbacks
class ValidationScores(keras.callbacks.Callback):
    """Adds val_loss, val_micro_f1, val_macro_f1 and val_f1 to the epoch logs from one pass over
    the validation rows (fit gets no validation_data, which would be a second pass); list it
    before the callbacks that read them (checkpointing, history, TensorBoard).

    With `tune` the F1 scores are those of thresholds tuned on this same data, as the run will use
    after training (an optimistic figure, for choosing the epoch; the test split reports honestly).
    """

    def __init__(self, token_ids: np.ndarray, gold: np.ndarray, batch_size: int,
                 tune: bool = False):
        super().__init__()
        self.token_ids, self.gold, self.batch_size, self.tune = token_ids, gold, batch_size, tune

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logits = model.predict_logits(self.model, self.token_ids, self.batch_size)
        thresholds = (model.tune_thresholds(self.gold, model.sigmoid(logits)) if self.tune
                      else None)
        scores = model.split_scores(self.gold, logits, thresholds)
        logs.update({f"val_{k}": v for k, v in scores.items()})


class SwapAveragedWeights(keras.callbacks.Callback):
    """At an epoch's end, swaps the model's trainable weights with the optimizer's moving
    averages of them (an optimizer made with `average_momentum`); see `scored_with_averages`."""

    def on_epoch_end(self, epoch, logs=None):
        optimizer = self.model.optimizer
        for weight, average in zip(optimizer._trainable_variables,
                                   optimizer._model_variables_moving_average):
            if average is None:  # Keras keeps no average of a weight it overwrites by gradient
                continue
            current = weight.numpy()
            weight.assign(average)
            average.assign(current)


def scored_with_averages(model: keras.Model, scoring: list, after: list) -> list:
    """Epoch-end callbacks in order: `scoring` (validation, best epoch, logs), then `after` (the
    backup). With an optimizer that averages the weights, `scoring` sees the averages and
    `after` the weights that go on learning (so a resumed run continues them). A best-epoch
    file written there holds the averages in the model and the weights in the optimizer's
    average slots: load it to predict, not to go on training."""
    if not model.optimizer.use_ema:
        return [*scoring, *after]
    return [SwapAveragedWeights(), *scoring, SwapAveragedWeights(), *after]


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
def fit_verbosity() -> int | str:
    """Keras' progress bar on a terminal; one line an epoch in a log file (a bar redrawn every
    step fills a file with carriage returns)."""
    return "auto" if sys.stdout.isatty() else 2


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


class UsageError(Exception):
    """A setting (flag) combination that cannot work; cli.guard turns it into one line."""
