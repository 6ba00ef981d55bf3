"""Step 1: pretrain a backbone (TextCNN or Transformer) with a masked language model on raw text.

Quick CPU trial (a few thousand lines, tiny model, about a minute):
    python train_bert_lm.py --test_mode=True
Full run on the sample corpus (prepared automatically under data/ on first use):
    python train_bert_lm.py --backbone=textcnn --preset=small --num_epochs=10
Your own corpus, raw Chinese text, one document a line, segmented with jieba:
    python train_bert_lm.py --mask_lm_source_file=corpus.txt --tokenize_style=word \
        --ckpt_dir=runs/my_lm
Several GPUs:
    python train_bert_lm.py --distribution_strategy=mirrored --batch_size=256

Re-running the same command after a crash, a kill or Ctrl-C resumes after the last complete epoch;
a finished run is never overwritten unless --overwrite=True (run_directory.py says what happens
when). Writes to --ckpt_dir: config.json, vocab.txt, data_config.json, backbone.weights.h5 (best
epoch by validation masked-LM loss), history.json, history.png, logs/ (TensorBoard), run.json
(status, fingerprint and checksums). Test mode writes to runs/test_lm unless --ckpt_dir is given.
"""
import cli  # first: it keeps TensorFlow's C++ start-up lines off the terminal

import os
import warnings

import keras
import tensorflow as tf
from absl import app, flags

import data_util_hdf5 as data_util
import model
import pretrain_task
import run_directory
import train_util
from data.prepare import ensure_sample_data

FLAGS = flags.FLAGS
cli.define_common_flags(1e-4, 0.01, "Use only the first few thousand corpus lines, the tiny "
                        "preset and one epoch, so the whole job finishes in about a minute.",
                        num_epochs_help="Passes over the corpus. Measured on the 1.5M-token "
                        "sample corpus (README, 'How long to pretrain'): the TextCNN gained "
                        "nothing measurable from 10 over 3, the Transformer (2 layers) gained on "
                        "every task from 3 to 10; stop when the valid masked-LM accuracy stops "
                        "climbing.")
cli.define_model_flags()
flags.DEFINE_string("mask_lm_source_file", None, "Unlabelled text for pretraining, one document a "
                    "line, its words separated by spaces (or give --tokenize_style=word/char for "
                    "raw text). Default: the sample corpus, <data_path>/pretrain_corpus.txt.")
flags.DEFINE_string("ckpt_dir", "runs/lm", "Run directory: weights, config, vocabulary, logs. "
                    "Fine-tuning reads it through its --pretrained_dir flag. Test mode writes "
                    "to runs/test_lm unless the flag is given.")
flags.DEFINE_integer("sequence_length_lm", 64, "Tokens per pretraining example, [CLS] and [SEP] "
                     "included; whole sentences are packed up to this length.")
flags.DEFINE_float("mask_rate", 0.15, "Fraction of real tokens masked in each example (80% become "
                   "[MASK], 10% a random token, 10% stay); new masks every epoch.")
flags.DEFINE_boolean("use_nsp", False, "Also train next-sentence prediction on [CLS] A [SEP] B "
                     "[SEP] pairs (50% true next segment, 50% random).")
flags.DEFINE_float("valid_fraction", 0.05, "Fraction of corpus documents held out for validation.")


def validate_flags() -> None:
    """Values that cannot work, refused in one line before any file is touched."""
    cli.validate_common_flags()
    shortest = 5 if FLAGS.use_nsp else 3  # [CLS] A [SEP] (B [SEP]), one token a segment
    cli.check_flag_values([
        ("sequence_length_lm", FLAGS.sequence_length_lm >= shortest, f"at least {shortest}"),
        ("mask_rate", 0 < FLAGS.mask_rate < 1, "between 0 and 1 (exclusive)"),
        ("valid_fraction", 0 < FLAGS.valid_fraction < 1, "between 0 and 1 (exclusive)")])
    model.check_sequence_length(FLAGS.sequence_length_lm, FLAGS.max_position)


def main(_):
    # --------------------------------------------------------------------- setup
    validate_flags()
    timer, strategy = cli.start_run()
    preset = "tiny" if FLAGS.test_mode else FLAGS.preset
    epochs = cli.epochs_to_run(test_mode_default=1)
    corpus_file = FLAGS.mask_lm_source_file or ensure_sample_data(FLAGS.data_path)["pretrain"]
    data_util.check_readable(corpus_file, "the pretraining corpus, --mask_lm_source_file")
    style = FLAGS.tokenize_style or "space"
    run = cli.open_training_run(
        strategy, "ckpt_dir", "pretrain",
        cli.run_fingerprint({"corpus": corpus_file}, tokenize=style, model_preset=preset))

    # ---------------------------------------------------------------------- data
    cache_dir = cli.worker_cache_dir(run, strategy) or FLAGS.cache_dir or os.path.join(
        os.path.dirname(os.path.abspath(corpus_file)), "cache")
    if FLAGS.test_mode:
        corpus_file = data_util.copy_first_lines(corpus_file, 3000,
                                                 run.file("test_corpus.txt"), FLAGS.encoding)
    data_util.warn_if_unsegmented(corpus_file, style, encoding=FLAGS.encoding)
    vocab, cache = pretrain_task.load_or_build_corpus_cache(
        corpus_file, style, FLAGS.vocab_size, cache_dir, FLAGS.encoding, FLAGS.process_num)
    run.write(run_directory.VOCAB, vocab.save)
    run.write_json(run_directory.DATA_CONFIG, {"tokenize_style": style, "vocab_size": len(vocab),
                                               "sequence_length_lm": FLAGS.sequence_length_lm})
    train_ds, valid_ds, steps = make_datasets(cache, vocab, strategy)
    print(f"pretraining: {steps} steps an epoch, {epochs} epochs, vocabulary {len(vocab)}")

    # --------------------------------------------------------------------- model
    config = cli.config_from_flags(len(vocab), preset)
    run.write_json(run_directory.CONFIG, config.to_dict())
    # Transformers are known to need a warm-up; 10% of an epoch unless the flag says otherwise.
    warmup = FLAGS.warmup_steps
    if warmup is None:
        warmup = steps // 10 if FLAGS.backbone == "transformer" else 0
    if not FLAGS.use_nsp:
        # Without NSP the pooler gets no gradient (fine-tuning trains it): not worth a warning.
        warnings.filterwarnings("ignore", message="Gradients do not exist for variables .*pooler")
    with strategy.scope():
        backbone = model.build_backbone(config, output_positions=True)
        pretrainer = model.build_pretraining_model(backbone, use_nsp=FLAGS.use_nsp)
        optimizer = train_util.make_optimizer(FLAGS.learning_rate, steps * epochs, warmup,
                                              FLAGS.decay_steps, FLAGS.decay_rate,
                                              FLAGS.weight_decay)
        model.compile_pretraining_model(pretrainer, optimizer, FLAGS.use_nsp, FLAGS.jit_compile)
        done, ended, best_state = run_directory.restore(run, pretrainer, epochs)

    # ----------------------------------------------------------------------- fit
    best = run_directory.BestEpoch(
        run, "val_mlm_loss", "min",
        lambda: run.save_weights(backbone, run_directory.BACKBONE_WEIGHTS), restored=best_state)
    callbacks = [best, keras.callbacks.TensorBoard(run.file(run_directory.LOGS)),
                 run_directory.EpochBackup(run, best)]
    if not ended:
        pretrainer.fit(train_ds, validation_data=valid_ds, epochs=epochs, initial_epoch=done,
                       callbacks=callbacks, shuffle=False,
                       verbose=train_util.fit_verbosity())

    # -------------------------------------------------------------------- report
    history = run_directory.read_json_file(run.file(run_directory.HISTORY), [])
    run.write(run_directory.HISTORY_PLOT, lambda path: train_util.plot_history(
        history, ["mlm_loss", "val_mlm_loss"], path, f"masked-LM pretraining ({FLAGS.backbone})"))
    best_epoch = min(history, key=lambda h: h["val_mlm_loss"])
    extra = {"best_valid_nsp_accuracy": best_epoch["val_nsp_accuracy"]} if FLAGS.use_nsp else {}
    scores = {"best_valid_mlm_loss": best_epoch["val_mlm_loss"],
              "best_valid_mlm_accuracy": best_epoch["val_mlm_accuracy"], **extra}
    run.finish(scores)
    train_util.summary_line("pretrain", backbone=FLAGS.backbone, **scores,
                            epochs=len(history), steps=steps * len(history),
                            seconds=timer.seconds(), ckpt_dir=run.path)


def make_datasets(cache: str, vocab: data_util.Vocabulary, strategy: tf.distribute.Strategy):
    """(training batches, validation batches, steps an epoch), streamed from the token cache a
    chunk at a time (memory does not grow with the corpus). --batch_size is the global batch.
    Under several workers each reads only its own shard of the documents, in per-replica
    batches, and every worker runs the smallest shard's number of steps."""
    workers, index = train_util.worker_shard(strategy)
    replicas = strategy.num_replicas_in_sync if workers > 1 else 1
    if FLAGS.batch_size % replicas:
        cli.fail(f"--batch_size={FLAGS.batch_size} must be a multiple of the {replicas} "
                 "replicas, so that each reads the same share of a step")
    settings = pretrain_task.PretrainingSettings(
        sequence_length=FLAGS.sequence_length_lm, batch_size=FLAGS.batch_size // replicas,
        mask_rate=FLAGS.mask_rate, valid_fraction=FLAGS.valid_fraction, seed=FLAGS.seed,
        use_nsp=FLAGS.use_nsp)
    data = pretrain_task.make_pretraining_datasets(cache, vocab, settings, workers, index)
    print(f"{data.train_examples} training and {data.valid_examples} validation sequences of "
          f"{FLAGS.sequence_length_lm} tokens" + (f" in shard {index} of {workers}"
                                                  if workers > 1 else ""))
    if workers == 1:
        return data.train, data.valid, data.steps_per_epoch
    steps = train_util.agreed_minimum(strategy, data.steps_per_epoch)
    if steps < data.steps_per_epoch:
        print(f"shard {index}: each epoch takes {steps} of its {data.steps_per_epoch} batches, "
              "as many as the smallest shard has (its chunks come in a new order every epoch, "
              "so other batches are left out each time)")
    valid_steps = train_util.agreed_minimum(
        strategy, -(-data.valid_examples // settings.batch_size))
    train = strategy.distribute_datasets_from_function(lambda _: data.train.take(steps))
    valid = strategy.distribute_datasets_from_function(lambda _: data.valid.take(valid_steps))
    return train, valid, steps


if __name__ == "__main__":
    app.run(cli.guard(main))
