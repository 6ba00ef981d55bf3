"""Task models = backbone + head(s), with their losses and metrics."""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from .backbone import (INPUT_NAMES, PAD_ID, backbone_features, backbone_inputs, build_backbone,
                       get_token_embedding, trim_padding)
from .config import ModelConfig
from .heads import (BagOfWordsLogits, MaskedLMHead, MultiLabelHead, NextSentenceHead,
                    ngram_keys)
from .layers import PACKAGE, with_layer_deserialized


@keras.saving.register_keras_serializable(package=PACKAGE)
class PretrainingModel(keras.Model):
    """Backbone inputs + `masked_positions` [B,P] -> `{"mlm": logits [B,P,V]}` (+ `"nsp"` [B,2]).

    A functional model around `backbone`: a masked-LM head scoring with the backbone's own token
    embedding (tied weights), and a next-sentence head on the pooled output when `use_nsp`. A
    backbone built with `output_positions` (as train_bert_lm.py builds it) computes the last
    block at [CLS] and the masked positions alone: the same model for less work. Its
    config is the backbone's config and `use_nsp`, so a re-created model (`from_config`,
    `keras.saving.load_model`) builds its head around its new backbone's embedding again.

    It logs `mlm_loss` even when that is its only loss. Keras names per-output losses only when a
    model has several, so without NSP the masked-LM loss would appear as plain `loss`; a second
    metric computing it again would double the cost of the softmax over the vocabulary, the
    step's largest single operation.
    """

    def __init__(self, backbone: keras.Model, use_nsp: bool = False, **kwargs):
        inputs = backbone_inputs("masked_positions")
        features = {name: inputs[name] for name in INPUT_NAMES}
        embeddings = backbone.get_layer("embeddings")
        head = MaskedLMHead(get_token_embedding(backbone), embeddings.initializer_range,
                            name="mlm_head")
        if "output_positions" in backbone.input:  # its last block computes these alone
            outputs = backbone({**features, "output_positions": inputs["masked_positions"]})
            results = {"mlm": head(outputs["sequence_output"])}
        else:
            outputs = backbone(features)
            results = {"mlm": head(outputs["sequence_output"], inputs["masked_positions"])}
        if use_nsp:
            results["nsp"] = NextSentenceHead(embeddings.d_model, name="nsp_head")(
                outputs["pooled_output"])
        super().__init__(inputs, results, **kwargs)
        self.backbone, self.use_nsp = backbone, use_nsp

    def get_metrics_result(self) -> dict:
        result = super().get_metrics_result()
        if "mlm_loss" not in result and "loss" in result:
            result["mlm_loss"] = result["loss"]
        return result

    def get_config(self) -> dict:
        return {"name": self.name, "trainable": self.trainable,
                "backbone": keras.layers.serialize(self.backbone), "use_nsp": self.use_nsp}

    @classmethod
    def from_config(cls, config: dict) -> "PretrainingModel":
        return cls(**with_layer_deserialized(config, "backbone"))


def build_pretraining_model(backbone: keras.Model, use_nsp: bool = False) -> keras.Model:
    """The PretrainingModel around `backbone`, named as its weight files expect."""
    return PretrainingModel(backbone, use_nsp, name="pretraining_model")


def build_classifier(backbone: keras.Model, num_labels: int, dropout: float,
                     bag_of_words: bool = False, ngram_size: int = 1,
                     num_ngrams: int = 0) -> keras.Model:
    """Backbone inputs -> one logit per label [B, num_labels] (sigmoid for probabilities).

    With `bag_of_words` the logits are the head's on the pooled output plus a linear model over
    the text's TF-IDF vector (BagOfWordsLogits; set its idf with set_document_frequencies): the
    pooled vector has d_model numbers for hundreds of labels, while a linear model reads every
    word of the vocabulary, so each covers what the other misses. `ngram_size`, `num_ngrams`:
    the n-grams it counts besides words (BagOfWordsLogits).
    """
    inputs = backbone_inputs()
    pooled = backbone(inputs)["pooled_output"]
    embeddings = backbone.get_layer("embeddings")
    logits = MultiLabelHead(embeddings.d_model, num_labels, dropout, embeddings.initializer_range,
                            name="classifier_head")(pooled)
    if bag_of_words:
        logits = logits + BagOfWordsLogits(embeddings.vocab_size, num_labels, ngram_size,
                                           num_ngrams, name="bag_of_words")(inputs["token_ids"])
    return keras.Model(inputs, logits, name="classifier")


def build_scoring_classifier(config: ModelConfig, num_labels: int, dropout: float,
                             bag_of_words: bool = False, ngram_size: int = 1,
                             num_ngrams: int = 0) -> keras.Model:
    """`build_classifier` on a new backbone of `config` whose last Transformer block computes the
    [CLS] position alone, as the classifiers train: for scoring (predict.py, its export). It
    loads a trained classifier's weight file, whichever backbone that was trained with."""
    return build_classifier(build_backbone(config, first_position_only=True), num_labels,
                            dropout, bag_of_words, ngram_size, num_ngrams)


def build_bag_of_words_classifier(vocab_size: int, priors: np.ndarray, ngram_size: int = 1,
                                  num_ngrams: int = 0) -> keras.Model:
    """The classifier's bag-of-words model alone (a layer named "bag_of_words"), its logits
    offset by the log-odds of `priors` [num_labels] (fixed): for trying the linear part's
    learning rate in seconds, without the backbone. Same inputs and outputs as
    build_classifier's model."""
    inputs = backbone_inputs()
    logits = BagOfWordsLogits(vocab_size, len(priors), ngram_size, num_ngrams,
                              name="bag_of_words")(inputs["token_ids"])
    return keras.Model(inputs, logits + ops.convert_to_tensor(label_log_odds(priors)),
                       name="bag_of_words_classifier")


# The n-grams the bag-of-words model counts: those in at least NGRAM_MIN_ROWS training rows
# (TfidfVectorizer's min_df=2: most n-grams occur once, and a feature seen once is noise), the
# NGRAM_LIMIT most widespread at most, so that the [features, labels] kernel stays bounded.
NGRAM_MIN_ROWS = 2
NGRAM_LIMIT = 100_000


def ngram_vocabulary(token_ids: np.ndarray, ngram_size: int,
                     batch_size: int = 4096) -> np.ndarray:
    """The keys (heads.ngram_keys) of the 2- to `ngram_size`-grams of words that the
    bag-of-words model should count, from training rows [N,T]: sorted int64 [num_ngrams]."""
    if ngram_size < 2:
        return np.zeros(0, np.int64)
    found_in_rows = []
    for start in range(0, len(token_ids), batch_size):
        batch, keys = token_ids[start:start + batch_size], []
        for order in range(2, ngram_size + 1):
            order_keys, whole = (ops.convert_to_numpy(x) for x in ngram_keys(batch, order))
            keys.append(np.where(whole, order_keys, -1))
        each_row = distinct_in_each_row(np.concatenate(keys, axis=1))
        found_in_rows.append(each_row[each_row >= 0])
    found, df = np.unique(np.concatenate(found_in_rows), return_counts=True)
    kept = found[df >= NGRAM_MIN_ROWS]
    if len(kept) > NGRAM_LIMIT:
        widespread = np.argsort(-df[df >= NGRAM_MIN_ROWS], kind="stable")[:NGRAM_LIMIT]
        kept = kept[widespread]
    return np.sort(kept).astype(np.int64)


def distinct_in_each_row(values: np.ndarray) -> np.ndarray:
    """Each row's distinct values, flattened [<= N*T] (a row's repeats dropped: for counting
    the rows a value occurs in)."""
    ordered = np.sort(values, axis=1)
    first = np.ones_like(ordered, bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    return ordered[first]


def set_document_frequencies(classifier: keras.Model, token_ids: np.ndarray,
                             ngrams: np.ndarray | None = None, batch_size: int = 512) -> None:
    """Set the bag-of-words n-grams (`ngrams`, from ngram_vocabulary, when it counts any) and
    its idf from training rows [N,T]: ln((1 + N) / (1 + df)) + 1, where df is the number of
    rows holding the feature (scikit-learn's smoothed idf)."""
    layer = classifier.get_layer("bag_of_words")
    if layer.num_ngrams:
        layer.known_ngrams.assign(ngrams)
    features = layer.vocab_size + layer.num_ngrams
    df = np.zeros(features, np.int64)
    for start in range(0, len(token_ids), batch_size):
        ids, present = (ops.convert_to_numpy(x)
                        for x in layer.feature_ids(token_ids[start:start + batch_size]))
        each_row = distinct_in_each_row(np.where(present > 0, ids, -1))
        df += np.bincount(each_row[each_row >= 0], minlength=features)[:features]
    layer.idf.assign((np.log((1 + len(token_ids)) / (1 + df)) + 1).astype(np.float32))


# Batches a pipeline prepares ahead of the model: ours read arrays already in memory
PREFETCH_BATCHES = 2


def prefetched(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` with PREFETCH_BATCHES batches prepared ahead and tf.data's autotuning off.

    Deleting an autotuned iterator waits for the autotuning thread's next wake-up, and its
    sleep doubles from 10 ms (wake-ups 5.1 s and 10.2 s after the start, ...). Keras deletes an
    iterator after every epoch and every evaluation, so each waited up to seconds for nothing:
    a 1,000-line fine-tuning epoch took 5.4 s instead of 4.7 s, and a timed 2-step fit 5.1 s
    instead of 4.2 s. Our pipelines batch arrays already read, leaving the tuner nothing else.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.prefetch(PREFETCH_BATCHES).with_options(options)


def predict_logits(classifier: keras.Model, token_ids: np.ndarray, batch_size: int) -> np.ndarray:
    """The classifier's logits [N, labels] for id rows [N,T], in the rows' order.

    Rows are scored shortest first and each batch is cut to its longest row, so short texts
    padded to a long --sequence_length cost what their real length costs; the numbers are those
    of one padded pass (padding is masked).
    """
    if len(token_ids) == 0:
        return np.zeros((0, classifier.output_shape[-1]), np.float32)
    order = np.argsort(np.sum(token_ids != PAD_ID, axis=1), kind="stable")
    batches = prefetched(tf.data.Dataset.from_tensor_slices(token_ids[order]).batch(batch_size)
                         .map(lambda ids: backbone_features(trim_padding(ids))))
    logits = np.empty((len(token_ids), classifier.output_shape[-1]), np.float32)
    logits[order] = classifier.predict(batches, verbose=0)
    return logits


def set_label_priors(classifier: keras.Model, frequencies) -> None:
    """Start each label's sigmoid at its frequency in the training data (bias = log-odds).

    A fresh head says p = 0.5 for every label, which costs ln 2 per label and example: with 200
    labels the first hundreds of steps only learn that most labels are absent. Starting at the
    priors, the first steps learn from the text instead.
    """
    classifier.get_layer("classifier_head").dense.bias.assign(label_log_odds(frequencies))


def label_log_odds(frequencies) -> np.ndarray:
    """float32 log(p / (1 - p)) of each label's frequency, p kept within [1e-5, 1 - 1e-5] so a
    label absent from (or in every row of) the training data gets a finite bias."""
    p = np.clip(np.asarray(frequencies, np.float64), 1e-5, 1 - 1e-5)
    return (np.log(p) - np.log1p(-p)).astype(np.float32)


@keras.saving.register_keras_serializable(package=PACKAGE)
def masked_lm_loss(y_true, y_pred):
    """Cross-entropy averaged over the real masked slots only, as one value an example.

    `y_true` [B,P] holds the original ids; 0 (the PAD id) marks an unused slot, which costs
    nothing. Example i gets B * (its slots' loss) / (the batch's real slots), so Keras' mean over
    the batch is the mean over the batch's real slots. A single scalar would be the same number
    on one device, but Keras adds up such scalars over replicas under tf.distribute (the logged
    loss doubled with 2 replicas); per-example values it averages.
    """
    targets = ops.cast(y_true, "int32")
    weights = ops.cast(targets != 0, y_pred.dtype)
    losses = keras.losses.sparse_categorical_crossentropy(targets, y_pred, from_logits=True)
    batch = ops.cast(ops.shape(targets)[0], y_pred.dtype)
    return ops.sum(losses * weights, axis=1) * batch / ops.maximum(ops.sum(weights), 1.0)


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaskedLMAccuracy(keras.metrics.Metric):
    """Share of real masked slots (target != 0) whose top-scored token is the original one."""

    def __init__(self, name: str = "accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.correct = self.add_variable(shape=(), initializer="zeros", name="correct")
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        targets = ops.cast(y_true, "int32")
        real = ops.cast(targets != 0, "float32")
        # the target's score against the best score: keras' argmax on floats adds four
        # elementwise passes over the [B,P,vocab] logits (a negative-zero fix) that cost more
        # than the softmax itself
        target_scores = ops.take_along_axis(y_pred, targets[..., None], axis=-1)[..., 0]
        hits = ops.cast(target_scores >= ops.max(y_pred, axis=-1), "float32") * real
        self.correct.assign_add(ops.sum(hits))
        self.total.assign_add(ops.sum(real))

    def result(self):
        return self.correct / ops.maximum(self.total, 1.0)

    def reset_state(self):
        self.correct.assign(0.0)
        self.total.assign(0.0)


def compile_pretraining_model(model: keras.Model, optimizer, use_nsp: bool = False,
                              jit_compile: bool = False) -> None:
    """Logs mlm_loss, mlm_accuracy (+ nsp_loss, nsp_accuracy), and val_ versions of each.

    Without NSP the pooler gets no gradient (fine-tuning trains it), so Keras warns "Gradients do
    not exist for variables ... pooler" when a Transformer's pooler has weights; a script may
    silence that, the library leaves the process's warning filters alone.
    """
    loss = {"mlm": masked_lm_loss}
    # Keras prefixes metric names with the output name only when there are several outputs.
    metrics = {"mlm": [MaskedLMAccuracy(name="accuracy" if use_nsp else "mlm_accuracy")]}
    if use_nsp:
        loss["nsp"] = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics["nsp"] = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics, jit_compile=jit_compile)
    build_optimizer(model)


@keras.saving.register_keras_serializable(package=PACKAGE)
def multilabel_loss(y_true, y_pred):
    """Binary cross-entropy on logits, summed over labels (as the original), averaged over
    examples."""
    losses = ops.binary_crossentropy(ops.cast(y_true, y_pred.dtype), y_pred, from_logits=True)
    return ops.sum(losses, axis=-1)


def compile_classifier(model: keras.Model, optimizer, jit_compile: bool = False) -> None:
    model.compile(optimizer=optimizer, loss=multilabel_loss, jit_compile=jit_compile)
    build_optimizer(model)


def build_optimizer(model: keras.Model) -> None:
    """Make the compiled model's optimizer slots now, in the caller's strategy scope.

    Keras makes them inside the first traced train step when the model was built outside a
    tf.distribute scope (as train_util's one_device strategy leaves it), and a variable made
    while tracing makes TensorFlow trace the whole step a second time: the first fit of a tiny
    TextCNN classifier took 5.5-7.3 s instead of 10.9-12.7 s on 2 CPU cores."""
    model.optimizer.build(model.trainable_variables)
