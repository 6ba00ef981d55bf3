"""Shared training pieces: the original's prediction rule, F1, the learning-rate schedule."""
import dataclasses

import numpy as np
import pytest

import model
import train_util


def tiny_textcnn_task(rows: int) -> tuple:
    """A tiny TextCNN config (vocabulary 50, no dropout), `rows` random rows of 12 token ids and
    random multi-hot labels over 3 labels."""
    config = model.config_from_preset("tiny", backbone="textcnn", vocab_size=50, dropout=0.0)
    ids = np.random.default_rng(0).integers(5, 50, size=(rows, 12)).astype(np.int32)
    labels = np.random.default_rng(1).integers(0, 2, size=(rows, 3)).astype(np.float32)
    return config, ids, labels


def test_prediction_rule_takes_every_label_over_half_or_the_top_one():
    probs = np.array([[0.9, 0.6, 0.1], [0.2, 0.4, 0.3], [0.5, 0.1, 0.0]])
    assert model.predict_labels(probs).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_f1_is_the_mean_of_micro_and_macro_over_all_train_labels():
    gold = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    probs = np.array([[0.9, 0.1, 0.1], [0.8, 0.1, 0.2], [0.7, 0.9, 0.1]])
    scores = model.f1_scores(gold, probs)
    # label 0: tp 2 fp 1 fn 0 -> 0.8; label 1: tp 1 fn 1 -> 2/3; label 2 never seen -> 0
    assert scores["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert scores["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 0.0) / 3)
    assert scores["f1"] == pytest.approx((scores["micro_f1"] + scores["macro_f1"]) / 2)


def test_per_label_report_names_every_label():
    gold = np.array([[1, 0], [0, 1]])
    report = model.per_label_report(gold, np.array([[0.9, 0.1], [0.9, 0.2]]), ["a", "b"])
    assert [r["label"] for r in report] == ["a", "b"]
    assert report[0]["precision"] == pytest.approx(0.5) and report[1]["recall"] == 0.0


def test_thresholds_pick_each_labels_own_cut_and_a_fallback():
    probs = np.array([[0.9, 0.2, 0.1], [0.3, 0.05, 0.65], [0.4, 0.45, 0.2]])
    cut = np.array([0.5, 0.15, 0.7])
    # row 1: label 1 passes its 0.15; row 2: none passes, label 2 is nearest (0.65 - 0.7)
    assert model.predict_labels(probs, cut).tolist() == [[1, 1, 0], [0, 0, 1], [0, 1, 0]]


def test_tuned_thresholds_find_a_rare_labels_low_probabilities():
    rng = np.random.default_rng(0)
    gold = np.zeros((400, 3), np.uint8)
    gold[:, 0] = rng.random(400) < 0.5
    gold[:40, 1] = 1                    # rare: its model never says more than 0.3
    gold[:3, 2] = 1                     # too rare in valid for a threshold of its own
    probs = np.where(gold == 1, 0.8, 0.1)
    probs[:, 1] = np.where(gold[:, 1] == 1, 0.3, 0.05)
    thresholds = model.tune_thresholds(gold, probs)
    assert 0.05 < thresholds[1] <= 0.3
    assert thresholds[2] == thresholds[0]  # both the shared threshold
    tuned = model.per_label_report(gold, probs, ["a", "b", "c"], thresholds)
    half = model.per_label_report(gold, probs, ["a", "b", "c"])
    assert tuned[1]["threshold"] == thresholds[1] and tuned[1]["f1"] == 1.0
    assert half[1]["f1"] < 0.8
    assert model.f1_scores(gold, probs, thresholds)["f1"] > model.f1_scores(gold, probs)["f1"]


def test_schedule_warms_up_then_falls_linearly_to_zero_at_the_last_step():
    schedule = train_util.WarmupDecay(1e-3, total_steps=110, warmup_steps=10)
    assert float(schedule(0)) == pytest.approx(1e-4)
    assert float(schedule(9)) == pytest.approx(1e-3)
    assert float(schedule(60)) == pytest.approx(5e-4)
    assert float(schedule(110)) == pytest.approx(0.0) and float(schedule(500)) == 0.0
    again = train_util.WarmupDecay.from_config(schedule.get_config())
    assert float(again(85)) == pytest.approx(float(schedule(85)))


def test_schedule_keeps_the_originals_exponential_decay_on_request():
    schedule = train_util.WarmupDecay(1e-3, total_steps=10, warmup_steps=10, decay_steps=100,
                                      decay_rate=0.5)
    assert float(schedule(100)) == pytest.approx(5e-4)
    assert float(schedule(300)) == pytest.approx(1.25e-4)


@pytest.mark.parametrize("epochs, steps_per_epoch, warmup", [(63, 16, 16), (5, 50, 25)])
def test_classifier_warms_up_over_a_tenth_of_the_run_but_no_more_than_an_epoch(
        epochs, steps_per_epoch, warmup):
    import classifier_task

    config, ids, _ = tiny_textcnn_task(8)
    labels = np.eye(2, dtype=np.float32)[np.arange(8) % 2]
    classifier = classifier_task.build_and_compile(
        model.build_backbone(config), ids, labels, epochs, steps_per_epoch,
        classifier_task.ClassifierSettings(learning_rate=1e-3, bag_of_words_learning_rate=10.0))
    optimizer = classifier.optimizer

    def rate_at(step: int) -> float:
        optimizer.iterations.assign(step)
        return float(optimizer.learning_rate)
    assert rate_at(warmup - 2) < 1e-3
    assert rate_at(warmup - 1) == pytest.approx(1e-3)
    assert rate_at(epochs * steps_per_epoch) == 0.0


@pytest.mark.slow
def test_backbone_learns_at_its_scale_of_the_heads_rate():
    """Adam's first step moves every weight by about the learning rate, whatever its gradient,
    so a scaled variable must move `scale` times as far; scale 0 holds it still."""
    import keras

    config, ids, labels = tiny_textcnn_task(16)
    inputs = {"token_ids": ids, "segment_ids": np.zeros_like(ids),
              "padding_mask": np.ones_like(ids)}
    moved = {}
    for scale in (0.0, 0.25, 1.0):
        keras.utils.set_random_seed(0)
        classifier = model.build_classifier(model.build_backbone(config), 3, 0.0)
        backbone, head = classifier.get_layer("backbone"), classifier.get_layer("classifier_head")
        optimizer = train_util.make_optimizer(1e-3, total_steps=100)
        optimizer.scale_learning_rate(backbone.trainable_variables, scale)
        model.compile_classifier(classifier, optimizer)
        before = [keras.ops.convert_to_numpy(w) for w in (backbone.weights[0], head.weights[0])]
        classifier.fit(inputs, labels, batch_size=16, epochs=1, verbose=0)
        moved[scale] = [np.abs(keras.ops.convert_to_numpy(w) - b).max()
                        for w, b in zip((backbone.weights[0], head.weights[0]), before)]
    assert moved[0.0][0] == 0.0 and moved[0.0][1] > 0
    assert moved[0.25][0] == pytest.approx(0.25 * moved[1.0][0], rel=0.05)
    assert moved[0.25][1] == pytest.approx(moved[1.0][1], rel=0.05)


def test_bag_of_words_learns_by_sgd_with_momentum_and_the_rest_by_adam():
    """Two steps on one batch: the SGD variable moves by rate * gradient, then by rate *
    (0.9 * first gradient + second gradient), with no weight decay (at 10 per unit rate it
    would take 1% of each weight a step)."""
    import keras
    import tensorflow as tf

    config, ids, labels = tiny_textcnn_task(16)
    keras.utils.set_random_seed(0)
    classifier = model.build_classifier(model.build_backbone(config), 3, 0.0, bag_of_words=True)
    kernel = classifier.get_layer("bag_of_words").kernel
    kernel.assign(np.random.default_rng(2).normal(size=kernel.shape).astype(np.float32))
    # a constant rate (no warm-up, decay far away), weight decay on for everything else
    optimizer = train_util.make_optimizer(1e-3, total_steps=10**6, weight_decay=10.0)
    optimizer.learn_by_sgd([kernel], scale=2000.0)
    model.compile_classifier(classifier, optimizer)
    inputs = model.backbone_features(ids)

    def gradient():
        with tf.GradientTape() as tape:
            loss = keras.ops.mean(model.multilabel_loss(labels, classifier(inputs)))
        return keras.ops.convert_to_numpy(tf.convert_to_tensor(tape.gradient(loss, kernel)))

    start, first = keras.ops.convert_to_numpy(kernel), gradient()
    classifier.train_on_batch(inputs, labels)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(kernel), start - 2.0 * first,
                               rtol=1e-4, atol=1e-6)
    after_one, second = keras.ops.convert_to_numpy(kernel), gradient()
    classifier.train_on_batch(inputs, labels)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(kernel),
                               after_one - 2.0 * (0.9 * first + second), rtol=1e-4, atol=1e-6)
    assert np.abs(first).max() > 0


def assert_scored_with_averages(steps: list, scored: list, backed_up: list,
                                momentum: float, steps_per_epoch: int = 4) -> None:
    """`scored` (a weight at each epoch's end, as the scoring callbacks saw it) is the moving
    average of `steps` (the weight after each step): the first step's weights, then
    momentum * average + (1 - momentum) * weights; `backed_up` is the weight itself."""
    averages = [steps[0]]
    for weights in steps[1:]:
        averages.append(momentum * averages[-1] + (1 - momentum) * weights)
    for epoch in range(len(scored)):
        last_step = (epoch + 1) * steps_per_epoch - 1
        np.testing.assert_allclose(scored[epoch], averages[last_step], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(backed_up[epoch], steps[last_step])
    assert np.abs(scored[0] - steps[steps_per_epoch - 1]).max() > 1e-4


def test_weight_averaging_scores_the_moving_average_and_trains_on_the_weights():
    """The callbacks that score an epoch (classifier_task.train's list, through
    scored_with_averages) see the exponential moving average of the weights after every step
    (the first step's weights, then m * average + (1 - m) * weights, carried across epochs);
    the backup after them and the next epoch's steps see the weights themselves."""
    import keras

    import classifier_task

    config, ids, labels = tiny_textcnn_task(32)
    settings = classifier_task.ClassifierSettings(bag_of_words=False, weight_averaging=0.5)
    keras.utils.set_random_seed(0)
    classifier = classifier_task.build_and_compile(model.build_backbone(config), ids, labels,
                                                   epochs=3, steps_per_epoch=4,
                                                   settings=settings)
    momentum = classifier_task.averaging_momentum(0.5, 4)
    assert momentum == pytest.approx(0.5) and classifier.optimizer.use_ema
    kernel = classifier.get_layer("classifier_head").weights[0]
    steps, next_starts = [], []

    class Seen(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epoch_ends = []

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_ends.append(keras.ops.convert_to_numpy(kernel))

    class Steps(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0 and steps:
                next_starts.append(keras.ops.convert_to_numpy(kernel))

        def on_train_batch_end(self, batch, logs=None):
            steps.append(keras.ops.convert_to_numpy(kernel))

    scored, backed_up = Seen(), Seen()
    callbacks = train_util.scored_with_averages(classifier, [Steps(), scored], [backed_up])
    classifier.fit(model.backbone_features(ids), labels, batch_size=8, epochs=2, shuffle=False,
                   verbose=0, callbacks=callbacks)
    assert_scored_with_averages(steps, scored.epoch_ends, backed_up.epoch_ends, momentum)
    np.testing.assert_allclose(next_starts[0], steps[3])
    # fit itself ends with the averages in the model (Keras' finalize_variable_values)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(kernel), scored.epoch_ends[-1])
    # without averaging the list is the callbacks as given
    plain = classifier_task.build_and_compile(
        model.build_backbone(config), ids, labels, epochs=3, steps_per_epoch=4,
        settings=classifier_task.ClassifierSettings(bag_of_words=False))
    assert train_util.scored_with_averages(plain, [scored], [backed_up]) == [scored, backed_up]


AVERAGES_ON_TWO_REPLICAS = """
import json, os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import train_util
if sys.argv[2] == "mirrored":
    train_util.split_cpu_for_testing(2)
import keras, model, classifier_task
from test_train_util import tiny_textcnn_task
config, ids, labels = tiny_textcnn_task(32)
settings = classifier_task.ClassifierSettings(bag_of_words=False, weight_averaging=0.5,
                                              dropout=0.0)
keras.utils.set_random_seed(0)
with train_util.get_distribution_strategy(sys.argv[2]).scope():
    classifier = classifier_task.build_and_compile(model.build_backbone(config), ids, labels,
                                                   epochs=3, steps_per_epoch=4, settings=settings)
kernel = classifier.get_layer("classifier_head").weights[0]
class Seen(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.values = []
    def record(self):
        self.values.append(keras.ops.convert_to_numpy(kernel).tolist())
    def on_epoch_end(self, epoch, logs=None):
        self.record()
class Steps(Seen):
    def on_train_batch_end(self, batch, logs=None):
        self.record()
    def on_epoch_end(self, epoch, logs=None):
        pass
steps, scored, backed_up = Steps(), Seen(), Seen()
classifier.fit(model.backbone_features(ids), labels, batch_size=8, epochs=2, shuffle=False,
               verbose=0, callbacks=train_util.scored_with_averages(classifier, [steps, scored],
                                                                     [backed_up]))
print("SEEN", json.dumps({"steps": steps.values, "scored": scored.values,
                          "backed_up": backed_up.values}))
"""


@pytest.mark.slow
def test_weight_averaging_under_mirrored_strategy_scores_the_moving_average():
    """With 2 replicas (2 logical CPUs, so a process of its own) the epochs are scored with the
    moving average of the mirrored weights and backed up with the weights themselves."""
    import json
    import os
    import subprocess
    import sys

    import classifier_task

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", AVERAGES_ON_TWO_REPLICAS, root, "mirrored"],
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("SEEN ")]
    assert lines, done.stderr[-2000:]
    seen = {kind: [np.array(v) for v in values]
            for kind, values in json.loads(lines[-1][5:]).items()}
    assert len(seen["steps"]) == 8 and len(seen["scored"]) == 2
    assert_scored_with_averages(seen["steps"], seen["scored"], seen["backed_up"],
                                classifier_task.averaging_momentum(0.5, 4))


def test_weight_averaging_is_on_by_default_only_for_epochs_of_many_steps(capsys):
    """Default settings average over half an epoch once an epoch has AVERAGING_MIN_STEPS steps;
    a value given (0 included) is taken as it is; the choice is written into the settings, and
    said when the default makes it."""
    import classifier_task

    threshold = classifier_task.AVERAGING_MIN_STEPS
    default = classifier_task.ClassifierSettings()

    def momentum(settings, steps):
        optimizer = classifier_task.make_optimizer(settings, 3, steps, average=True)
        return optimizer.ema_momentum if optimizer.use_ema else None

    assert momentum(default, threshold - 1) is None
    assert momentum(default, threshold) == pytest.approx(1 - 1 / (0.5 * threshold))
    assert momentum(dataclasses.replace(default, weight_averaging=0.0), 10 * threshold) is None
    assert momentum(dataclasses.replace(default, weight_averaging=2.0), 10) == pytest.approx(0.95)
    # the bag-of-words trial never averages
    assert not classifier_task.make_optimizer(default, 3, 10 * threshold).use_ema
    assert classifier_task.choose_weight_averaging(default, threshold).weight_averaging == 0.5
    assert "weight averaging over 0.5 epochs" in capsys.readouterr().out
    assert classifier_task.choose_weight_averaging(default, 10).weight_averaging == 0.0
    given = dataclasses.replace(default, weight_averaging=0.0)
    assert classifier_task.choose_weight_averaging(given, 10 * threshold) == given
    assert capsys.readouterr().out == ""


def test_summary_line_is_grep_able(capsys):
    line = train_util.summary_line("fine_tune", test_f1=0.83456, epochs=2, ckpt_dir="runs/ft")
    assert line == "fine_tune test_f1=0.8346 epochs=2 ckpt_dir=runs/ft"
    assert capsys.readouterr().out.strip() == line


def test_bfloat16_on_a_cpu_without_its_instructions_is_warned_about(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n")
    avx2_only = train_util.cpu_flags(str(cpuinfo))
    assert avx2_only == {"fpu", "sse2", "avx", "avx2", "fma"}
    warning = train_util.slow_precision_warning("bfloat16", avx2_only, on_accelerator=False)
    assert "--mixed_precision=off" in warning and "\n" not in warning
    assert not train_util.slow_precision_warning("off", avx2_only, on_accelerator=False)
    assert not train_util.slow_precision_warning("bfloat16", avx2_only, on_accelerator=True)
    assert not train_util.slow_precision_warning("bfloat16", avx2_only | {"avx512_bf16"}, False)
    assert not train_util.slow_precision_warning("bfloat16", None, False)  # flags unknown
    assert train_util.cpu_flags(str(tmp_path / "missing")) is None
