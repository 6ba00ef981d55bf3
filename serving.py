"""A classifier run as a SavedModel that takes text, for TF Serving and any client of it.

Tokenization, vocabulary lookup, [CLS] + truncation + padding, the classifier and the run's
decision rule all run in the graph (tf.strings and tf.lookup only, no Python), so a client sends
text and never re-implements data_util_hdf5's tokenizer or vocabulary. Signatures:

  serving_default   text       string [batch]
  serve_token_ids   token_ids  int32 [batch, length]  ([CLS] id first, [PAD] = 0 after the text)
both returning
  probabilities  float32 [batch, labels]  in labels.txt order
  label_ids      int32 [batch, labels]    multi-hot: the run's decision rule (model.predict_labels)
  labels         string [batch, k]        the chosen names, most probable first, padded with ""
                                          to the batch's longest list (k >= 1 for every row)

What `text` must look like depends on the run's tokenize_style (see TEXT_EXPECTED): the graph
splits on whitespace exactly as Python's str.split() does, drops `__label__...` tokens as
data_util.parse_label_line does, and for 'char' takes every remaining character as a token.
jieba cannot run in a graph, so a 'word' run wants text already segmented by jieba.
"""
from __future__ import annotations

from typing import Callable

import keras
import numpy as np
import tensorflow as tf

import data_util_hdf5 as data_util
import model

TEXT_SIGNATURE = "serving_default"
TOKEN_IDS_SIGNATURE = "serve_token_ids"
TEXT_EXPECTED = {
    "space": "text already segmented, tokens separated by whitespace (as the run was trained)",
    "word": "text segmented by jieba, tokens separated by spaces (' '.join(jieba.lcut(text))); "
            "jieba cannot run inside the SavedModel",
    "char": "raw text: every character is a token, whitespace is dropped",
}
# The characters Python's str.split() splits on (str.isspace; tests/test_serving.py holds this
# to the interpreter). tf.strings.split alone knows ASCII whitespace only, so these become " ".
PYTHON_WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003"
                     "\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_WHITESPACE_RUN = "[" + PYTHON_WHITESPACE + "]+"


def tokenize(text: tf.Tensor, tokenize_style: str) -> tf.RaggedTensor:
    """Tokens string [batch, (tokens)] of text string [batch], as
    ``data_util.tokenize(data_util.parse_label_line(line)[0], style)`` gives them, except that
    'word' splits on whitespace only (the text must come segmented)."""
    words = tf.strings.split(tf.strings.regex_replace(text, _WHITESPACE_RUN, " "))
    prefix = data_util.LABEL_PREFIX
    is_label = tf.strings.substr(words.flat_values, 0, len(prefix)) == prefix
    words = tf.ragged.boolean_mask(words, words.with_flat_values(~is_label))
    if tokenize_style != "char":
        return words
    # parse_label_line joins the words with spaces and tokenize('char') drops them again
    return tf.strings.unicode_split(tf.strings.reduce_join(words, axis=1), "UTF-8")


def vocabulary_table(vocab: data_util.Vocabulary) -> tf.lookup.StaticHashTable:
    """token -> id (int32), unknown tokens -> [UNK], as Vocabulary.encode."""
    initializer = tf.lookup.KeyValueTensorInitializer(
        tf.constant(vocab.tokens, tf.string), tf.range(len(vocab), dtype=tf.int32))
    return tf.lookup.StaticHashTable(initializer, default_value=data_util.UNK_ID)


def encode(tokens: tf.RaggedTensor, table: tf.lookup.StaticHashTable,
           sequence_length: int) -> tf.Tensor:
    """int32 [batch, sequence_length]: [CLS] + ids, truncated and padded as
    data_util.encode_example does."""
    ids = table.lookup(tokens)[:, :sequence_length - 1]
    cls = tf.fill([ids.nrows(), 1], tf.constant(data_util.CLS_ID, tf.int32))
    ids = tf.concat([tf.RaggedTensor.from_tensor(cls), ids], axis=1)
    return ids.to_tensor(default_value=data_util.PAD_ID, shape=[None, sequence_length])


# An XLA export pads a batch to the next of these sizes (larger ones run as they come), so a
# server compiles one program per (size, width) pair, not one per batch size it is sent.
XLA_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def probabilities_function(classifier: keras.Model, jit_compile: bool = False
                           ) -> Callable[[tf.Tensor], tf.Tensor]:
    """token ids [batch, length] -> float32 probabilities [batch, labels]. With `jit_compile`
    the network runs as one XLA program, compiled on the first call of each (batch size rounded
    up to XLA_BATCH_SIZES, width rounded up to model.WIDTH_MULTIPLE)."""
    def network(token_ids):
        logits = classifier(model.backbone_features(token_ids), training=False)
        # model.sigmoid's own formula (clipped), so the numbers are predict.py's to float32
        # rounding
        return 1.0 / (1.0 + tf.exp(-tf.clip_by_value(logits, -60.0, 60.0)))

    if not jit_compile:
        return lambda token_ids: network(model.trim_padding(token_ids))
    compiled = tf.function(network, jit_compile=True)
    sizes = tf.constant(XLA_BATCH_SIZES, tf.int32)

    def score(token_ids):
        # cut and padded outside the XLA program: shapes read from the data are not
        # compile-time shapes. Rows of [PAD] alone are scored apart from the others (every
        # operation is per row) and dropped.
        token_ids = model.trim_padding(token_ids)
        rows = tf.shape(token_ids)[0]
        bucket = tf.maximum(rows, sizes[tf.minimum(tf.searchsorted(sizes, [rows])[0],
                                                   len(XLA_BATCH_SIZES) - 1)])
        return compiled(tf.pad(token_ids, [[0, bucket - rows], [0, 0]]))[:rows]

    score.compiled = compiled  # its tracing count is the number of programs
    return score


def choose(probabilities: tf.Tensor, thresholds: np.ndarray) -> tf.Tensor:
    """bool [batch, labels]: model.predict_labels in the graph. Compared in float64 because
    numpy compares the float32 probabilities with float64 thresholds."""
    p = tf.cast(probabilities, tf.float64)
    cut = tf.constant(thresholds, tf.float64)
    passed = p >= cut
    nearest = tf.one_hot(tf.argmax(p - cut, axis=1), len(thresholds), dtype=tf.int32) > 0
    return passed | (~tf.reduce_any(passed, axis=1, keepdims=True) & nearest)


def chosen_names(probabilities: tf.Tensor, chosen: tf.Tensor, labels: list[str]) -> tf.Tensor:
    """string [batch, k]: the chosen labels, most probable first (predict.py's order), padded
    with "" to the longest list of the batch."""
    order = tf.argsort(probabilities, axis=1, direction="DESCENDING", stable=True)
    names = tf.gather(tf.constant(labels, tf.string), order)
    keep = tf.gather(chosen, order, batch_dims=1)
    return tf.ragged.boolean_mask(names, keep).to_tensor(default_value="")


def export_classifier(classifier: keras.Model, export_dir: str, vocab: data_util.Vocabulary,
                      labels: list[str], tokenize_style: str, sequence_length: int,
                      thresholds: np.ndarray | None = None, jit_compile: bool = False) -> None:
    """Write the SavedModel described at the top of this module to `export_dir` (replacing a
    previous export whole). `thresholds` None: p >= 0.5, the original's rule. `jit_compile`:
    the network compiled with XLA (see probabilities_function)."""
    if tokenize_style not in data_util.TOKENIZE_STYLES:
        raise data_util.DataError(f"tokenize_style {tokenize_style!r} is not one of "
                                  f"{', '.join(data_util.TOKENIZE_STYLES)}")
    cut = model.decision_thresholds(thresholds, len(labels))
    table = vocabulary_table(vocab)
    score = probabilities_function(classifier, jit_compile)

    def serve_token_ids(token_ids):
        probabilities = score(token_ids)
        chosen = choose(probabilities, cut)
        return {"probabilities": probabilities, "label_ids": tf.cast(chosen, tf.int32),
                "labels": chosen_names(probabilities, chosen, labels)}

    archive = keras.export.ExportArchive()
    # The classifier's variables are saved through the endpoints that use them; tracking the
    # model as well would walk every layer in search of lookup tables (a third of the export).
    archive.track(table)  # not a variable: the archive saves it only when told
    scored = archive.add_endpoint(TOKEN_IDS_SIGNATURE, serve_token_ids, input_signature=[
        tf.TensorSpec([None, None], tf.int32, name="token_ids")])

    def serve_text(text):
        """Labels for text, tokenized in the graph; see TEXT_EXPECTED for what text to send."""
        # through the traced function: the classifier is traced once for both signatures
        return scored(encode(tokenize(text, tokenize_style), table, sequence_length))

    # Named so, it is the default signature under this one name (Keras would otherwise alias
    # its first endpoint, and the token ids' signature must not be the default).
    archive.add_endpoint(TEXT_SIGNATURE, serve_text,
                         input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    data_util.write_directory_atomically(export_dir,
                                         lambda path: archive.write_out(path, verbose=False))
