"""The same multi-label classifier trained from scratch: the "no pretraining" column.

Quick CPU trial:
    python train_transform.py --test_mode=True
Full run on the sample multi-label task, either backbone:
    python train_transform.py --backbone=transformer --num_epochs=10
The original's toy task (can the model learn at all? random 0/1 sequences, label = sum > T/2 + 1):
    python train_transform.py --toy_task=True --backbone=transformer

Writes the same run directory as train_bert_fine_tuning.py (predict.py reads either).
"""
import numpy as np
from absl import app, flags

import classifier_task as ct
import model
import train_util as tu

FLAGS = flags.FLAGS
ct.define_flags(default_learning_rate=1e-3, default_ckpt_dir="runs/scratch")
tu.define_model_flags()
flags.DEFINE_boolean("toy_task", False, "Train on the original's toy task instead of text and "
                     "report held-out accuracy.")


def main(_):
    # --------------------------------------------------------------------- setup
    ct.validate_flags()
    timer, strategy = tu.start_run()
    preset = "tiny" if FLAGS.test_mode else FLAGS.preset
    if FLAGS.toy_task:
        return run_toy_task(strategy, preset, timer)
    # checked before tokenizing, so that a bad length does not wait for the data
    model.check_sequence_length(FLAGS.sequence_length, FLAGS.max_position)
    files = ct.data_files()
    run = ct.open_run(files)

    # ---------------------------------------------------------------------- data
    data = ct.load_data(run, files, None, FLAGS.tokenize_style or "space")
    epochs = tu.epochs_to_run(test_mode_default=2, steps_per_epoch=data.steps_per_epoch())

    # --------------------------------------------------------------------- model
    config = tu.config_from_flags(len(data.vocab), preset)
    with strategy.scope():
        classifier = ct.build_and_compile(model.build_backbone(config), len(data.labels),
                                          epochs * data.steps_per_epoch(),
                                          data.label_frequencies())
    ct.save_run_files(run, data, config)
    start = ct.evaluate(classifier, data, "valid")
    print(f"before training: valid loss {start['loss']:.4f}, F1 {start['f1']:.4f}")

    # ----------------------------------------------------------------------- fit
    history = ct.train(classifier, data, run, epochs)

    # -------------------------------------------------------------------- report
    scores = ct.report(classifier, data, run, history, "from scratch: validation F1")
    run.finish(scores)
    tu.summary_line("scratch", backbone=FLAGS.backbone, **scores, initial_valid_loss=start["loss"],
                    epochs=len(history), seconds=timer.seconds(), ckpt_dir=run.path)


def run_toy_task(strategy, preset: str, timer: tu.Timer) -> None:
    """Held-out accuracy on the toy task, the convergence check the original's Transformer failed."""
    (train_x, train_y), (test_x, test_y) = (ct.toy_task_data(n, 24, FLAGS.seed + i)
                                            for i, n in enumerate((4000, 1000)))
    config = tu.config_from_flags(ct.TOY_VOCAB_SIZE, preset)
    with strategy.scope():
        steps_per_epoch = ct.steps_per_epoch(len(train_x))
        epochs = tu.epochs_to_run(test_mode_default=10, steps_per_epoch=steps_per_epoch)
        classifier = ct.build_and_compile(model.build_backbone(config), 1,
                                          epochs * steps_per_epoch, train_y.mean(axis=0))
    classifier.fit(model.single_segment_inputs(train_x), train_y, batch_size=FLAGS.batch_size,
                   epochs=epochs, validation_data=(model.single_segment_inputs(test_x), test_y),
                   verbose=2)
    logits = model.predict_logits(classifier, test_x, FLAGS.batch_size)
    accuracy = float(np.mean((logits[:, 0] > 0) == (test_y[:, 0] > 0.5)))
    tu.summary_line("toy_task", backbone=FLAGS.backbone, accuracy=accuracy,
                    seconds=timer.seconds())


if __name__ == "__main__":
    app.run(tu.guard(main))
