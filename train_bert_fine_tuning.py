"""Step 2: restore the pretrained backbone and fine-tune a multi-label classifier on labelled data.

Quick CPU trial, after `python train_bert_lm.py --test_mode=True`:
    python train_bert_fine_tuning.py --test_mode=True
Full run on the sample multi-label task (or --task=sentiment):
    python train_bert_fine_tuning.py --pretrained_dir=runs/lm --num_epochs=5
Your own data (format: 'token1 token2 __label__a __label__b', one example a line):
    python train_bert_fine_tuning.py --pretrained_dir=runs/my_lm --training_data_file=train.txt \
        --valid_data_file=valid.txt --test_data_file=test.txt --ckpt_dir_save=runs/my_ft

The vocabulary, tokenize style and architecture come from --pretrained_dir; the labels from the
training file. Writes to --ckpt_dir_save: classifier.weights.h5 (best epoch by validation F1),
thresholds.json, config.json, vocab.txt, labels.txt, data_config.json, history.json/.png,
test_report.json, logs/.

The default recipe needs no learning-rate search: the head starts at the label priors, the rate
(--learning_rate; the backbone's --backbone_lr_scale of it) warms up over a tenth of the run (at
most an epoch) and falls linearly to 0, the bag-of-words model's own rate is picked by a 3-epoch
trial of that model alone on validation, training stops when validation F1 stalls for
--early_stopping_patience epochs, and per-label thresholds are tuned on validation.
"""
import cli  # first: it keeps TensorFlow's C++ start-up lines off the terminal

from absl import app, flags

import classifier_task
import data_util_hdf5 as data_util
import model
import run_directory
import train_util

FLAGS = flags.FLAGS
# The original's 1e-5 for everything learns almost nothing in a run of a few hundred steps.
cli.define_classifier_flags("runs/ft", (
    "Peak Adam learning rate of the new head; the pretrained backbone's is --backbone_lr_scale "
    "times it. The default, 1e-3, serves both backbones at every measured data size. A lower "
    "rate for the pretrained Transformer on a large labelled set helped one sample task and "
    "hurt the other (test F1 at 3e-4 against 1e-3, without weight averaging: reviews, 13,888 "
    "lines, 0.843 against 0.828; entities, 15,189 lines, 0.875 against 0.894; with the "
    "averaging that is now the default on sets that large, 1e-3 gives 0.845 on the reviews): "
    "try 3e-4 when the validation loss rises from the first epochs."))
flags.DEFINE_string("pretrained_dir", "runs/lm", "Run directory of train_bert_lm.py (its "
                    "--ckpt_dir): config.json, vocab.txt, data_config.json, backbone.weights.h5. "
                    "Test mode reads runs/test_lm unless the flag is given.")
flags.DEFINE_float("backbone_lr_scale", 1.0, "The pretrained backbone learns at this fraction of "
                   "--learning_rate while the new head learns at the full rate (ULMFiT's "
                   "discriminative rates; the original's 'smaller rate so fine-tuning does not "
                   "wreck pretraining', applied to the part that was pretrained). Default 1: "
                   "with the head started at the label priors and a warm-up, a small pretrained "
                   "TextCNN gained nothing from a slower backbone (0.3 trailed training from "
                   "scratch on the many-label sample task) and earlier searches picked full-size "
                   "rates for it; try 0.1-0.3 for a large, well-pretrained backbone.",
                   lower_bound=0.0)
flags.DEFINE_integer("frozen_epochs", 0, "Gradual unfreezing: the backbone stays fixed for this "
                     "many first epochs while the head finds its feet, then learns at "
                     "--backbone_lr_scale. 1 gained nothing on the six 1,000-line sample cells "
                     "(-0.003 to +0.001 F1, 3 seeds), hence 0.", lower_bound=0)
flags.DEFINE_boolean("freeze_backbone", False, "Train only the classifier head on top of the "
                     "pretrained features (the feature-based use of a pretrained model).")


def main(_):
    # --------------------------------------------------------------------- setup
    cli.validate_classifier_flags()
    timer, strategy = cli.start_run()
    pretrained = run_directory.open_finished(cli.run_dir_flag("pretrained_dir"), "pretrain",
                                             "--pretrained_dir")
    style = pretrained.read_json_object(run_directory.DATA_CONFIG).get("tokenize_style")
    if style not in data_util.TOKENIZE_STYLES:
        cli.fail(f"{pretrained.file(run_directory.DATA_CONFIG)}: tokenize_style {style!r} is not "
                 f"one of {', '.join(data_util.TOKENIZE_STYLES)}; pretrain again")
    if FLAGS.tokenize_style not in (None, style):
        cli.fail(f"--tokenize_style={FLAGS.tokenize_style} differs from the pretraining run's "
                 f"'{style}' ({pretrained.file(run_directory.DATA_CONFIG)}); drop the flag")
    # checked before tokenizing, so that a bad length does not wait for the data
    pretrained_config = model.ModelConfig.from_json(pretrained.verified(run_directory.CONFIG))
    max_position = pretrained_config.max_position
    if FLAGS.sequence_length:
        model.check_sequence_length(FLAGS.sequence_length, max_position)
    vocab = data_util.Vocabulary.load(pretrained.verified(run_directory.VOCAB))
    run, files = cli.open_classifier_run(strategy, cli.classifier_data_files(),
                                         pretrained=pretrained.manifest.get("checksums"))
    settings = cli.classifier_settings(cli.worker_cache_dir(run, strategy))

    # ---------------------------------------------------------------------- data
    data = classifier_task.load_data(files, style, settings, vocab=vocab,
                                     max_sequence_length=max_position)
    epochs = cli.epochs_to_run(test_mode_default=2, steps_per_epoch=data.steps_per_epoch())
    settings = classifier_task.choose_data_settings(data, epochs, settings)

    # --------------------------------------------------------------------- model
    with strategy.scope():
        backbone, config = model.load_backbone(
            pretrained.verified(run_directory.CONFIG),
            pretrained.verified(run_directory.BACKBONE_WEIGHTS),
            expected_vocab_size=len(vocab), dropout=settings.dropout,
            first_position_only=True)
        classifier = classifier_task.build_and_compile(
            backbone, *data.splits["train"], epochs, data.steps_per_epoch(), settings,
            FLAGS.backbone_lr_scale, FLAGS.freeze_backbone)
    classifier_task.save_run_files(run, data, config, settings, classifier)
    start = classifier_task.evaluate(classifier, data, "valid")
    print(f"before fine-tuning: valid loss {start['loss']:.4f}, F1 {start['f1']:.4f} "
          f"(micro {start['micro_f1']:.4f}, macro {start['macro_f1']:.4f})")

    # ----------------------------------------------------------------------- fit
    history = classifier_task.train(classifier, data, run, epochs, settings,
                                    0 if FLAGS.freeze_backbone else FLAGS.frozen_epochs)

    # -------------------------------------------------------------------- report
    scores = classifier_task.report(classifier, data, run, history,
                                    "fine-tuning: validation F1", settings.decision_rule)
    run.finish(scores)
    train_util.summary_line("fine_tune", **scores, initial_valid_loss=start["loss"],
                            initial_valid_f1=start["f1"], epochs=len(history),
                            seconds=timer.seconds(), ckpt_dir=run.path)


if __name__ == "__main__":
    app.run(cli.guard(main))
