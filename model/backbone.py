"""Backbones: a functional keras.Model from the three id inputs (plus, for a masked-LM head, the
positions it reads) to sequence and pooled outputs."""
from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from .config import ModelConfig
from .layers import Embeddings, Pooler, TextCNNEncoder, TransformerBlock

INPUT_NAMES = ("token_ids", "segment_ids", "padding_mask")
PAD_ID = 0  # the data layer's padding id; every other id is a real position
FIRST_WORD_ID = 5  # the data layer's ids below this are [PAD] [UNK] [CLS] [SEP] [MASK]


def backbone_features(token_ids, segment_ids=None) -> dict:
    """The backbone's input dict for id rows [B,T] (tensors or arrays): the segment ids of a
    sentence pair, or all 0 for one segment; the padding mask from the [PAD] ids."""
    token_ids = tf.convert_to_tensor(token_ids, tf.int32)
    segment_ids = (tf.zeros_like(token_ids) if segment_ids is None
                   else tf.convert_to_tensor(segment_ids, tf.int32))
    return {"token_ids": token_ids, "segment_ids": segment_ids,
            "padding_mask": tf.cast(token_ids != PAD_ID, tf.int32)}


# Batch widths are rounded up to a multiple of this, so a compiled (XLA) step sees few shapes.
WIDTH_MULTIPLE = 8


def _round_up(width: tf.Tensor) -> tf.Tensor:
    return -(-width // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def trim_padding(token_ids: tf.Tensor) -> tf.Tensor:
    """Cut the padding columns after a batch's longest row (width rounded up to WIDTH_MULTIPLE).
    Both backbones mask padding, so the real positions' outputs stay the same and the padding is
    simply not computed."""
    longest = tf.reduce_max(tf.reduce_sum(tf.cast(token_ids != PAD_ID, tf.int32), axis=1))
    return token_ids[:, :tf.minimum(_round_up(longest), tf.shape(token_ids)[1])]


def pad_to_multiple(token_ids: tf.Tensor) -> tf.Tensor:
    """Pad a batch cut to its longest row with [PAD] columns up to a multiple of WIDTH_MULTIPLE."""
    width = tf.shape(token_ids)[1]
    return tf.pad(token_ids, [[0, 0], [0, _round_up(width) - width]])


def backbone_inputs(*extra_names: str) -> dict[str, keras.KerasTensor]:
    """int32 [B,T] inputs of any length T: ids, segment ids, and 1 for real tokens / 0 for
    padding; plus an int32 [B,N] input for each of `extra_names` (a task's own inputs)."""
    return {name: keras.Input(shape=(None,), dtype="int32", name=name)
            for name in (*INPUT_NAMES, *extra_names)}


def build_backbone(config: ModelConfig, first_position_only: bool = False,
                   output_positions: bool = False) -> keras.Model:
    """`{token_ids, segment_ids, padding_mask}` -> `{sequence_output [B,T,d], pooled_output [B,d]}`.

    Transformer: `num_layer` encoder blocks, pooled = the [CLS] state. TextCNN: per-position
    convolution features projected to d_model, pooled = max + mean over the real positions.
    `first_position_only` (Transformer; for a classifier, which reads the [CLS] state alone):
    the last block computes the [CLS] position alone, so sequence_output is [B,1,d] and
    pooled_output the same numbers (to float rounding) for about (num_layer - 0.8) / num_layer
    of the work; in training too, with the dropout masks the whole block would draw.
    `output_positions` (for a masked-LM head): a fourth input, `output_positions` [B,P], and
    sequence_output [B,P,d] holds those positions' states alone; the Transformer's last block
    computes them and [CLS] (for pooled_output) alone, exactly as above. Same weights in every
    case, so each loads the others' files.
    """
    config.validate()
    if first_position_only and output_positions:
        raise ValueError("first_position_only and output_positions each choose the last "
                         "block's rows: give one of them")
    inputs = backbone_inputs(*(("output_positions",) if output_positions else ()))
    # the last block's rows: [CLS], then the positions asked for
    rows = (ops.concatenate([ops.zeros_like(inputs["output_positions"][:, :1]),
                             inputs["output_positions"]], axis=1) if output_positions else None)
    embeddings = Embeddings(config.vocab_size, config.d_model, config.max_position,
                            config.type_vocab_size, config.dropout, config.initializer_range,
                            name="embeddings")
    x = embeddings(inputs["token_ids"], inputs["segment_ids"])
    if config.backbone == "transformer":
        for i in range(config.num_layer):
            last = i == config.num_layer - 1
            x = TransformerBlock(config.d_model, config.num_header, config.d_k, config.d_v,
                                 config.d_ff, config.dropout, config.initializer_range,
                                 first_only=first_position_only and last,
                                 name=f"transformer_layer_{i}")(
                x, inputs["padding_mask"], rows if last else None)
        pooled = Pooler(config.d_model, "cls", config.pooled_tanh, config.initializer_range,
                        name="pooler")(x, inputs["padding_mask"])
        sequence = x[:, 1:] if output_positions else x
    else:
        x = TextCNNEncoder(config.d_model, config.filter_sizes, config.num_filters,
                           config.dropout, config.initializer_range, name="textcnn")(
            x, inputs["padding_mask"])
        pooled = Pooler(config.d_model, "max_mean", False, config.initializer_range,
                        name="pooler")(x, inputs["padding_mask"])
        sequence = (ops.take_along_axis(x, inputs["output_positions"][:, :, None], axis=1)
                    if output_positions else x)
    return keras.Model(inputs, {"sequence_output": sequence, "pooled_output": pooled},
                       name="backbone")


def get_token_embedding(backbone: keras.Model) -> keras.layers.Embedding:
    """The token embedding layer, which the masked-LM head shares (tied weights)."""
    return backbone.get_layer("embeddings").token_embedding
