"""The same multi-label classifier trained from scratch: the "no pretraining" column.

Quick CPU trial:
    python train_transform.py --test_mode=True
Full run on the sample multi-label task, either backbone:
    python train_transform.py --backbone=transformer --num_epochs=10
The original's toy task (can the model learn at all? random 0/1 sequences, label = sum > T/2 + 1):
    python train_transform.py --toy_task=True --backbone=transformer

Writes the same run directory as train_bert_fine_tuning.py (predict.py reads either).
"""
import cli  # first: it keeps TensorFlow's C++ start-up lines off the terminal

import dataclasses

import keras
import numpy as np

from absl import app, flags

import classifier_task
import model
import train_util

FLAGS = flags.FLAGS
cli.define_classifier_flags("runs/scratch", (
    "Peak Adam learning rate. From scratch the best rate depends on the task: the benchmark's "
    "search over {3e-4, 1e-3, 3e-3} picked 1e-3 for the TextCNN everywhere, and for the "
    "Transformer 3e-4 on the large sample sets, 3e-4 to 3e-3 on 1,000 lines; search it on "
    "validation when it matters."))
cli.define_model_flags()
flags.DEFINE_boolean("toy_task", False, "Train on the original's toy task instead of text and "
                     "report held-out accuracy.")


def main(_):
    # --------------------------------------------------------------------- setup
    cli.validate_classifier_flags()
    timer, strategy = cli.start_run()
    preset = "tiny" if FLAGS.test_mode else FLAGS.preset
    if FLAGS.toy_task:
        return run_toy_task(strategy, preset, timer, cli.classifier_settings())
    # checked before tokenizing, so that a bad length does not wait for the data
    if FLAGS.sequence_length:
        model.check_sequence_length(FLAGS.sequence_length, FLAGS.max_position)
    run, files = cli.open_classifier_run(strategy, cli.classifier_data_files())
    settings = cli.classifier_settings(cli.worker_cache_dir(run, strategy))

    # ---------------------------------------------------------------------- data
    data = classifier_task.load_data(files, FLAGS.tokenize_style or "space", settings,
                                     vocab_size=FLAGS.vocab_size,
                                     max_sequence_length=FLAGS.max_position)
    epochs = cli.epochs_to_run(test_mode_default=2, steps_per_epoch=data.steps_per_epoch())
    settings = classifier_task.choose_data_settings(data, epochs, settings)

    # --------------------------------------------------------------------- model
    config = cli.config_from_flags(len(data.vocab), preset)
    with strategy.scope():
        classifier = classifier_task.build_and_compile(
            model.build_backbone(config, first_position_only=True), *data.splits["train"],
            epochs, data.steps_per_epoch(), settings)
    classifier_task.save_run_files(run, data, config, settings, classifier)
    start = classifier_task.evaluate(classifier, data, "valid")
    print(f"before training: valid loss {start['loss']:.4f}, F1 {start['f1']:.4f}")

    # ----------------------------------------------------------------------- fit
    history = classifier_task.train(classifier, data, run, epochs, settings)

    # -------------------------------------------------------------------- report
    scores = classifier_task.report(classifier, data, run, history,
                                    "from scratch: validation F1", settings.decision_rule)
    run.finish(scores)
    train_util.summary_line("scratch", backbone=FLAGS.backbone, **scores,
                            initial_valid_loss=start["loss"], epochs=len(history),
                            seconds=timer.seconds(), ckpt_dir=run.path)


def run_toy_task(strategy, preset: str, timer: train_util.Timer,
                 settings: classifier_task.ClassifierSettings) -> None:
    """Held-out accuracy on the toy task: the convergence check the original's Transformer
    failed."""
    (train_x, train_y), (test_x, test_y) = (classifier_task.toy_task_data(n, 24, FLAGS.seed + i)
                                            for i, n in enumerate((4000, 1000)))
    config = cli.config_from_flags(classifier_task.TOY_VOCAB_SIZE, preset)
    steps_per_epoch = -(-len(train_x) // settings.batch_size)
    epochs = cli.epochs_to_run(test_mode_default=10, steps_per_epoch=steps_per_epoch)
    # the backbone alone: counting 1s is what a bag of words would do for it
    settings = dataclasses.replace(settings, bag_of_words=False)
    with strategy.scope():
        classifier = classifier_task.build_and_compile(
            model.build_backbone(config, first_position_only=True), train_x, train_y, epochs,
            steps_per_epoch, settings)
    # fit's own validation runs before the epoch-end callbacks: Keras' swap (at each test pass)
    # scores the averaged weights, which fit leaves in the model at its end
    averaging = [keras.callbacks.SwapEMAWeights()] if classifier.optimizer.use_ema else []
    classifier.fit(model.backbone_features(train_x), train_y,
                   batch_size=settings.batch_size, epochs=epochs,
                   validation_data=(model.backbone_features(test_x), test_y),
                   callbacks=averaging, verbose=train_util.fit_verbosity())
    logits = model.predict_logits(classifier, test_x, settings.batch_size)
    accuracy = float(np.mean((logits[:, 0] > 0) == (test_y[:, 0] > 0.5)))
    train_util.summary_line("toy_task", backbone=FLAGS.backbone, accuracy=accuracy,
                            seconds=timer.seconds())


if __name__ == "__main__":
    app.run(cli.guard(main))
