"""Raw text -> masked-LM (and next-sentence) pretraining examples.

The pipeline, in the order it runs:
1. `load_or_build_corpus_cache` tokenizes the corpus once (several processes) into its
   vocabulary and the data layer's fingerprinted HDF5 token cache (one row of ids a document).
2. `split_token_cache` holds out whole documents for validation (a seeded permutation of the
   document numbers, from the cache's offsets only) and cuts the cache into chunks of whole
   documents, about `chunk_tokens` ids each; under several workers each shard owns every
   `num_shards`-th chunk and reads nothing else.
3. Every epoch, `make_pretraining_datasets` reads each chunk of its shard, cuts its documents into
   sentences after sentence-ending punctuation and packs them with `pack_sequences` (or
   `make_nsp_pairs`): `[CLS] A [SEP]` packed from whole sentences (short ones are packed together,
   not dropped as the original did), or `[CLS] A [SEP] B [SEP]` with segment ids for
   next-sentence prediction. Memory holds a few chunks and a shuffle buffer, whatever the corpus
   size; only the offsets (8 bytes a document) and the split (1 byte a document) grow with it.
4. `mask_tokens` runs inside tf.data on every batch, so each epoch sees new masks: 15% of real
   tokens, of which 80% become [MASK], 10% a random token, 10% stay as they are.

`read_corpus`, `split_documents`, `pack_sequences` and `make_nsp_pairs` also work on a whole
corpus in memory (small corpora, notebooks, tests), by the same rules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import h5py
import numpy as np
import tensorflow as tf

import data_util_hdf5 as data_util
import model

# Tokens that end a sentence. Splitting happens on tokens, so it works for every tokenize style.
SENTENCE_END_TOKENS = frozenset("。！？；!?;…") | {"……", "！！", "？？"}
# Ids read from the cache at a time (256 KiB of int32, ~1,300 rows of 64): the chunks in flight
# and their packing cost a few tens of MiB (measured: 4x larger chunks add ~15 MiB at 10x), and
# small chunks give the shuffled chunk order more pieces to shuffle; an HDF5 read stays large.
DEFAULT_CHUNK_TOKENS = 1 << 16
# Ids held by the training shuffle buffer (4 MiB of int32), as rows of the sequence length.
DEFAULT_SHUFFLE_TOKENS = 1 << 20
# Chunks whose rows are interleaved, so that a batch mixes several distant parts of the corpus.
INTERLEAVED_CHUNKS = 4


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
    return data_util.load_or_build_corpus(corpus_file, tokenize_style, vocab_size, cache_dir,
                                          encoding, process_num)


def sentence_end_ids(vocab: data_util.Vocabulary) -> np.ndarray:
    """Ids of the vocabulary's sentence-ending tokens (those it knows), sorted."""
    return np.array(sorted({vocab.id_of(t) for t in SENTENCE_END_TOKENS} - {data_util.UNK_ID}),
                    np.int64)


def corpus_from_rows(tokens: np.ndarray, row_starts: np.ndarray, end_ids: np.ndarray) -> Corpus:
    """Documents given as ids and their starts ([N + 1], the last = len(tokens)), cut into
    sentences after every id in `end_ids`."""
    after_end = np.flatnonzero(np.isin(tokens, end_ids)) + 1
    sentence_offsets = np.union1d(after_end, row_starts).astype(np.int64)
    document_offsets = np.searchsorted(sentence_offsets, row_starts).astype(np.int64)
    return Corpus(tokens.astype(np.int32), sentence_offsets, document_offsets)


def read_corpus(cache_file: str, vocab: data_util.Vocabulary) -> Corpus:
    """All documents of a token cache in memory, cut into sentences after every sentence-ending
    token (the streaming path, `split_token_cache`, reads them a chunk at a time instead)."""
    tokens, document_starts = data_util.read_token_cache(cache_file)
    _check_documents(cache_file, len(document_starts) - 1)
    return corpus_from_rows(tokens, document_starts, sentence_end_ids(vocab))


def _check_documents(cache_file: str, num_documents: int) -> None:
    if num_documents < 1:
        raise data_util.DataError(f"{cache_file}: the pretraining corpus holds no text; give "
                                  "--mask_lm_source_file a file with one document a line")


# ---------------------------------------------------------------------------------- packing
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
    packed = np.full((max(16, corpus.num_documents // 2), sequence_length), data_util.PAD_ID,
                     np.int32)
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


def make_nsp_pairs(corpus: Corpus, sequence_length: int, seed: int | tuple[int, ...]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`[CLS] A [SEP] B [SEP]` rows with segment ids and labels (1 = B follows A, 0 = random B).

    A document that fits in one piece is cut in half so that it still yields a true pair. The B
    of a random pair is a piece of another document, drawn uniformly from all their pieces;
    when no other document holds text (a one-line corpus, or a validation split of a single
    document) there is nothing to draw from, and every pair is a true pair.
    """
    rows, segments, labels = _nsp_pairs(corpus, sequence_length, seed)
    if not len(labels):
        raise data_util.DataError("the pretraining corpus has no document with two or more "
                                  "tokens; --use_nsp needs longer documents")
    return rows, segments, labels


def count_nsp_pairs(corpus: Corpus, sequence_length: int) -> int:
    """len(make_nsp_pairs(...)[2]) without building the rows (one pair a consecutive piece pair)."""
    return sum(max(len(doc) - 1, 0) for doc in _nsp_documents(corpus, sequence_length))


def _nsp_documents(corpus: Corpus, sequence_length: int) -> list[list[np.ndarray]]:
    budget = (sequence_length - 3) // 2
    return [d if len(d) > 1 else _halves(d) for d in _document_chunks(corpus, budget)]


def _nsp_pairs(corpus: Corpus, sequence_length: int, seed: int | tuple[int, ...]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    docs = _nsp_documents(corpus, sequence_length)
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
        empty = np.zeros((0, sequence_length), np.int32)
        return empty, empty.copy(), np.zeros(0, np.int32)
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


class StatelessDraws:
    """The `uniform` of a tf.random.Generator, drawn from a fixed seed [2]: the same seed gives
    the same numbers, so a validation batch keeps its masks every epoch without being cached."""

    def __init__(self, seed: tf.Tensor):
        self.seed = seed
        self.calls = 0

    def uniform(self, shape, minval=0, maxval=None, dtype=tf.float32) -> tf.Tensor:
        # each call site of a traced function gets its own stream
        self.calls += 1
        seed = tf.random.experimental.stateless_fold_in(self.seed, self.calls)
        return tf.random.stateless_uniform(shape, seed, minval, maxval, dtype)


def mask_tokens(token_ids: tf.Tensor, vocab_size: int, mask_rate: float, max_predictions: int,
                generator: tf.random.Generator | StatelessDraws) -> dict[str, tf.Tensor]:
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
    replacement = tf.where(choice < 0.8, data_util.MASK_ID,
                           tf.where(choice < 0.9, random_ids, original))
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
    """Batches of `(features, targets)` for the pretraining model, from rows held in memory.

    features: token_ids, segment_ids, padding_mask [B,T]; masked_positions [B,P].
    targets: {"mlm": masked ids [B,P]} plus {"nsp": [B]} when `nsp_labels` is given.
    With `fixed_masks` (validation) every batch keeps its masks from epoch to epoch, so the
    metric is comparable between epochs; otherwise every epoch draws new ones.
    """
    columns = {"token_ids": token_ids}
    if segment_ids is not None:
        columns["segment_ids"] = segment_ids
    if nsp_labels is not None:
        columns["nsp"] = nsp_labels
    dataset = tf.data.Dataset.from_tensor_slices(columns)
    if shuffle:
        dataset = dataset.shuffle(min(len(token_ids), 100_000), seed=seed,
                                  reshuffle_each_iteration=True)
    max_predictions = max_predictions_for(token_ids.shape[1], mask_rate)
    return model.prefetched(_masked(dataset.batch(batch_size), vocab_size, mask_rate,
                                    max_predictions, seed, fixed_masks))


def _masked(batches: tf.data.Dataset, vocab_size: int, mask_rate: float, max_predictions: int,
            seed: int, fixed_masks: bool) -> tf.data.Dataset:
    """`(features, targets)` from batches of columns: token_ids, optional segment_ids and nsp.

    Fixed masks are drawn from (seed, batch number), so a dataset read in the same order every
    epoch keeps them; otherwise one generator runs on, and each epoch gets new masks.
    """
    def example(batch: dict, draws) -> tuple[dict, dict]:
        masked = mask_tokens(batch["token_ids"], vocab_size, mask_rate, max_predictions, draws)
        # masking never writes [PAD], so the mask of the masked ids is that of the originals
        features = {**model.backbone_features(masked["token_ids"], batch.get("segment_ids")),
                    "masked_positions": masked["masked_positions"]}
        targets = {"mlm": masked["masked_ids"]}
        if "nsp" in batch:
            targets["nsp"] = batch["nsp"]
        return features, targets

    if fixed_masks:
        return batches.enumerate().map(lambda number, batch: example(
            batch, StatelessDraws(tf.stack([tf.constant(seed, tf.int64), number]))))
    generator = tf.random.Generator.from_seed(seed)
    return batches.map(lambda batch: example(batch, generator))


# ------------------------------------------------------------------ the token cache, streamed
# Under several workers a shard gets about this many chunks (smaller ones for a small corpus).
CHUNKS_PER_SHARD = 8


@dataclass(frozen=True)
class PretrainingSettings:
    """The plain values the streamed examples depend on (train_bert_lm.py's flags).

    `batch_size` is one shard's batch: with one shard a worker, a step of `num_shards` workers
    trains on batch_size x num_shards examples (the global batch).
    """

    sequence_length: int
    batch_size: int
    mask_rate: float = 0.15
    valid_fraction: float = 0.05
    seed: int = 0
    use_nsp: bool = False
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    shuffle_tokens: int = DEFAULT_SHUFFLE_TOKENS


@dataclass(frozen=True)
class CacheSplit:
    """One split (training or validation) of one shard of a token cache, read a chunk at a time.

    `chunks` [C, 2]: first and one-past-the-last cache row (document) of each chunk this shard
    reads, in file order. `members` [N]: the split's documents; a chunk's other documents are
    read and dropped. A chunk's examples are its split's documents packed in file order
    (`pack_sequences`, or `make_nsp_pairs` seeded by (nsp_seed, first row) with the random B
    drawn from the same chunk), so packing starts afresh at every chunk.
    """

    cache_file: str
    offsets: np.ndarray   # int64 [N + 1], the cache's row offsets
    members: np.ndarray   # bool [N]
    chunks: np.ndarray    # int64 [C, 2]
    end_ids: np.ndarray   # sentence-ending ids
    sequence_length: int
    nsp_seed: int | None = None  # None: packed masked-LM rows; else NSP pairs

    @property
    def columns(self) -> tuple[str, ...]:
        return ("token_ids",) if self.nsp_seed is None else ("token_ids", "segment_ids", "nsp")

    def read_chunk(self, index: int) -> Corpus:
        """The split's documents in chunk `index`, cut into sentences."""
        first, last = self.chunks[index]
        with h5py.File(self.cache_file, "r") as h5:
            ids = h5["input_ids"][self.offsets[first]:self.offsets[last]]
        lengths = np.diff(self.offsets[first:last + 1])
        keep = self.members[first:last]
        starts = np.concatenate([[0], np.cumsum(lengths[keep])])
        return corpus_from_rows(ids[np.repeat(keep, lengths)], starts, self.end_ids)

    def chunk_examples(self, index: int) -> list[np.ndarray]:
        """The chunk's examples, one array a column (see `columns`), int32."""
        corpus = self.read_chunk(int(index))
        if self.nsp_seed is None:
            return [pack_sequences(corpus, self.sequence_length)]
        seed = (self.nsp_seed, int(self.chunks[int(index), 0]))
        return list(_nsp_pairs(corpus, self.sequence_length, seed))

    def count_examples(self) -> int:
        """Examples an epoch: one pass over the chunks, reading and packing each (sentence ends
        are in the ids, so the offsets alone cannot say)."""
        if self.nsp_seed is None:
            return sum(len(self.chunk_examples(i)[0]) for i in range(len(self.chunks)))
        return sum(count_nsp_pairs(self.read_chunk(i), self.sequence_length)
                   for i in range(len(self.chunks)))


def split_document_indices(num_documents: int, valid_fraction: float, seed: int
                           ) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) document numbers, each sorted: a seeded permutation of all of them
    decides, so a document's split depends on the seed and the number of documents only."""
    order = np.random.default_rng(seed).permutation(num_documents)
    num_valid = min(max(1, round(num_documents * valid_fraction)), num_documents - 1)
    if num_valid < 1:
        raise data_util.DataError("the pretraining corpus needs at least two documents (lines) "
                                  "to hold one out for validation")
    return np.sort(order[num_valid:]), np.sort(order[:num_valid])


def chunk_rows(offsets: np.ndarray, chunk_tokens: int) -> np.ndarray:
    """[C, 2] ranges of whole rows, in order, of at most `chunk_tokens` ids each (a longer row
    is a chunk of its own)."""
    bounds, row, num_rows = [0], 0, len(offsets) - 1
    while row < num_rows:
        end = int(np.searchsorted(offsets, offsets[row] + chunk_tokens, side="right")) - 1
        row = min(max(end, row + 1), num_rows)
        bounds.append(row)
    return np.stack([bounds[:-1], bounds[1:]], axis=1).astype(np.int64)


def split_token_cache(cache_file: str, vocab: data_util.Vocabulary,
                      settings: PretrainingSettings, num_shards: int = 1,
                      shard_index: int = 0) -> tuple[CacheSplit, CacheSplit]:
    """(training, validation) splits of shard `shard_index` of `num_shards` of a token cache.

    Reads only the offsets. The split of whole documents is `split_document_indices`, the same
    for every chunk size and shard count; the cache is cut into `chunk_rows` and shard k owns
    chunks k, k + num_shards, ..., so it reads about 1/num_shards of the ids.
    """
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index={shard_index} is not in [0, num_shards={num_shards})")
    offsets = _read_offsets(cache_file)
    num_documents = len(offsets) - 1
    _check_documents(cache_file, num_documents)
    train_docs, valid_docs = split_document_indices(num_documents, settings.valid_fraction,
                                                    settings.seed)
    chunk_tokens = settings.chunk_tokens
    if num_shards > 1:
        # several chunks a shard, so that the shards come out close in size
        chunk_tokens = min(chunk_tokens,
                           max(1, int(offsets[-1]) // (num_shards * CHUNKS_PER_SHARD)))
    chunks = chunk_rows(offsets, chunk_tokens)
    if len(chunks) < num_shards:
        raise data_util.DataError(
            f"{cache_file}: {len(chunks)} chunks of at most {chunk_tokens} tokens "
            f"cannot feed {num_shards} shards; use fewer workers or smaller chunks")

    def split(documents: np.ndarray, nsp_seed: int) -> CacheSplit:
        members = np.zeros(num_documents, bool)
        members[documents] = True
        return CacheSplit(cache_file, offsets, members, chunks[shard_index::num_shards],
                          sentence_end_ids(vocab), settings.sequence_length,
                          nsp_seed if settings.use_nsp else None)

    return split(train_docs, settings.seed), split(valid_docs, settings.seed + 1)


def _read_offsets(cache_file: str) -> np.ndarray:
    with h5py.File(cache_file, "r") as h5:
        return h5["offsets"][:]


@dataclass(frozen=True)
class PretrainingData:
    """One shard's batches (see `make_pretraining_datasets`) and how many there are."""

    train: tf.data.Dataset
    valid: tf.data.Dataset
    steps_per_epoch: int   # training batches an epoch, exact (the dataset asserts it)
    train_examples: int
    valid_examples: int


def make_pretraining_datasets(cache_file: str, vocab: data_util.Vocabulary,
                              settings: PretrainingSettings, num_shards: int = 1,
                              shard_index: int = 0) -> PretrainingData:
    """Training and validation batches of one shard, streamed from the token cache.

    Training: each epoch reads the shard's chunks in a new random order, interleaves the rows of
    INTERLEAVED_CHUNKS chunks at a time, shuffles them in a buffer of about
    `settings.shuffle_tokens` ids and masks every batch anew. Validation: the same chunks, rows
    and masks every epoch. Before returning, one counting pass reads every chunk of both splits
    once, so `steps_per_epoch` is exact.

    Several workers: each builds its own shard (same settings, its `shard_index`) with the
    per-worker batch; the datasets carry AutoShardPolicy.OFF, since tf.distribute must not
    shard them again. Shards differ by a few batches; a synchronous strategy needs the same
    steps on every worker, so the caller agrees on the smallest count (one all-reduce) and
    takes that many batches of `train` each epoch.
    """
    train, valid = split_token_cache(cache_file, vocab, settings, num_shards, shard_index)
    counts = train.count_examples(), valid.count_examples()
    for split_name, count in zip(("training", "validation"), counts):
        if not count:
            raise data_util.DataError(
                f"{cache_file}: shard {shard_index} of {num_shards} holds no {split_name} "
                "sequences; give a longer corpus (or fewer workers)")
    datasets = [_streamed(split, len(vocab), settings, count, shuffle=shuffle, seed=seed)
                for split, count, shuffle, seed in zip((train, valid), counts, (True, False),
                                                       (settings.seed, settings.seed + 1))]
    if num_shards > 1:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = \
            tf.data.experimental.AutoShardPolicy.OFF
        datasets = [dataset.with_options(options) for dataset in datasets]
    return PretrainingData(*datasets, -(-counts[0] // settings.batch_size), *counts)


def _streamed(split: CacheSplit, vocab_size: int, settings: PretrainingSettings,
              num_examples: int, shuffle: bool, seed: int) -> tf.data.Dataset:
    order = tf.data.Dataset.range(len(split.chunks))
    if shuffle:
        order = order.shuffle(len(split.chunks), seed=seed, reshuffle_each_iteration=True)
    rows = order.interleave(lambda index: _chunk_dataset(split, index),
                            cycle_length=min(INTERLEAVED_CHUNKS, len(split.chunks)))
    if shuffle:
        rows = rows.shuffle(max(1, settings.shuffle_tokens // split.sequence_length), seed=seed,
                            reshuffle_each_iteration=True)
    max_predictions = max_predictions_for(split.sequence_length, settings.mask_rate)
    batches = _masked(rows.batch(settings.batch_size), vocab_size, settings.mask_rate,
                      max_predictions, seed, fixed_masks=not shuffle)
    steps = -(-num_examples // settings.batch_size)
    return model.prefetched(batches.apply(tf.data.experimental.assert_cardinality(steps)))


def _chunk_dataset(split: CacheSplit, index: tf.Tensor) -> tf.data.Dataset:
    columns = tf.numpy_function(split.chunk_examples, [index], [tf.int32] * len(split.columns))
    for name, column in zip(split.columns, columns):
        column.set_shape([None] if name == "nsp" else [None, split.sequence_length])
    return tf.data.Dataset.from_tensor_slices(dict(zip(split.columns, columns)))


def split_documents(corpus: Corpus, valid_fraction: float, seed: int) -> tuple[Corpus, Corpus]:
    """Hold out whole documents for validation, so no valid sentence sits in a train row (the
    in-memory counterpart of `split_token_cache`: the same documents for the same seed)."""
    train, valid = split_document_indices(corpus.num_documents, valid_fraction, seed)
    return subset_documents(corpus, train), subset_documents(corpus, valid)


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
