"""Multi-label classification: the flags, data and training loop that fine-tuning (from a
pretrained backbone) and training from scratch share. The scripts call these in order."""
from __future__ import annotations

import os
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from absl import flags

import data_util_hdf5 as data_util
import model
import run_directory
import train_util
from data.prepare import ensure_sample_data

FLAGS = flags.FLAGS
TEST_MODE_LINES = {"train": 2000, "valid": 400, "test": 400}


def define_flags(default_learning_rate: float, default_ckpt_dir: str) -> None:
    """Flags common to train_bert_fine_tuning.py and train_transform.py."""
    train_util.define_common_flags(default_learning_rate, 0.0, "Use a small slice of each file, the "
                           "tiny preset (from scratch) and two epochs, to try an idea quickly.",
                           num_epochs=None, num_epochs_help="Passes over the training data, at "
                           "most. Default: enough for 1,000 steps, within 10 to 100 epochs (a "
                           "small labelled set needs many passes); early stopping ends most "
                           "runs sooner.")
    flags.DEFINE_string("task", "entities", "Sample task used when the data files are not given: "
                        "'entities' (multi-label, People's Daily paragraphs, 7 labels), "
                        "'mentions' (5-paragraph documents, 241 place/org labels with a long "
                        "tail) or 'sentiment' (reviews).")
    flags.DEFINE_string("training_data_file", None, "Labelled training file, one example a line: "
                        "'token1 token2 __label__a __label__b'. Default: the sample --task's.")
    flags.DEFINE_string("valid_data_file", None, "Labelled validation file (picks the best epoch).")
    flags.DEFINE_string("test_data_file", None, "Labelled test file (the final report).")
    flags.DEFINE_string("ckpt_dir_save", default_ckpt_dir, "Run directory for the classifier: "
                        "weights, config, vocabulary, labels, reports, logs. predict.py reads it. "
                        "Test mode writes to test_<name> beside it unless the flag is given.")
    flags.DEFINE_integer("sequence_length", 200, "Tokens per example including [CLS]; longer text "
                         "is cut, shorter padded. Must not exceed the backbone's max_position.")
    flags.DEFINE_integer("early_stopping_patience", 3, "Stop when validation F1 has not improved "
                         "for this many epochs (the best epoch's weights are kept, as always); "
                         "0 runs every --num_epochs.", lower_bound=0)
    flags.DEFINE_enum("decision_rule", "tuned", ["tuned", "half"], "How probabilities become "
                      "labels. 'tuned': per-label thresholds chosen on the validation split "
                      "(saved as thresholds.json, used by the test report and predict.py; rare "
                      "labels, which macro-F1 weighs like frequent ones, rarely reach 0.5). "
                      "'half': the original's rule, every label with p >= 0.5, else the top one.")


@dataclass
class ClassificationData:
    vocab: data_util.Vocabulary
    labels: list[str]
    tokenize_style: str
    splits: dict  # split -> (input_ids int32 [N,T], multi-hot uint8 [N,L])
    batch_size: int

    def dataset(self, split: str, shuffle: bool = False, seed: int = 0) -> tf.data.Dataset:
        """Batches of (backbone inputs, multi-hot labels), each cut to its longest row.

        Training (`shuffle`) groups rows of similar length (`length_buckets`), so short texts
        are not padded to the longest one of a random batch; other splits go shortest first.
        """
        ids, gold = self.splits[split]
        lengths = np.sum(ids != data_util.PAD_ID, axis=1)
        if not shuffle:
            order = np.argsort(lengths, kind="stable")
            data = tf.data.Dataset.from_tensor_slices((ids[order], gold[order].astype(np.float32)))
            return (data.batch(self.batch_size)
                    .map(lambda x, y: (model.single_segment_inputs(model.trim_padding(x)), y))
                    .prefetch(tf.data.AUTOTUNE))
        edges = length_buckets(lengths, self.batch_size)
        data = tf.data.Dataset.from_tensor_slices((ids, gold.astype(np.float32), lengths))
        data = (data.shuffle(len(ids), seed=seed, reshuffle_each_iteration=True)
                .map(lambda x, y, n: (x[:n], y))
                .bucket_by_sequence_length(lambda x, y: tf.shape(x)[0], edges,
                                           [self.batch_size] * (len(edges) + 1))
                .map(lambda x, y: (model.single_segment_inputs(_pad_to_multiple(x)), y)))
        return (data.apply(tf.data.experimental.assert_cardinality(self.steps_per_epoch()))
                .prefetch(tf.data.AUTOTUNE))

    def label_frequencies(self) -> np.ndarray:
        """Share of training examples carrying each label, float [num_labels]."""
        return self.splits["train"][1].mean(axis=0)

    def steps_per_epoch(self) -> int:
        """Training batches an epoch: one part-filled batch at most per length bucket."""
        lengths = np.sum(self.splits["train"][0] != data_util.PAD_ID, axis=1)
        bucket = np.searchsorted(length_buckets(lengths, self.batch_size), lengths, side="right")
        return int(sum(-(-count // self.batch_size) for count in np.bincount(bucket) if count))


def length_buckets(lengths: np.ndarray, batch_size: int) -> list[int]:
    """Boundaries of training length buckets (bucket i holds lengths in [edge i-1, edge i)).

    Up to 8 buckets at quantiles of the lengths, with at least 8 batches of rows each, so an
    epoch adds at most one part-filled batch per bucket (a few percent more steps) while a
    batch of 40-token reviews no longer pays for a 200-token one.
    """
    count = int(np.clip(len(lengths) // (8 * batch_size), 1, 8))
    edges = np.quantile(lengths, np.arange(1, count) / count).astype(int) + 1
    return sorted({int(edge) for edge in edges})


def _pad_to_multiple(token_ids: tf.Tensor, multiple: int = 8) -> tf.Tensor:
    """Pad the columns to a multiple of 8, so a compiled (XLA) step sees few shapes."""
    width = tf.shape(token_ids)[1]
    return tf.pad(token_ids, [[0, 0], [0, (-width) % multiple]])


def steps_per_epoch(num_examples: int) -> int:
    return -(-num_examples // FLAGS.batch_size)


def validate_flags() -> None:
    """The classifier flags' values that cannot work, refused in one line before any file is
    touched."""
    train_util.validate_common_flags()
    train_util.check_flag_values([("sequence_length", FLAGS.sequence_length >= 2,
                           "at least 2 ([CLS] and one token)")])


def data_files() -> dict[str, str]:
    """The train/valid/test files from the flags (or the sample task), each checked readable."""
    given = {"train": FLAGS.training_data_file, "valid": FLAGS.valid_data_file,
             "test": FLAGS.test_data_file}
    if not given["train"]:
        sample = ensure_sample_data(FLAGS.data_path)
        if FLAGS.task not in sample or FLAGS.task == "pretrain":
            raise train_util.UsageError(f"--task={FLAGS.task!r} is not a sample task; use entities, "
                                "mentions or sentiment")
        given = {split: given[split] or path for split, path in sample[FLAGS.task].items()}
    files = {split: path for split, path in given.items() if path}
    if "valid" not in files:
        raise train_util.UsageError("--valid_data_file is needed with --training_data_file: it picks "
                            "the best epoch (hold out about a tenth of your labelled lines for it)")
    for split, path in files.items():
        data_util.check_readable(path, f"the {split} data file")
    return files


def open_run(files: dict[str, str], **fingerprint_extra) -> run_directory.Run:
    """Lock --ckpt_dir_save and start, resume or refuse (see run_directory); in test mode the
    files are then cut to a small slice inside the run directory."""
    run, _ = run_directory.open_for_training(train_util.run_dir_flag("ckpt_dir_save"), "classifier",
                                  train_util.run_fingerprint(files, **fingerprint_extra), FLAGS.overwrite,
                                  "--ckpt_dir_save", test_run=FLAGS.test_mode)
    return run


def test_mode_slices(run: run_directory.Run, files: dict[str, str]) -> dict[str, str]:
    if not FLAGS.test_mode:
        return files
    return {split: train_util.head_file(path, TEST_MODE_LINES[split],
                                os.path.join(run.file(run_directory.TEST_DATA), f"{split}.txt"),
                                FLAGS.encoding)
            for split, path in files.items()}


def load_data(run: run_directory.Run, files: dict[str, str], vocab: data_util.Vocabulary | None,
              tokenize_style: str) -> ClassificationData:
    """Labels from the training file; vocabulary given (pretrained) or built from it (scratch)."""
    files = test_mode_slices(run, files)
    labels = data_util.build_label_list(files["train"], FLAGS.encoding)
    data_util.warn_if_unsegmented(files["train"], tokenize_style, labelled=True, encoding=FLAGS.encoding)
    cache_dir = FLAGS.cache_dir or os.path.join(os.path.dirname(os.path.abspath(files["train"])),
                                                "cache")
    if vocab is None:
        vocab = data_util.load_or_build_vocabulary([files["train"]], tokenize_style, FLAGS.vocab_size,
                                            cache_dir, labelled=True, encoding=FLAGS.encoding,
                                            process_num=FLAGS.process_num)
    cache = data_util.load_or_build_classification_cache(files, vocab, labels, FLAGS.sequence_length,
                                                  tokenize_style, cache_dir, FLAGS.encoding,
                                                  FLAGS.process_num)
    splits = {split: data_util.read_classification_split(cache, split) for split in files}
    print(", ".join(f"{split}: {len(ids)} examples" for split, (ids, _) in splits.items())
          + f"; {len(labels)} labels; vocabulary {len(vocab)}")
    return ClassificationData(vocab, labels, tokenize_style, splits, FLAGS.batch_size)


def save_run_files(run: run_directory.Run, data: ClassificationData, config: model.ModelConfig) -> None:
    """Everything predict.py needs besides the weights and thresholds."""
    run.write(run_directory.VOCAB, data.vocab.save)
    run.write(run_directory.LABELS, lambda path: data_util.save_label_list(data.labels, path))
    run.write_json(run_directory.CONFIG, config.to_dict())
    run.write_json(run_directory.DATA_CONFIG, {"tokenize_style": data.tokenize_style,
                                    "sequence_length": FLAGS.sequence_length,
                                    "dropout": 1.0 - FLAGS.dropout_keep_prob,
                                    "num_labels": len(data.labels)})


def build_and_compile(backbone: keras.Model, num_labels: int, total_steps: int,
                      label_frequencies: np.ndarray | None = None,
                      backbone_lr_scale: float | None = None,
                      freeze_backbone: bool = False) -> keras.Model:
    """Classifier = backbone + multi-label head, compiled with the flags' optimiser.

    The head's biases start at the label priors (when given); `backbone_lr_scale` makes the
    backbone learn at that fraction of --learning_rate (discriminative rates for a pretrained
    backbone, whose features a full-size step would wreck while the new head is still random).
    The schedule warms up over a tenth of `total_steps` and decays to 0 at the last one.
    """
    backbone.trainable = not freeze_backbone
    classifier = model.build_classifier(backbone, num_labels, 1.0 - FLAGS.dropout_keep_prob)
    if label_frequencies is not None:
        model.set_label_priors(classifier, label_frequencies)
    warmup = FLAGS.warmup_steps if FLAGS.warmup_steps is not None else total_steps // 10
    optimizer = train_util.make_optimizer(FLAGS.learning_rate, total_steps, warmup, FLAGS.decay_steps,
                                  FLAGS.decay_rate, FLAGS.weight_decay)
    if backbone_lr_scale is not None and not freeze_backbone:
        optimizer.scale_learning_rate(backbone.trainable_variables, backbone_lr_scale)
    model.compile_classifier(classifier, optimizer, FLAGS.jit_compile)
    return classifier


def probabilities(classifier: keras.Model, data: ClassificationData, split: str) -> np.ndarray:
    return train_util.sigmoid(model.predict_logits(classifier, data.splits[split][0], FLAGS.batch_size))


def evaluate(classifier: keras.Model, data: ClassificationData, split: str,
             thresholds: np.ndarray | None = None,
             probs: np.ndarray | None = None) -> dict[str, float]:
    """Loss and F1 scores on one split, with the current weights (`probs`: already predicted)."""
    loss = classifier.evaluate(data.dataset(split), verbose=0)
    loss = loss[0] if isinstance(loss, list) else loss
    if probs is None:
        probs = probabilities(classifier, data, split)
    return {"loss": float(loss), **train_util.f1_scores(data.splits[split][1], probs, thresholds)}


def train(classifier: keras.Model, data: ClassificationData, run: run_directory.Run, epochs: int,
          frozen_epochs: int = 0) -> list:
    """Fit with F1 on valid each epoch; keep the best weights; stop early; resume after a crash.
    `frozen_epochs`: epochs at the start in which the backbone does not move (gradual
    unfreezing; needs a classifier built with a backbone_lr_scale). Returns the history."""
    done, ended, best_state = run_directory.restore(run, classifier, epochs)
    valid_ids, valid_gold = data.splits["valid"]
    best = run_directory.BestEpoch(run, "val_f1", "max",
                        lambda: run.save_weights(classifier, run_directory.CLASSIFIER_WEIGHTS),
                        FLAGS.early_stopping_patience, best_state)
    callbacks = [train_util.F1Evaluation(valid_ids, valid_gold, FLAGS.batch_size,
                                 tune=FLAGS.decision_rule == "tuned")]
    if frozen_epochs:
        callbacks.append(train_util.SetBackboneScale(classifier.optimizer, frozen_epochs))
    callbacks += [best, keras.callbacks.TensorBoard(run.file(run_directory.LOGS)), run_directory.EpochBackup(run, best)]
    if not ended:
        classifier.fit(data.dataset("train", shuffle=True, seed=FLAGS.seed),
                       validation_data=data.dataset("valid"), epochs=epochs, initial_epoch=done,
                       callbacks=callbacks, shuffle=False, verbose=2 if FLAGS.test_mode else "auto")
    classifier.load_weights(run.verified(run_directory.CLASSIFIER_WEIGHTS))
    return run_directory.read_json_file(run.file(run_directory.HISTORY), [])


def choose_thresholds(classifier: keras.Model, data: ClassificationData,
                      run: run_directory.Run) -> np.ndarray | None:
    """--decision_rule=tuned: per-label thresholds from the validation split, saved for
    predict.py in thresholds.json; 'half': None (p >= 0.5)."""
    if FLAGS.decision_rule == "half":
        return None
    thresholds = train_util.tune_thresholds(data.splits["valid"][1],
                                    probabilities(classifier, data, "valid"))
    run.write_json(run_directory.THRESHOLDS,
                   {"rule": "tuned on the validation split",
                    "thresholds": {name: float(t) for name, t in zip(data.labels, thresholds)}})
    return thresholds


def report(classifier: keras.Model, data: ClassificationData, run: run_directory.Run, history: list,
           title: str) -> dict[str, float]:
    """Test-set scores + per-label file, the history plot; returns the test scores."""
    run.write(run_directory.HISTORY_PLOT, lambda path: train_util.plot_history(
        history, ["val_f1", "val_micro_f1", "val_macro_f1"], path, title))
    thresholds = choose_thresholds(classifier, data, run)
    split = "test" if "test" in data.splits else "valid"
    probs = probabilities(classifier, data, split)
    scores = evaluate(classifier, data, split, thresholds, probs)
    run.write_json(f"{split}_report.json",
                   {"split": split, "decision_rule": FLAGS.decision_rule, **scores,
                    "per_label": train_util.per_label_report(data.splits[split][1], probs, data.labels,
                                                     thresholds)})
    best = max(history, key=lambda h: h.get("val_f1", -1.0)) if history else {}
    return {f"{split}_micro_f1": scores["micro_f1"], f"{split}_macro_f1": scores["macro_f1"],
            f"{split}_f1": scores["f1"], "best_valid_f1": best.get("val_f1", float("nan")),
            "best_epoch": best.get("epoch", 0)}


# ------------------------------------------------------------------------------ toy task
TOY_VOCAB_SIZE = len(data_util.SPECIAL_TOKENS) + 2  # the two "bit" tokens follow the special ids


def toy_task_data(num_examples: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The original's toy task: random 0/1 sequences; the label says sum > length/2 + 1.

    Bits become token ids 5 and 6 (ids below are special) after a [CLS]. Returns input_ids
    int32 [N, length+1] and labels float32 [N, 1].
    """
    bits = np.random.default_rng(seed).integers(0, 2, size=(num_examples, length))
    ids = np.concatenate([np.full((num_examples, 1), data_util.CLS_ID), bits + len(data_util.SPECIAL_TOKENS)],
                         axis=1).astype(np.int32)
    labels = (bits.sum(axis=1) > length / 2 + 1).astype(np.float32)[:, None]
    return ids, labels
