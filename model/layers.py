"""The building blocks of both backbones. Each layer round-trips through get_config."""
from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

PACKAGE = "bert_lm"


def with_layer_deserialized(config: dict, key: str) -> dict:
    """A copy of `config` whose nested layer `key` is re-created when it is a serialized dict,
    or kept when a layer object was given (so that it is shared, as a tied embedding must be)."""
    config = dict(config)
    if isinstance(config[key], dict):
        config[key] = keras.layers.deserialize(config[key])
    return config


def initializer(stddev: float) -> keras.initializers.Initializer:
    return keras.initializers.TruncatedNormal(stddev=stddev)


@keras.saving.register_keras_serializable(package=PACKAGE)
class Embeddings(keras.layers.Layer):
    """token + learned position + segment embeddings, then LayerNorm and dropout.

    Shared by both backbones and both stages. The position table has `max_position` rows, so
    pretraining and fine-tuning may use different lengths (the original built a new table per
    length, and set it to a constant).
    Call: `(token_ids [B,T], segment_ids [B,T])` -> `[B,T,d_model]`.
    """

    def __init__(self, vocab_size: int, d_model: int, max_position: int, type_vocab_size: int,
                 dropout: float = 0.1, initializer_range: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.d_model = vocab_size, d_model
        self.max_position, self.type_vocab_size = max_position, type_vocab_size
        self.dropout, self.initializer_range = dropout, initializer_range
        init = initializer(initializer_range)
        self.token_embedding = keras.layers.Embedding(vocab_size, d_model,
                                                      embeddings_initializer=init,
                                                      name="token_embedding")
        self.segment_embedding = keras.layers.Embedding(type_vocab_size, d_model,
                                                        embeddings_initializer=init,
                                                        name="segment_embedding")
        self.layer_norm = keras.layers.LayerNormalization(epsilon=1e-12, name="layer_norm")
        self.dropout_layer = keras.layers.Dropout(dropout)

    def build(self, token_ids_shape, segment_ids_shape=None):
        self.token_embedding.build((None, None))
        self.segment_embedding.build((None, None))
        self.position_embedding = self.add_weight(
            name="position_embedding", shape=(self.max_position, self.d_model),
            initializer=initializer(self.initializer_range))
        self.layer_norm.build((None, None, self.d_model))
        self.built = True

    def call(self, token_ids, segment_ids, training=None):
        length = ops.shape(token_ids)[1]
        positions = self.position_embedding[:length][None, :, :]
        x = self.token_embedding(token_ids) + self.segment_embedding(segment_ids) + positions
        return self.dropout_layer(self.layer_norm(x), training=training)

    def compute_output_shape(self, token_ids_shape, segment_ids_shape=None):
        return tuple(token_ids_shape) + (self.d_model,)

    def get_config(self) -> dict:
        return {**super().get_config(), "vocab_size": self.vocab_size, "d_model": self.d_model,
                "max_position": self.max_position, "type_vocab_size": self.type_vocab_size,
                "dropout": self.dropout, "initializer_range": self.initializer_range}


def gather_rows(x, rows, axis: int = 1):
    """The rows [B,R] (positions along `axis`) of each example of x [B,...] (an exact copy)."""
    return tf.gather(x, rows, axis=axis, batch_dims=1)


@keras.saving.register_keras_serializable(package=PACKAGE)
class AttentionDropout(keras.layers.Layer):
    """Dropout for the [B,H,T,T] attention probabilities, drawing half the random bits.

    keras.layers.Dropout draws a 32-bit random number per element, and for the score tensor
    (20M elements a layer at batch 64, length 200) generating them was about a tenth of a
    Transformer training step on a CPU. Here every 32-bit word gives two 16-bit draws, so the
    rate is rounded to a multiple of 1/65,536 (0.1 -> 0.100006); the masked-LM step runs 1.15x
    faster (benchmarks/results/speed.md). Call: `(x, training, rows=None)` -> x with each
    element zeroed with probability `rate` and the others scaled by 1 / (1 - rate) while
    training (`rows`: see `call`).
    """

    LEVELS = 1 << 16

    def __init__(self, rate: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.seed = rate, seed
        self.threshold = round(rate * self.LEVELS)
        if self.threshold:  # as keras.layers.Dropout: a rate of 0 draws no seed from the global one
            self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=None, rows=None):
        """`rows` [B,R]: x [B,H,R,T] holds these query rows alone of a [B,H,T,T] tensor, and is
        dropped as they would be there (the same random draws)."""
        if not training or self.threshold == 0:
            return x
        shape = tf.shape(x)
        if rows is not None:
            shape = tf.concat([shape[:2], shape[3:], shape[3:]], axis=0)
        size = tf.reduce_prod(shape)
        seed = tf.cast(self.seed_generator.next(), tf.int64)
        words = tf.random.stateless_uniform([(size + 1) // 2], seed, minval=None, maxval=None,
                                            dtype=tf.uint32)
        draws = tf.reshape(tf.bitcast(words, tf.uint16), [-1])[:size]
        keep = tf.reshape(draws, shape) >= tf.constant(self.threshold, tf.uint16)
        if rows is not None:
            keep = gather_rows(keep, rows, axis=2)
        scale = self.LEVELS / (self.LEVELS - self.threshold)
        # times a mask of 0s and 1/(1 - rate)s, not a select: the same numbers, and the
        # masked-LM step runs about 4% faster
        return x * (ops.cast(keep, x.dtype) * ops.cast(scale, x.dtype))

    def compute_output_shape(self, x_shape):
        return x_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@keras.saving.register_keras_serializable(package=PACKAGE)
class SelfAttention(keras.layers.Layer):
    """Multi-head self-attention with one fused query/key/value projection.

    The same maths as keras.layers.MultiHeadAttention, in fewer and larger operations: one
    [d, H*(2*d_k + d_v)] matmul instead of three, the padding mask added as a bias before a
    single softmax, and batched matmuls whose transposes the graph optimiser folds away. On a
    CPU the [B, H, T, T] score tensor is what costs; it is touched as few times as possible.
    Call: `(x [B,T,d], padding_mask [B,T])` -> `[B,T,d]`; with `rows` [B,R], only those
    positions ask (they still attend to every position) -> `[B,R,d]`.
    """

    def __init__(self, d_model: int, num_header: int, d_k: int, d_v: int, dropout: float = 0.1,
                 initializer_range: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        self.d_model, self.num_header, self.d_k, self.d_v = d_model, num_header, d_k, d_v
        self.dropout, self.initializer_range = dropout, initializer_range
        init = initializer(initializer_range)
        self.query_key_value = keras.layers.Dense(num_header * (2 * d_k + d_v),
                                                  kernel_initializer=init, name="query_key_value")
        self.output_dense = keras.layers.Dense(d_model, kernel_initializer=init, name="output")
        self.dropout_layer = AttentionDropout(dropout)

    def build(self, x_shape, padding_mask_shape=None):
        self.query_key_value.build((None, None, self.d_model))
        self.output_dense.build((None, None, self.num_header * self.d_v))
        self.built = True

    def _heads(self, x, width: int):
        """[B,T,H*width] -> [B,H,T,width]"""
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        return ops.transpose(ops.reshape(x, (batch, length, self.num_header, width)), (0, 2, 1, 3))

    def call(self, x, padding_mask, training=None, rows=None):
        key_size = self.num_header * self.d_k
        # a split, not three slices: the slices' gradients were three full-size zero tensors
        # written and summed (about 6% of a masked-LM step's op time); the same numbers
        query, key, value = ops.split(self.query_key_value(x), [key_size, 2 * key_size], axis=-1)
        if rows is not None:
            query = gather_rows(query, rows)
        # scaling the [B,T,H*d_k] queries is cheaper than scaling the [B,H,T,T] scores
        query = self._heads(query * (self.d_k ** -0.5), self.d_k)
        key = self._heads(key, self.d_k)
        value = self._heads(value, self.d_v)
        # [B,1,1,T]: a large negative score for padding keys, so softmax gives them nothing
        blocked = (1.0 - ops.cast(padding_mask, x.dtype)[:, None, None, :]) * -1e9
        scores = ops.matmul(query, ops.swapaxes(key, -1, -2)) + ops.cast(blocked, x.dtype)
        weights = self.dropout_layer(ops.softmax(scores, axis=-1), training=training, rows=rows)
        context = ops.transpose(ops.matmul(weights, value), (0, 2, 1, 3))
        batch, length = ops.shape(x)[0], ops.shape(query)[2]
        return self.output_dense(ops.reshape(context, (batch, length, self.num_header * self.d_v)))

    def compute_output_shape(self, x_shape, padding_mask_shape=None):
        return x_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "d_model": self.d_model, "num_header": self.num_header,
                "d_k": self.d_k, "d_v": self.d_v, "dropout": self.dropout,
                "initializer_range": self.initializer_range}


@keras.saving.register_keras_serializable(package=PACKAGE)
class TransformerBlock(keras.layers.Layer):
    """Post-LN encoder block (as BERT): self-attention with the padding mask, then a GELU
    feed-forward; residual + LayerNorm after each. Per-head key size d_k and value size d_v, as
    the original's flags. Call: `(x [B,T,d], padding_mask [B,T])` -> `[B,T,d]`. Given `rows`
    [B,R], it computes the new states of those positions alone, `[B,R,d]` (a masked-LM head
    reads no other from the last block); a block made with `first_only` gives the first
    position's alone, `[B,1,d]` (what a [CLS] pooler reads). Same weights, a fraction of the
    work; in training each dropout mask is the part of the mask the whole block would draw, so
    that the block trains exactly the model a whole one does (the other rows feed nothing)."""

    def __init__(self, d_model: int, num_header: int, d_k: int, d_v: int, d_ff: int,
                 dropout: float = 0.1, initializer_range: float = 0.02, first_only: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.d_model, self.num_header, self.d_k, self.d_v = d_model, num_header, d_k, d_v
        self.d_ff, self.dropout, self.initializer_range = d_ff, dropout, initializer_range
        self.first_only = first_only
        init = initializer(initializer_range)
        self.attention = SelfAttention(d_model, num_header, d_k, d_v, dropout, initializer_range,
                                       name="self_attention")
        self.attention_norm = keras.layers.LayerNormalization(epsilon=1e-12,
                                                              name="attention_layer_norm")
        self.intermediate = keras.layers.Dense(d_ff, activation="gelu", kernel_initializer=init,
                                               name="intermediate")
        self.output_dense = keras.layers.Dense(d_model, kernel_initializer=init, name="output")
        self.output_norm = keras.layers.LayerNormalization(epsilon=1e-12, name="output_layer_norm")
        self.dropout_layer = keras.layers.Dropout(dropout)

    def build(self, x_shape, padding_mask_shape=None):
        shape = (None, None, self.d_model)
        self.attention.build(shape)
        self.attention_norm.build(shape)
        self.intermediate.build(shape)
        self.output_dense.build((None, None, self.d_ff))
        self.output_norm.build(shape)
        self.built = True

    def call(self, x, padding_mask, rows=None, training=None):
        if self.first_only:
            rows = ops.zeros((ops.shape(x)[0], 1), "int32")
        length = ops.shape(x)[1]
        attended = self.attention(x, padding_mask, training=training, rows=rows)
        if rows is not None:
            x = gather_rows(x, rows)
        x = self.attention_norm(x + self._dropped(attended, length, rows, training))
        hidden = self.output_dense(self.intermediate(x))
        return self.output_norm(x + self._dropped(hidden, length, rows, training))

    def _dropped(self, x, length, rows, training):
        """Dropout on x [B,R,d], the `rows` of a [B,length,d] tensor (None: all of them)."""
        if not training or rows is None:
            return self.dropout_layer(x, training=training)
        whole = ops.ones((ops.shape(x)[0], length, ops.shape(x)[2]), x.dtype)
        return x * gather_rows(self.dropout_layer(whole, training=True), rows)

    def compute_output_shape(self, x_shape, padding_mask_shape=None, rows_shape=None):
        if self.first_only:
            return (x_shape[0], 1, x_shape[2])
        return x_shape if rows_shape is None else (x_shape[0], rows_shape[1], x_shape[2])

    def get_config(self) -> dict:
        return {**super().get_config(), "d_model": self.d_model, "num_header": self.num_header,
                "d_k": self.d_k, "d_v": self.d_v, "d_ff": self.d_ff, "dropout": self.dropout,
                "initializer_range": self.initializer_range, "first_only": self.first_only}


@keras.saving.register_keras_serializable(package=PACKAGE)
class TextCNNEncoder(keras.layers.Layer):
    """The original's TextCNN (widths 2,3,4,5 x num_filters, two convolutions each with
    normalisation + ReLU) with 'same' padding, so every position keeps its own state: the
    masked-LM head can predict a word from its own position, not from a pooled sentence vector.
    The branches are concatenated and projected to d_model.

    Padding positions are zeroed before every convolution, so appended padding looks exactly
    like the convolution's own zero padding and cannot change the real positions' outputs.
    Call: `(x [B,T,d], padding_mask [B,T])` -> `[B,T,d_model]`.
    """

    def __init__(self, d_model: int, filter_sizes=(2, 3, 4, 5), num_filters: int = 128,
                 dropout: float = 0.1, initializer_range: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        self.d_model, self.filter_sizes = d_model, tuple(filter_sizes)
        self.num_filters, self.dropout, self.initializer_range = (num_filters, dropout,
                                                                  initializer_range)
        init = initializer(initializer_range)
        self.branches = []
        for width in self.filter_sizes:
            self.branches.append([
                (keras.layers.Conv1D(num_filters, width, padding="same", kernel_initializer=init,
                                     name=f"conv{width}_{i}"),
                 keras.layers.LayerNormalization(epsilon=1e-6, name=f"conv{width}_{i}_norm"))
                for i in (1, 2)])
        self.projection = keras.layers.Dense(d_model, kernel_initializer=init, name="projection")
        self.projection_norm = keras.layers.LayerNormalization(epsilon=1e-12,
                                                               name="projection_layer_norm")
        self.dropout_layer = keras.layers.Dropout(dropout)

    def build(self, x_shape, padding_mask_shape=None):
        for branch in self.branches:
            channels = x_shape[-1]
            for conv, norm in branch:
                conv.build((None, None, channels))
                norm.build((None, None, self.num_filters))
                channels = self.num_filters
        self.projection.build((None, None, self.num_filters * len(self.branches)))
        self.projection_norm.build((None, None, self.d_model))
        self.built = True

    def call(self, x, padding_mask, training=None):
        keep = ops.cast(padding_mask, x.dtype)[:, :, None]
        features = []
        for branch in self.branches:
            h = x
            for conv, norm in branch:
                h = ops.relu(norm(conv(h * keep)))
            features.append(h)
        projected = self.projection(self.dropout_layer(ops.concatenate(features, axis=-1),
                                                       training=training))
        # a residual to the embeddings keeps each token's identity easy to read out
        return self.projection_norm(projected + x)

    def compute_output_shape(self, x_shape, padding_mask_shape=None):
        return tuple(x_shape[:-1]) + (self.d_model,)

    def get_config(self) -> dict:
        return {**super().get_config(), "d_model": self.d_model,
                "filter_sizes": list(self.filter_sizes), "num_filters": self.num_filters,
                "dropout": self.dropout, "initializer_range": self.initializer_range}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Pooler(keras.layers.Layer):
    """Sentence vector: the [CLS] state (optionally through dense + tanh, as BERT) for the
    Transformer; for the TextCNN, max over the real positions (the original's pooling) plus their
    mean ("max_mean"), since a max alone cannot count (the toy task needs 10x the steps).
    Call: `(sequence [B,T,d], padding_mask [B,T])` -> `[B,d]`."""

    def __init__(self, d_model: int, method: str = "cls", use_tanh: bool = True,
                 initializer_range: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        if method not in ("cls", "max", "max_mean"):
            raise ValueError(f"pooling method {method!r} is not 'cls', 'max' or 'max_mean'")
        self.d_model, self.method, self.use_tanh = d_model, method, use_tanh
        self.initializer_range = initializer_range
        self.dense = (keras.layers.Dense(d_model, activation="tanh",
                                         kernel_initializer=initializer(initializer_range),
                                         name="dense") if use_tanh else None)

    def build(self, sequence_shape, padding_mask_shape=None):
        if self.dense is not None:
            self.dense.build((None, self.d_model))
        self.built = True

    def call(self, sequence, padding_mask):
        if self.method == "cls":
            pooled = sequence[:, 0, :]
        else:
            real = ops.cast(padding_mask, "bool")[:, :, None]
            pooled = ops.max(ops.where(real, sequence, ops.full_like(sequence, -1e9)), axis=1)
            if self.method == "max_mean":
                weights = ops.cast(real, sequence.dtype)
                pooled = pooled + ops.sum(sequence * weights, axis=1) / ops.maximum(
                    ops.sum(weights, axis=1), 1.0)
        return self.dense(pooled) if self.dense is not None else pooled

    def compute_output_shape(self, sequence_shape, padding_mask_shape=None):
        return (sequence_shape[0], self.d_model)

    def get_config(self) -> dict:
        return {**super().get_config(), "d_model": self.d_model, "method": self.method,
                "use_tanh": self.use_tanh, "initializer_range": self.initializer_range}
