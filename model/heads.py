"""Heads: masked LM (states at the masked positions + tied output embedding), next sentence,
multi-label, and a bag-of-words linear model the multi-label classifier may add to its head."""
from __future__ import annotations

import keras
from keras import ops

from .backbone import FIRST_WORD_ID
from .layers import PACKAGE, initializer, with_layer_deserialized


def one_hot_gather(sequence_output, positions):
    """States at `positions` [B,P] of `sequence_output` [B,T,d] -> [B,P,d].

    The method the original describes: one_hot(positions, T) [B,P,T] times the sequence output.
    A matmul instead of a gather, which maps well onto accelerators and XLA.
    """
    length = ops.shape(sequence_output)[1]
    selector = ops.one_hot(positions, length, dtype=sequence_output.dtype)
    return ops.einsum("bpt,btd->bpd", selector, sequence_output)


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaskedLMHead(keras.layers.Layer):
    """Scores every vocabulary token at the masked positions.

    Gathers the states (one-hot gather) unless given them, transforms them (dense + GELU +
    LayerNorm) and scores them against the token-embedding matrix it shares with the backbone,
    plus a bias. No dropout on the logits (the original's mistake).
    Call: `(sequence_output [B,T,d], masked_positions [B,P])` -> logits `[B,P,vocab_size]`;
    without `masked_positions`, sequence_output [B,P,d] holds the masked positions' states (a
    backbone built with `output_positions` gives them).

    A tie is a shared object, which a config cannot hold: `from_config` of the config alone gives
    a head that owns a new embedding layer. To re-tie a head, pass the backbone's layer as the
    config's `token_embedding`; `PretrainingModel.from_config` re-ties by rebuilding its head.
    """

    def __init__(self, token_embedding: keras.layers.Embedding, initializer_range: float = 0.02,
                 **kwargs):
        super().__init__(**kwargs)
        self.token_embedding = token_embedding
        self.initializer_range = initializer_range
        self.d_model = token_embedding.output_dim
        self.vocab_size = token_embedding.input_dim
        self.transform = keras.layers.Dense(self.d_model, activation="gelu",
                                            kernel_initializer=initializer(initializer_range),
                                            name="transform")
        self.layer_norm = keras.layers.LayerNormalization(epsilon=1e-12, name="layer_norm")

    def build(self, sequence_output_shape, masked_positions_shape=None):
        if not self.token_embedding.built:  # a head used without its backbone
            self.token_embedding.build()
        self.transform.build((None, None, self.d_model))
        self.layer_norm.build((None, None, self.d_model))
        self.bias = self.add_weight(name="output_bias", shape=(self.vocab_size,),
                                    initializer="zeros")
        self.built = True

    def call(self, sequence_output, masked_positions=None):
        if masked_positions is not None:
            sequence_output = one_hot_gather(sequence_output, masked_positions)
        hidden = self.layer_norm(self.transform(sequence_output))
        logits = ops.matmul(hidden, ops.transpose(self.token_embedding.embeddings))
        # float32 out whatever the compute dtype: the softmax over the vocabulary needs it
        return ops.cast(logits + self.bias, "float32")

    def compute_output_shape(self, sequence_output_shape, masked_positions_shape=None):
        if masked_positions_shape is None:
            return tuple(sequence_output_shape[:2]) + (self.vocab_size,)
        return tuple(masked_positions_shape) + (self.vocab_size,)

    def get_config(self) -> dict:
        return {**super().get_config(), "initializer_range": self.initializer_range,
                "token_embedding": keras.layers.serialize(self.token_embedding)}

    @classmethod
    def from_config(cls, config: dict) -> "MaskedLMHead":
        return cls(**with_layer_deserialized(config, "token_embedding"))


@keras.saving.register_keras_serializable(package=PACKAGE)
class NextSentenceHead(keras.layers.Layer):
    """Is segment B the real continuation of A? Logits [B,2] from the pooled output."""

    def __init__(self, d_model: int, initializer_range: float = 0.02, **kwargs):
        kwargs.setdefault("dtype", "float32")  # logits stay float32 under mixed precision
        super().__init__(**kwargs)
        self.d_model, self.initializer_range = d_model, initializer_range
        self.dense = keras.layers.Dense(2, kernel_initializer=initializer(initializer_range),
                                        dtype=self.dtype_policy, name="logits")

    def build(self, input_shape):
        self.dense.build((None, self.d_model))
        self.built = True

    def call(self, pooled_output):
        return self.dense(pooled_output)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 2)

    def get_config(self) -> dict:
        return {**super().get_config(), "d_model": self.d_model,
                "initializer_range": self.initializer_range}


@keras.saving.register_keras_serializable(package=PACKAGE)
class MultiLabelHead(keras.layers.Layer):
    """dropout -> dense(num_labels): one logit per label; sigmoid gives its probability."""

    def __init__(self, d_model: int, num_labels: int, dropout: float = 0.1,
                 initializer_range: float = 0.02, **kwargs):
        # float32 under mixed precision too: a rare label's prior log-odds (about -9) and its
        # small moves would drown in bfloat16's 8 bits of mantissa
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.d_model, self.num_labels = d_model, num_labels
        self.dropout, self.initializer_range = dropout, initializer_range
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy)
        self.dense = keras.layers.Dense(num_labels,
                                        kernel_initializer=initializer(initializer_range),
                                        dtype=self.dtype_policy, name="logits")

    def build(self, input_shape):
        self.dense.build((None, self.d_model))
        self.built = True

    def call(self, pooled_output, training=None):
        return self.dense(self.dropout_layer(pooled_output, training=training))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_labels)

    def get_config(self) -> dict:
        return {**super().get_config(), "d_model": self.d_model, "num_labels": self.num_labels,
                "dropout": self.dropout, "initializer_range": self.initializer_range}


# Token ids stay below this, so an n-gram's key (its ids as the digits of a number in this base)
# names it exactly, with no hashing collisions; a trigram's key stays below 2**60.
NGRAM_BASE = 1 << 20


def ngram_keys(token_ids, order: int):
    """The `order`-grams of `token_ids` [B,T] -> (int64 keys [B, T-order+1], and whether each
    n-gram is words only: no [PAD], [UNK] or other special id)."""
    length = ops.shape(token_ids)[1]
    parts = [token_ids[:, i:length - (order - 1 - i)] for i in range(order)]
    keys, whole = ops.cast(parts[0], "int64"), parts[0] >= FIRST_WORD_ID
    for part in parts[1:]:
        keys = keys * NGRAM_BASE + ops.cast(part, "int64")
        whole = ops.logical_and(whole, part >= FIRST_WORD_ID)
    return keys, whole


@keras.saving.register_keras_serializable(package=PACKAGE)
class BagOfWordsLogits(keras.layers.Layer):
    """A linear model over the text's TF-IDF vector, one logit per label: what TF-IDF + logistic
    regression computes, inside the classifier and trained with it.

    The features are the words of the vocabulary and, with `ngram_size` > 1, `num_ngrams`
    known n-grams of 2 to `ngram_size` words (the training split's frequent ones: set them with
    set_document_frequencies; others are left out, as TfidfVectorizer leaves out what its
    vocabulary lacks). Each feature's value is (1 + ln tf) * idf, the vector is L2-normalised
    (scikit-learn's `TfidfVectorizer(sublinear_tf=True)`), and the logits are its product with a
    [features, labels] kernel that starts at zero. [PAD], [UNK] and the other special ids are
    left out. `idf` and the n-grams' keys are non-trainable weights set from the training split,
    so they are saved and restored with the model.
    Call: `token_ids [B,T]` -> `[B, num_labels]`.
    """

    def __init__(self, vocab_size: int, num_labels: int, ngram_size: int = 1,
                 num_ngrams: int = 0, **kwargs):
        kwargs.setdefault("dtype", "float32")  # TF-IDF sums and norms: float32 always
        super().__init__(**kwargs)
        if num_ngrams and vocab_size > NGRAM_BASE:
            raise ValueError(f"n-grams need a vocabulary of at most {NGRAM_BASE:,} tokens, "
                             f"not {vocab_size:,}")
        self.vocab_size, self.num_labels = vocab_size, num_labels
        self.ngram_size, self.num_ngrams = ngram_size, num_ngrams

    def build(self, token_ids_shape):
        features = self.vocab_size + self.num_ngrams
        self.kernel = self.add_weight(shape=(features, self.num_labels), initializer="zeros",
                                      name="kernel")
        self.idf = self.add_weight(shape=(features,), initializer="ones", trainable=False,
                                   name="idf")
        if self.num_ngrams:
            # sorted ascending, so that a lookup is a binary search
            self.known_ngrams = self.add_weight(shape=(self.num_ngrams,), dtype="int64",
                                                initializer="zeros", trainable=False,
                                                name="known_ngrams")
        self.built = True

    def feature_ids(self, token_ids):
        """token_ids [B,T] -> (feature ids [B,F], 1.0 where a feature is present [B,F]): the
        words, then each known n-gram as vocab_size + its index in `known_ngrams`."""
        ids, present = [token_ids], [token_ids >= FIRST_WORD_ID]
        for order in range(2, self.ngram_size + 1) if self.num_ngrams else ():
            keys, whole = ngram_keys(token_ids, order)
            flat = ops.reshape(keys, (-1,))
            index = ops.minimum(ops.searchsorted(self.known_ngrams, flat), self.num_ngrams - 1)
            known = ops.reshape(ops.take(self.known_ngrams, index) == flat, ops.shape(keys))
            ids.append(ops.reshape(ops.cast(index, token_ids.dtype), ops.shape(keys))
                       + self.vocab_size)
            present.append(ops.logical_and(whole, known))
        ids, present = ops.concatenate(ids, axis=1), ops.concatenate(present, axis=1)
        return ops.where(present, ids, 0), ops.cast(present, "float32")

    def call(self, token_ids):
        ids, present = self.feature_ids(token_ids)
        # how often each position's feature occurs in its row: [B,F,F] comparisons, cheap
        # beside the backbone at the lengths a classifier reads
        same = ops.cast(ops.expand_dims(ids, 2) == ops.expand_dims(ids, 1), "float32")
        counts = ops.maximum(ops.sum(same * ops.expand_dims(present, 1), axis=-1), 1.0)
        # spread a feature's (1 + ln tf) * idf over its tf occurrences
        value = present * (1.0 + ops.log(counts)) / counts * ops.take(self.idf, ids)
        norm = ops.sqrt(ops.sum(value * value * counts, axis=1, keepdims=True))
        weights = value / ops.maximum(norm, 1e-6)
        return ops.einsum("bt,btl->bl", weights, ops.take(self.kernel, ids, axis=0))

    def compute_output_shape(self, token_ids_shape):
        return (token_ids_shape[0], self.num_labels)

    def get_config(self) -> dict:
        return {**super().get_config(), "vocab_size": self.vocab_size,
                "num_labels": self.num_labels, "ngram_size": self.ngram_size,
                "num_ngrams": self.num_ngrams}
