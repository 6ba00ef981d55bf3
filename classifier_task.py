"""Multi-label classification: the data, training loop and report that fine-tuning (from a
pretrained backbone) and training from scratch share. The scripts call these in order, with the
settings their flags give (cli.classifier_settings); a notebook builds ClassifierSettings itself.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

import data_util_hdf5 as data_util
import model
import run_directory
import train_util

DECISION_RULES = ("tuned", "half")
# Bumped whenever a default of the recipe changes what a run with the same flags computes, so
# that a benchmark does not read back a run made under other defaults
# 2: warm-up at most one epoch; 3 (batch 32 on small sets) was withdrawn; 4: the bag-of-words
# rate chosen on valid; 5: weight averaging on by default for epochs of AVERAGING_MIN_STEPS steps
# or more (a run with fewer computes what it did under 4)
RECIPE_VERSION = 5
# The default weight averaging (`averaging_epochs`): over half an epoch of steps, and only when
# an epoch has at least this many. Measured with 3 seeds (benchmarks/results/
# weight_averaging_probe.md): on the sample sets of 217 and 237 steps an epoch it lifted the
# pretrained Transformer on reviews by 0.018 F1 and both pretrained TextCNNs by 0.005-0.006; on
# 1,000-line sets (16 steps) the models learn most in two epochs, the average lags behind them,
# and all three cells came out lower (-0.002 to -0.004). 100 sits between the 42 steps of the
# largest set left unaveraged (mentions/full, not measured with averaging) and 217.
DEFAULT_AVERAGING_EPOCHS = 0.5
AVERAGING_MIN_STEPS = 100


@dataclass(frozen=True)
class ClassifierSettings:
    """Everything besides data and model that loading, training and reporting take.

    sequence_length None: long enough for most training examples (`choose_sequence_length`).
    warmup_steps None: a tenth of the run, at most an epoch. decay_steps None: linear decay to 0
    at the last step, else the original's exponential decay (see train_util.WarmupDecay).
    cache_dir None: cache/ beside the training file. decision_rule: 'tuned' (per-label
    thresholds fitted on the validation split) or 'half' (p >= 0.5, the original's rule).
    bag_of_words_learning_rate None: chosen on valid (`choose_bag_of_words_rate`).
    bag_of_words_ngrams None: by the tokenization (`default_ngram_size`).
    weight_averaging None: by the size of an epoch (`averaging_epochs`).
    """
    batch_size: int = 64
    sequence_length: int | None = None
    dropout: float = 0.1
    learning_rate: float = 1e-3
    warmup_steps: int | None = None
    decay_steps: int | None = None
    decay_rate: float = 0.95
    weight_decay: float = 0.0
    bag_of_words: bool = True
    bag_of_words_learning_rate: float | None = None
    bag_of_words_ngrams: int | None = None
    jit_compile: bool = False
    weight_averaging: float | None = None
    early_stopping_patience: int = 3
    decision_rule: str = "tuned"
    seed: int = 42
    encoding: str = "utf-8"
    cache_dir: str | None = None
    process_num: int | None = None


@dataclass
class ClassificationData:
    vocab: data_util.Vocabulary
    labels: list[str]
    tokenize_style: str
    splits: dict  # split -> (input_ids int32 [N,T], multi-hot uint8 [N,L])
    batch_size: int
    sequence_length: int  # T: [CLS] + tokens, given or chosen from the training lengths

    def training_dataset(self, seed: int = 0) -> tf.data.Dataset:
        """Shuffled batches of (backbone inputs, multi-hot labels) for one epoch, rows of similar
        length together (`length_buckets`) and each batch cut to its longest row, so short texts
        are not padded to the longest one of a random batch. (Evaluation and prediction go
        through model.predict_logits, which sorts by length instead.)"""
        ids, gold = self.splits["train"]
        lengths = np.sum(ids != model.PAD_ID, axis=1)
        edges = length_buckets(lengths, self.batch_size)
        data = tf.data.Dataset.from_tensor_slices((ids, gold.astype(np.float32), lengths))
        data = (data.shuffle(len(ids), seed=seed, reshuffle_each_iteration=True)
                .map(lambda x, y, n: (x[:n], y))
                .bucket_by_sequence_length(lambda x, y: tf.shape(x)[0], edges,
                                           [self.batch_size] * (len(edges) + 1))
                .map(lambda x, y: (model.backbone_features(model.pad_to_multiple(x)), y)))
        return model.prefetched(
            data.apply(tf.data.experimental.assert_cardinality(self.steps_per_epoch())))

    def steps_per_epoch(self) -> int:
        """Training batches an epoch: one part-filled batch at most per length bucket."""
        lengths = np.sum(self.splits["train"][0] != model.PAD_ID, axis=1)
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


# The automatic sequence length leaves this share of training examples whole. The rest are
# cut, as TF-IDF would not cut them: on the many-label sample task (documents of 289 tokens on
# average) TF-IDF + LR reading only the first 200 tokens loses 0.036 F1 of its 0.358.
AUTO_LENGTH_COVERAGE = 0.95


def choose_sequence_length(lengths: np.ndarray, longest: int) -> int:
    """The length (rounded up to model.WIDTH_MULTIPLE, at most `longest`) that holds
    AUTO_LENGTH_COVERAGE of the training rows whole. Batches are cut to their longest row, so a
    long limit costs only where texts are long."""
    if not len(lengths):
        return longest
    covering = int(np.ceil(np.quantile(lengths, AUTO_LENGTH_COVERAGE)))
    rounded = -(-covering // model.WIDTH_MULTIPLE) * model.WIDTH_MULTIPLE
    return int(min(max(rounded, model.WIDTH_MULTIPLE), longest))


def load_data(files: dict[str, str], tokenize_style: str, settings: ClassifierSettings,
              vocab: data_util.Vocabulary | None = None, vocab_size: int | None = None,
              max_sequence_length: int = 512) -> ClassificationData:
    """Labels from the training file; the vocabulary given (pretrained) or built from the
    training file with `vocab_size` entries (from scratch). Rows hold settings.sequence_length
    tokens, or (None) a length chosen from the training split, at most `max_sequence_length`
    (the backbone's position table)."""
    labels = data_util.build_label_list(files["train"], settings.encoding)
    data_util.warn_if_unsegmented(files["train"], tokenize_style, labelled=True,
                                  encoding=settings.encoding)
    cache_dir = settings.cache_dir or os.path.join(
        os.path.dirname(os.path.abspath(files["train"])), "cache")
    if vocab is None:
        if vocab_size is None:
            raise ValueError("load_data needs a vocabulary or a vocab_size to build one")
        vocab = data_util.load_or_build_vocabulary(
            [files["train"]], tokenize_style, vocab_size, cache_dir, labelled=True,
            encoding=settings.encoding, process_num=settings.process_num)
    length = settings.sequence_length or max_sequence_length
    cache = data_util.load_or_build_classification_cache(
        files, vocab, labels, length, tokenize_style, cache_dir, settings.encoding,
        settings.process_num)
    if settings.sequence_length is None:
        lengths = data_util.classification_lengths(cache, "train")
        length = choose_sequence_length(lengths, max_sequence_length)
        # the cache holds rows cut at the limit: one that fills it may have been longer
        whole = lengths < length if length == max_sequence_length else lengths <= length
        print(f"sequence length {length} (automatic: {np.mean(whole):.0%} of the training "
              f"examples fit whole, at most {max_sequence_length}; set --sequence_length to "
              "choose)")
    splits = {split: data_util.read_classification_split(cache, split, length)
              for split in files}
    print(", ".join(f"{split}: {len(ids)} examples" for split, (ids, _) in splits.items())
          + f"; {len(labels)} labels; vocabulary {len(vocab)}")
    return ClassificationData(vocab, labels, tokenize_style, splits, settings.batch_size, length)


def save_run_files(run: run_directory.Run, data: ClassificationData, config: model.ModelConfig,
                   settings: ClassifierSettings, classifier: keras.Model) -> None:
    """Everything predict.py needs besides the weights and thresholds."""
    num_ngrams = classifier.get_layer("bag_of_words").num_ngrams if settings.bag_of_words else 0
    run.write(run_directory.VOCAB, data.vocab.save)
    run.write(run_directory.LABELS, lambda path: data_util.save_label_list(data.labels, path))
    run.write_json(run_directory.CONFIG, config.to_dict())
    run.write_json(run_directory.DATA_CONFIG, {"tokenize_style": data.tokenize_style,
                                               "sequence_length": data.sequence_length,
                                               "dropout": settings.dropout,
                                               "bag_of_words": settings.bag_of_words,
                                               "bag_of_words_learning_rate":
                                                   settings.bag_of_words_learning_rate,
                                               "bag_of_words_ngrams": settings.bag_of_words_ngrams,
                                               "bag_of_words_num_ngrams": num_ngrams,
                                               "weight_averaging": settings.weight_averaging,
                                               "num_labels": len(data.labels)})


def default_ngram_size(tokenize_style: str) -> int:
    """The longest n-gram the bag-of-words model counts unless told: 3 for characters, whose
    meaning sits in the words they make (on 1,000 raw reviews read as characters, TF-IDF + LR
    scored 0.770 on single characters and 0.794 on 1- to 3-grams), 1 for words (word bigrams:
    +0.006 on 1,000 reviews, -0.015 to -0.031 on the many-label sample task)."""
    return 3 if tokenize_style == "char" else 1


def bag_of_words_ngrams(train_ids: np.ndarray, settings: ClassifierSettings) -> np.ndarray:
    """The n-grams (model.ngram_vocabulary) the settings' bag-of-words model counts: none
    without one, or when it counts words alone."""
    if not settings.bag_of_words or (settings.bag_of_words_ngrams or 1) < 2:
        return np.zeros(0, np.int64)
    return model.ngram_vocabulary(train_ids, settings.bag_of_words_ngrams)


def default_warmup_steps(epochs: int, steps_per_epoch: int) -> int:
    """A tenth of the planned run, at most one epoch. A small labelled set is planned for many
    epochs (cli.epochs_to_run) that early stopping mostly cuts short; a tenth of that plan held
    the rate low for 2-6 of the epochs the patience counts (on `mentions`, valid F1 after 3
    epochs 0.312 with 2.3 epochs of warm-up, 0.336 with one)."""
    return min(epochs * steps_per_epoch // 10, steps_per_epoch)


def averaging_epochs(settings: ClassifierSettings, steps_per_epoch: int) -> float:
    """Epochs of steps the moving average of the weights spans (0: none): the settings' value,
    else DEFAULT_AVERAGING_EPOCHS when an epoch has AVERAGING_MIN_STEPS steps or more."""
    if settings.weight_averaging is not None:
        return settings.weight_averaging
    return DEFAULT_AVERAGING_EPOCHS if steps_per_epoch >= AVERAGING_MIN_STEPS else 0.0


def choose_weight_averaging(settings: ClassifierSettings,
                            steps_per_epoch: int) -> ClassifierSettings:
    """`settings` with the weight averaging `averaging_epochs` gives, so that the run records
    what it used; says so when the default turns it on."""
    chosen = averaging_epochs(settings, steps_per_epoch)
    if settings.weight_averaging is None and chosen:
        print(f"weight averaging over {chosen:g} epochs of steps, as an epoch has "
              f"{steps_per_epoch} steps (>= {AVERAGING_MIN_STEPS}); --weight_averaging=0 turns "
              "it off", flush=True)
    return dataclasses.replace(settings, weight_averaging=chosen)


def choose_data_settings(data: ClassificationData, planned_epochs: int,
                         settings: ClassifierSettings) -> ClassifierSettings:
    """`settings` with the defaults that depend on the training data filled in: the
    bag-of-words n-grams (`default_ngram_size`) and rate (`choose_bag_of_words_rate`), and the
    weight averaging (`choose_weight_averaging`)."""
    if settings.bag_of_words_ngrams is None:
        settings = dataclasses.replace(settings,
                                       bag_of_words_ngrams=default_ngram_size(data.tokenize_style))
    settings = choose_bag_of_words_rate(data, planned_epochs, settings)
    return choose_weight_averaging(settings, data.steps_per_epoch())


def averaging_momentum(epochs: float, steps_per_epoch: int) -> float | None:
    """The moving average's momentum that weighs about `epochs` epochs of steps (None: 0)."""
    if epochs <= 0:
        return None
    return 1.0 - 1.0 / max(epochs * steps_per_epoch, 1.0)


def make_optimizer(settings: ClassifierSettings, epochs: int, steps_per_epoch: int,
                   average: bool = False) -> train_util.DiscriminativeAdamW:
    """The settings' AdamW on the classifier's schedule: warm-up (`default_warmup_steps` unless
    the settings give one), then decay to 0 at the last of `epochs` x `steps_per_epoch` steps.
    `average`: keep the moving average of the weights the settings ask for."""
    warmup = settings.warmup_steps if settings.warmup_steps is not None \
        else default_warmup_steps(epochs, steps_per_epoch)
    momentum = averaging_momentum(averaging_epochs(settings, steps_per_epoch), steps_per_epoch) \
        if average else None
    return train_util.make_optimizer(settings.learning_rate, epochs * steps_per_epoch, warmup,
                                     settings.decay_steps, settings.decay_rate,
                                     settings.weight_decay, average_momentum=momentum)


def learn_bag_of_words_by_sgd(classifier: keras.Model, optimizer: train_util.DiscriminativeAdamW,
                              rate: float, learning_rate: float) -> None:
    """The bag-of-words model's steps: SGD at `rate` on the schedule whose peak is
    `learning_rate` (train_util.DiscriminativeAdamW.learn_by_sgd says why not Adam)."""
    optimizer.learn_by_sgd(classifier.get_layer("bag_of_words").trainable_variables,
                           rate / learning_rate)


def build_and_compile(backbone: keras.Model, train_ids: np.ndarray, train_labels: np.ndarray,
                      epochs: int, steps_per_epoch: int, settings: ClassifierSettings,
                      backbone_lr_scale: float | None = None,
                      freeze_backbone: bool = False) -> keras.Model:
    """Classifier = backbone + multi-label head (+ the bag-of-words model when the settings say
    so, at the settings' rate: see `choose_bag_of_words_rate`), compiled with the settings'
    optimiser (`make_optimizer`).

    From the training split (ids int [N,T], multi-hot labels [N,labels]) the head's biases start
    at the label priors and the bag-of-words model takes its idf. `backbone_lr_scale` makes the
    backbone learn at that fraction of the learning rate (discriminative rates for a pretrained
    backbone, whose features a full-size step would wreck while the new head is still random).
    """
    if settings.bag_of_words and settings.bag_of_words_learning_rate is None:
        raise ValueError("the settings have no bag-of-words rate: choose_bag_of_words_rate first")
    backbone.trainable = not freeze_backbone
    ngrams = bag_of_words_ngrams(train_ids, settings)
    classifier = model.build_classifier(backbone, train_labels.shape[1], settings.dropout,
                                        settings.bag_of_words, settings.bag_of_words_ngrams or 1,
                                        len(ngrams))
    model.set_label_priors(classifier, train_labels.mean(axis=0))
    optimizer = make_optimizer(settings, epochs, steps_per_epoch, average=True)
    if backbone_lr_scale is not None and not freeze_backbone:
        optimizer.scale_learning_rate(backbone.trainable_variables, backbone_lr_scale)
    if settings.bag_of_words:
        model.set_document_frequencies(classifier, train_ids, ngrams)
        learn_bag_of_words_by_sgd(classifier, optimizer, settings.bag_of_words_learning_rate,
                                  settings.learning_rate)
    model.compile_classifier(classifier, optimizer, settings.jit_compile)
    return classifier


# Candidate rates of the bag-of-words model, and the epoch at which the linear model alone is
# scored on valid to choose one. 10 suits short texts (the 1,000-line sentiment and entities
# sets: 33-42 distinct words a document). An L2-normalised TF-IDF vector gives each word of a
# long document a smaller value, so the same rate moves its predictions more slowly: on the
# many-label sample task (165 words) the linear model alone peaked after 6 epochs at rate 10
# and after 3-5 at 20, while the network had finished its fastest learning by epoch 3. Scored
# at epoch 3 rather than at its best so far: a rate that peaks in epoch 1-2 and then overfits
# (sentiment at 20) is too fast for a run that the network's pace stops, and on the three
# sample tasks the rate that scored best at epoch 3 was the one the whole classifier did best
# with (benchmarks/results/bag_of_words_probe.md).
BAG_OF_WORDS_RATES = (10.0, 20.0, 40.0)
BAG_OF_WORDS_TRIAL_EPOCHS = 3


def bag_of_words_trial(data: ClassificationData, rate: float, epochs: int, planned_epochs: int,
                       settings: ClassifierSettings) -> list[float]:
    """Valid F1 (thresholds tuned on valid) after each of `epochs` epochs of the bag-of-words
    model alone (model.build_bag_of_words_classifier), trained at `rate` on the schedule of a
    run planned for `planned_epochs`."""
    ids, gold = data.splits["train"]
    ngrams = bag_of_words_ngrams(ids, settings)
    trial = model.build_bag_of_words_classifier(len(data.vocab), gold.mean(axis=0),
                                                settings.bag_of_words_ngrams or 1, len(ngrams))
    model.set_document_frequencies(trial, ids, ngrams)
    optimizer = make_optimizer(settings, planned_epochs, data.steps_per_epoch())
    learn_bag_of_words_by_sgd(trial, optimizer, rate, settings.learning_rate)
    model.compile_classifier(trial, optimizer)
    scores = train_util.ValidationScores(*data.splits["valid"], data.batch_size, tune=True)
    history = trial.fit(data.training_dataset(settings.seed), epochs=epochs, callbacks=[scores],
                        shuffle=False, verbose=0)
    return [float(f1) for f1 in history.history["val_f1"]]


def choose_bag_of_words_rate(data: ClassificationData, planned_epochs: int,
                             settings: ClassifierSettings) -> ClassifierSettings:
    """The settings with a bag-of-words rate: theirs when set, else the one of
    BAG_OF_WORDS_RATES at which the linear model alone scores best on valid after
    BAG_OF_WORDS_TRIAL_EPOCHS epochs (ties: the slower). A few seconds to a minute; the random
    seed is set again afterwards, so the classifier starts as it would without the trial."""
    if not settings.bag_of_words or settings.bag_of_words_learning_rate is not None:
        return settings
    scores = {rate: bag_of_words_trial(data, rate, BAG_OF_WORDS_TRIAL_EPOCHS, planned_epochs,
                                       settings)[-1]
              for rate in BAG_OF_WORDS_RATES}
    chosen = max(scores, key=scores.get)  # the first of equal scores: the slower rate
    keras.utils.set_random_seed(settings.seed)
    print(f"bag-of-words rate {chosen:g} (valid F1 of the linear model alone after "
          f"{BAG_OF_WORDS_TRIAL_EPOCHS} epochs: "
          + ", ".join(f"rate {rate:g} {f1:.4f}" for rate, f1 in scores.items())
          + "; set --bag_of_words_learning_rate to choose)")
    return dataclasses.replace(settings, bag_of_words_learning_rate=chosen)


def logits(classifier: keras.Model, data: ClassificationData, split: str) -> np.ndarray:
    return model.predict_logits(classifier, data.splits[split][0], data.batch_size)


def evaluate(classifier: keras.Model, data: ClassificationData, split: str,
             thresholds: np.ndarray | None = None) -> dict[str, float]:
    """Loss and F1 scores on one split with the current weights, from one pass over it."""
    return model.split_scores(data.splits[split][1], logits(classifier, data, split), thresholds)


def train(classifier: keras.Model, data: ClassificationData, run: run_directory.Run,
          epochs: int, settings: ClassifierSettings, frozen_epochs: int = 0) -> list:
    """Fit with loss and F1 on valid each epoch; keep the best weights; stop early; resume after
    a crash. `frozen_epochs`: epochs at the start in which the backbone does not move (gradual
    unfreezing; needs a classifier built with a backbone_lr_scale). Returns the history."""
    done, ended, best_state = run_directory.restore(run, classifier, epochs)
    valid_ids, valid_gold = data.splits["valid"]
    best = run_directory.BestEpoch(
        run, "val_f1", "max",
        lambda: run.save_weights(classifier, run_directory.CLASSIFIER_WEIGHTS),
        settings.early_stopping_patience, best_state)
    scoring = [train_util.ValidationScores(valid_ids, valid_gold, data.batch_size,
                                           tune=settings.decision_rule == "tuned")]
    if frozen_epochs:
        scoring.append(train_util.SetBackboneScale(classifier.optimizer, frozen_epochs))
    scoring += [best, keras.callbacks.TensorBoard(run.file(run_directory.LOGS))]
    callbacks = train_util.scored_with_averages(classifier, scoring,
                                                [run_directory.EpochBackup(run, best)])
    if not ended:
        classifier.fit(data.training_dataset(settings.seed), epochs=epochs,
                       initial_epoch=done, callbacks=callbacks, shuffle=False,
                       verbose=train_util.fit_verbosity())
    classifier.load_weights(run.verified(run_directory.CLASSIFIER_WEIGHTS))
    return run_directory.read_json_file(run.file(run_directory.HISTORY), [])


def choose_thresholds(classifier: keras.Model, data: ClassificationData, run: run_directory.Run,
                      decision_rule: str) -> np.ndarray | None:
    """'tuned': per-label thresholds from the validation split, saved for predict.py in
    thresholds.json; 'half': None (p >= 0.5)."""
    if decision_rule == "half":
        return None
    thresholds = model.tune_thresholds(data.splits["valid"][1],
                                       model.sigmoid(logits(classifier, data, "valid")))
    run.write_json(run_directory.THRESHOLDS,
                   {"rule": "tuned on the validation split",
                    "thresholds": {name: float(t) for name, t in zip(data.labels, thresholds)}})
    return thresholds


def report(classifier: keras.Model, data: ClassificationData, run: run_directory.Run,
           history: list, title: str, decision_rule: str) -> dict[str, float]:
    """Test-set scores + per-label file, the history plot; returns the test scores."""
    run.write(run_directory.HISTORY_PLOT, lambda path: train_util.plot_history(
        history, ["val_f1", "val_micro_f1", "val_macro_f1"], path, title))
    thresholds = choose_thresholds(classifier, data, run, decision_rule)
    split = "test" if "test" in data.splits else "valid"
    gold, split_logits = data.splits[split][1], logits(classifier, data, split)
    scores = model.split_scores(gold, split_logits, thresholds)
    per_label = model.per_label_report(gold, model.sigmoid(split_logits), data.labels, thresholds)
    run.write_json(f"{split}_report.json", {"split": split, "decision_rule": decision_rule,
                                            **scores, "per_label": per_label})
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
    ids = np.concatenate([np.full((num_examples, 1), data_util.CLS_ID),
                          bits + len(data_util.SPECIAL_TOKENS)],
                         axis=1).astype(np.int32)
    labels = (bits.sum(axis=1) > length / 2 + 1).astype(np.float32)[:, None]
    return ids, labels
