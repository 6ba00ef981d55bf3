"""Raw text -> masked-LM (and next-sentence) pretraining examples.

The pipeline, in the order it runs:
1. `load_or_build_corpus_cache` tokenizes the corpus once (several processes) into its
   vocabulary and the data layer's fingerprinted HDF5 token cache (one row of ids a document);
   `read_corpus` cuts the documents into sentences after sentence-ending punctuation.
2. `pack_sequences` / `make_nsp_pairs` turn that into fixed-length examples: `[CLS] A [SEP]`
   packed from whole sentences (short ones are packed together, not dropped as the original did),
   or `[CLS] A [SEP] B [SEP]` with segment ids for next-sentence prediction.
3. `mask_tokens` runs inside tf.data on every batch, so each epoch sees new masks: 15% of real
   tokens, of which 80% become [MASK], 10% a random token, 10% stay as they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

import data_util_hdf5 as data_util
import model

# Tokens that end a sentence. Splitting happens on tokens, so it works for every tokenize style.
SENTENCE_END_TOKENS = frozenset("。！？；!?;…") | {"……", "！！", "？？"}


@dataclass
class Corpus:
    """Token ids of a whole corpus with sentence and document boundaries (offsets into `tokens`)."""

    tokens: np.ndarray            # int32 [total_tokens]
    sentence_offsets: np.ndarray  # int64 [num_sentences + 1]
    document_offsets: np.ndarray  # int64 [num_documents + 1], in sentences

    @property
    def num_documents(self) -> int:
        return len(self.document_offsets) - 1

    def document_sentences(self, doc: int) -> list[np.ndarray]:
        first, last = self.document_offsets[doc], self.document_offsets[doc + 1]
        return [self.tokens[self.sentence_offsets[s]:self.sentence_offsets[s + 1]]
                for s in range(first, last)]


def load_or_build_corpus_cache(corpus_file: str, tokenize_style: str, vocab_size: int,
                               cache_dir: str, encoding: str = "utf-8",
                               process_num: int | None = None) -> tuple[data_util.Vocabulary, str]:
    """The corpus's vocabulary and HDF5 token cache (one document a line), tokenizing it once."""
    return data_util.load_or_build_corpus(corpus_file, tokenize_style, vocab_size, cache_dir, encoding,
                                   process_num)


def read_corpus(cache_file: str, vocab: data_util.Vocabulary) -> Corpus:
    """Documents from a token cache, cut into sentences after every sentence-ending token."""
    tokens, document_starts = data_util.read_token_cache(cache_file)
    if len(document_starts) < 2:
        raise data_util.DataError(f"{cache_file}: the pretraining corpus holds no text; give "
                           "--mask_lm_source_file a file with one document a line")
    end_ids = np.array(sorted({vocab.id_of(t) for t in SENTENCE_END_TOKENS} - {data_util.UNK_ID}))
    after_end = np.flatnonzero(np.isin(tokens, end_ids)) + 1
    sentence_offsets = np.union1d(after_end, document_starts).astype(np.int64)
    document_offsets = np.searchsorted(sentence_offsets, document_starts).astype(np.int64)
    return Corpus(tokens.astype(np.int32), sentence_offsets, document_offsets)


def _chunks_of(sentences: list[np.ndarray], budget: int) -> list[np.ndarray]:
    """Greedily pack whole sentences into pieces of at most `budget` ids; long sentences are cut."""
    pieces, current = [], []
    for sentence in sentences:
        for start in range(0, len(sentence), budget):
            part = sentence[start:start + budget]
            if current and sum(map(len, current)) + len(part) > budget:
                pieces.append(np.concatenate(current))
                current = []
            current.append(part)
    if current:
        pieces.append(np.concatenate(current))
    return pieces


def _document_chunks(corpus: Corpus, budget: int) -> list[list[np.ndarray]]:
    return [_chunks_of(corpus.document_sentences(d), budget) for d in range(corpus.num_documents)]


def pack_sequences(corpus: Corpus, sequence_length: int) -> np.ndarray:
    """`[CLS] piece [SEP] piece [SEP] ...` rows, int32 [N, sequence_length], padded with PAD_ID.

    A piece is whole sentences of one document; pieces of consecutive documents share a row
    while they fit, so short documents (a review, a caption) do not leave rows mostly padding.
    """
    # Filled in place (a buffer that doubles when full): Python lists of ids would cost ~30x
    # the memory of the int32 rows on a large corpus.
    packed = np.full((max(16, corpus.num_documents // 2), sequence_length), data_util.PAD_ID, np.int32)
    row, used = 0, 1
    packed[0, 0] = data_util.CLS_ID
    for d in range(corpus.num_documents):
        for chunk in _chunks_of(corpus.document_sentences(d), sequence_length - 2):
            if used + len(chunk) + 1 > sequence_length:
                row, used = row + 1, 1
                if row == len(packed):
                    packed = np.concatenate([packed, np.full_like(packed, data_util.PAD_ID)])
                packed[row, 0] = data_util.CLS_ID
            packed[row, used:used + len(chunk)] = chunk
            packed[row, used + len(chunk)] = data_util.SEP_ID
            used += len(chunk) + 1
    return packed[:row + (used > 1)].copy()


def make_nsp_pairs(corpus: Corpus, sequence_length: int, seed: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`[CLS] A [SEP] B [SEP]` rows with segment ids and labels (1 = B follows A, 0 = random B).

    A document that fits in one piece is cut in half so that it still yields a true pair. The B
    of a random pair is a piece of another document, drawn uniformly from all their pieces;
    when no other document holds text (a one-line corpus, or a validation split of a single
    document) there is nothing to draw from, and every pair is a true pair.
    """
    budget = (sequence_length - 3) // 2
    docs = [d if len(d) > 1 else _halves(d) for d in _document_chunks(corpus, budget)]
    chunks = [c for d in docs for c in d]
    starts = np.cumsum([0] + [len(d) for d in docs])
    rng = np.random.default_rng(seed)
    rows, segments, labels = [], [], []
    for di, doc in enumerate(docs):
        alone = len(doc) == len(chunks)
        for a, b in zip(doc[:-1], doc[1:]):
            is_next = rng.random() < 0.5 or alone
            if not is_next:
                b = _random_other_chunk(chunks, starts, di, rng)
            row, seg = _pair_row(a, b, sequence_length)
            rows.append(row)
            segments.append(seg)
            labels.append(int(is_next))
    if not rows:
        raise data_util.DataError("the pretraining corpus has no document with two or more tokens; "
                           "--use_nsp needs longer documents")
    return np.stack(rows), np.stack(segments), np.array(labels, np.int32)


def _halves(doc: list[np.ndarray]) -> list[np.ndarray]:
    if not doc or len(doc[0]) < 2:
        return doc
    middle = len(doc[0]) // 2
    return [doc[0][:middle], doc[0][middle:]]


def _random_other_chunk(chunks: list[np.ndarray], starts: np.ndarray, doc: int,
                        rng: np.random.Generator) -> np.ndarray:
    """A piece of any document but `doc`, all such pieces equally likely; document d's pieces
    are `chunks[starts[d]:starts[d + 1]]`, and some other document must have one."""
    own = starts[doc + 1] - starts[doc]
    # one draw over the other pieces, skipping over doc's own block: no retries, never doc
    k = int(rng.integers(len(chunks) - own))
    return chunks[k + own if k >= starts[doc] else k]


def _pair_row(a: np.ndarray, b: np.ndarray, sequence_length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.concatenate([[data_util.CLS_ID], a, [data_util.SEP_ID], b, [data_util.SEP_ID]])
    row = np.full(sequence_length, data_util.PAD_ID, np.int32)
    row[:len(ids)] = ids
    segment = np.zeros(sequence_length, np.int32)
    segment[len(a) + 2:len(ids)] = 1
    return row, segment


# ---------------------------------------------------------------------------------- masking
def max_predictions_for(sequence_length: int, mask_rate: float) -> int:
    """Slots in the masked-position list: enough for `mask_rate` of a full row, at least 1."""
    return max(1, math.ceil(sequence_length * mask_rate))


def mask_tokens(token_ids: tf.Tensor, vocab_size: int, mask_rate: float, max_predictions: int,
                generator: tf.random.Generator) -> dict[str, tf.Tensor]:
    """Mask a batch [B,T] of ids, BERT style.

    Returns `token_ids` (masked), `masked_positions` [B,P] and `masked_ids` [B,P]: the original ids
    at those positions, PAD_ID in unused slots (the loss gives such slots zero weight). Only real
    tokens are candidates (never PAD, CLS, SEP); each row masks round(mask_rate * real tokens),
    at least one, at most P.
    """
    token_ids = tf.convert_to_tensor(token_ids, tf.int32)
    candidates = token_ids >= len(data_util.SPECIAL_TOKENS)
    count = tf.reduce_sum(tf.cast(candidates, tf.float32), axis=1)
    wanted = tf.clip_by_value(tf.round(count * mask_rate), 1.0, float(max_predictions))
    scores = tf.where(candidates, generator.uniform(tf.shape(token_ids)), -1.0)
    top_scores, positions = tf.math.top_k(scores, k=max_predictions)
    slot = tf.range(max_predictions, dtype=tf.float32)[tf.newaxis, :]
    used = (slot < wanted[:, tf.newaxis]) & (top_scores >= 0.0)
    positions = tf.where(used, positions, 0)
    original = tf.gather(token_ids, positions, batch_dims=1)
    masked_ids = tf.where(used, original, data_util.PAD_ID)

    choice = generator.uniform(tf.shape(positions))
    random_ids = generator.uniform(tf.shape(positions), len(data_util.SPECIAL_TOKENS), vocab_size,
                                   dtype=tf.int32)
    replacement = tf.where(choice < 0.8, data_util.MASK_ID, tf.where(choice < 0.9, random_ids, original))
    batch_index = tf.broadcast_to(tf.range(tf.shape(positions)[0])[:, tf.newaxis],
                                  tf.shape(positions))
    indices = tf.stack([batch_index, positions], axis=-1)
    masked_tokens = tf.tensor_scatter_nd_update(
        token_ids, tf.boolean_mask(indices, used), tf.boolean_mask(replacement, used))
    return {"token_ids": masked_tokens, "masked_positions": positions, "masked_ids": masked_ids}


# -------------------------------------------------------------------------------- tf.data
def make_pretraining_dataset(token_ids: np.ndarray, vocab_size: int, batch_size: int,
                             mask_rate: float = 0.15, segment_ids: np.ndarray | None = None,
                             nsp_labels: np.ndarray | None = None, shuffle: bool = True,
                             seed: int = 0, fixed_masks: bool = False) -> tf.data.Dataset:
    """Batches of `(features, targets)` for the pretraining model.

    features: token_ids, segment_ids, padding_mask [B,T]; masked_positions [B,P].
    targets: {"mlm": masked ids [B,P]} plus {"nsp": [B]} when `nsp_labels` is given.
    With `fixed_masks` (validation) the masks are drawn once and cached, so the metric is
    comparable between epochs; otherwise every epoch draws new ones.
    """
    if segment_ids is None:
        segment_ids = np.zeros_like(token_ids)
    columns = {"token_ids": token_ids, "segment_ids": segment_ids}
    if nsp_labels is not None:
        columns["nsp"] = nsp_labels
    max_predictions = max_predictions_for(token_ids.shape[1], mask_rate)
    generator = tf.random.Generator.from_seed(seed)

    def to_example(batch: dict) -> tuple[dict, dict]:
        masked = mask_tokens(batch["token_ids"], vocab_size, mask_rate, max_predictions, generator)
        # masking never writes [PAD], so the mask of the masked ids is that of the originals
        features = {**model.backbone_features(masked["token_ids"], batch["segment_ids"]),
                    "masked_positions": masked["masked_positions"]}
        targets = {"mlm": masked["masked_ids"]}
        if "nsp" in batch:
            targets["nsp"] = batch["nsp"]
        return features, targets

    dataset = tf.data.Dataset.from_tensor_slices(columns)
    if shuffle:
        dataset = dataset.shuffle(min(len(token_ids), 100_000), seed=seed,
                                  reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size).map(to_example)
    if fixed_masks:
        dataset = dataset.cache()
    return dataset.prefetch(tf.data.AUTOTUNE)


def split_documents(corpus: Corpus, valid_fraction: float, seed: int) -> tuple[Corpus, Corpus]:
    """Hold out whole documents for validation, so no valid sentence sits in a train row."""
    order = np.random.default_rng(seed).permutation(corpus.num_documents)
    num_valid = min(max(1, round(corpus.num_documents * valid_fraction)), corpus.num_documents - 1)
    if num_valid < 1:
        raise data_util.DataError("the pretraining corpus needs at least two documents (lines) to hold "
                           "one out for validation")
    return (subset_documents(corpus, np.sort(order[num_valid:])),
            subset_documents(corpus, np.sort(order[:num_valid])))


def subset_documents(corpus: Corpus, documents: np.ndarray) -> Corpus:
    tokens, doc_ends, sent_ends, total = [], [0], [0], 0
    for d in documents:
        for sentence in corpus.document_sentences(int(d)):
            tokens.append(sentence)
            total += len(sentence)
            sent_ends.append(total)
        doc_ends.append(len(sent_ends) - 1)
    flat = np.concatenate(tokens) if tokens else np.zeros(0, np.int32)
    return Corpus(flat.astype(np.int32), np.array(sent_ends, np.int64),
                  np.array(doc_ends, np.int64))
