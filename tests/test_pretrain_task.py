"""Pretraining examples: sentence packing, NSP pairs, BERT masking in tf.data, the corpus cache."""
import os

import h5py
import numpy as np
import pytest
import tensorflow as tf

import data_util_hdf5 as data_util
import pretrain_task

FIRST_WORD = len(data_util.SPECIAL_TOKENS)


def make_corpus(documents: list[list[list[int]]]) -> pretrain_task.Corpus:
    sentences = [np.array(s, np.int32) for doc in documents for s in doc]
    sentence_offsets = np.cumsum([0] + [len(s) for s in sentences])
    document_offsets = np.cumsum([0] + [len(doc) for doc in documents])
    return pretrain_task.Corpus(np.concatenate(sentences), sentence_offsets, document_offsets)


def test_pack_sequences_packs_short_sentences_and_cuts_long_ones():
    corpus = make_corpus([[[10, 11], [12, 13], [14]], [[20] * 9], [[30]]])
    rows = pretrain_task.pack_sequences(corpus, sequence_length=6)  # room for 4 tokens a piece
    assert rows.shape[1] == 6 and (rows[:, 0] == data_util.CLS_ID).all()
    # document 1: [10 11 12 13] then [14]; document 2 (9 tokens): 4 + 4 + 1; document 3: [30]
    assert rows[0].tolist() == [data_util.CLS_ID, 10, 11, 12, 13, data_util.SEP_ID]
    assert rows[1].tolist() == [data_util.CLS_ID, 14, data_util.SEP_ID, 0, 0, 0]
    assert rows[2].tolist() == [data_util.CLS_ID, 20, 20, 20, 20, data_util.SEP_ID]
    # short pieces of different documents share a row
    assert rows[4].tolist() == [data_util.CLS_ID, 20, data_util.SEP_ID, 30, data_util.SEP_ID, 0]
    assert len(rows) == 5
    words = rows[rows >= FIRST_WORD]
    assert sorted(words.tolist()) == sorted(corpus.tokens.tolist())


def test_nsp_pairs_are_balanced_and_segmented():
    rng = np.random.default_rng(0)
    docs = [[list(rng.integers(FIRST_WORD, 50, 5)) for _ in range(4)] for _ in range(60)]
    rows, segments, labels = pretrain_task.make_nsp_pairs(make_corpus(docs), sequence_length=16,
                                                          seed=1)
    assert rows.shape == segments.shape == (len(labels), 16)
    assert 0.35 < labels.mean() < 0.65
    for row, segment in zip(rows, segments):
        sep = np.flatnonzero(row == data_util.SEP_ID)
        assert row[0] == data_util.CLS_ID and len(sep) == 2
        assert (segment[:sep[0] + 1] == 0).all() and (segment[sep[0] + 1:sep[1] + 1] == 1).all()
        assert (segment[sep[1] + 1:] == 0).all()


def test_nsp_true_pairs_follow_each_other():
    corpus = make_corpus([[[10, 11, 12], [13, 14, 15]], [[30, 31], [32, 33]]])
    rows, _, labels = pretrain_task.make_nsp_pairs(corpus, sequence_length=9, seed=3)
    for row, label in zip(rows, labels):
        if label == 1:
            words = row[row >= FIRST_WORD].tolist()
            assert words in ([10, 11, 12, 13, 14, 15], [30, 31, 32, 33])


def segment_words(row: np.ndarray, segment: np.ndarray, which: int) -> np.ndarray:
    return row[(segment == which) & (row >= FIRST_WORD)]


def test_single_sentence_documents_are_cut_in_half_into_true_pairs():
    # length 11 leaves 4 ids a segment, so each 4-id sentence is one piece that must be halved
    # (at length 9 the piece budget of 3 cuts the sentence and the halving never runs)
    docs = [[[FIRST_WORD + 10 * d + i for i in range(4)]] for d in range(6)]
    rows, segments, labels = pretrain_task.make_nsp_pairs(make_corpus(docs), sequence_length=11,
                                                          seed=0)
    assert len(rows) == len(docs)
    for row, segment, label in zip(rows, segments, labels):
        a, b = segment_words(row, segment, 0), segment_words(row, segment, 1)
        sentence = docs[(a[0] - FIRST_WORD) // 10][0]
        assert a.tolist() == sentence[:2]
        assert label == (b.tolist() == sentence[2:])
    assert labels.sum() >= 2


def document_of_each_segment(rows: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """[N,2]: the document of segments A and B, for corpora whose document d is all id
    FIRST_WORD + d."""
    found = []
    for row, segment in zip(rows, segments):
        words = [np.unique(segment_words(row, segment, which)) for which in (0, 1)]
        assert [len(w) for w in words] == [1, 1]
        found.append([words[0][0] - FIRST_WORD, words[1][0] - FIRST_WORD])
    return np.array(found)


def test_nsp_random_segments_come_from_another_document():
    # a long document beside two short ones: a piece drawn from the whole corpus is mostly its own
    docs = [[[FIRST_WORD] * 3] * 60] + [[[FIRST_WORD + d] * 3] * 2 for d in (1, 2)]
    rows, segments, labels = pretrain_task.make_nsp_pairs(make_corpus(docs), sequence_length=9,
                                                          seed=0)
    documents = document_of_each_segment(rows, segments)
    negatives = documents[labels == 0]
    assert len(negatives) >= 20
    assert (negatives[:, 0] != negatives[:, 1]).all()
    assert (documents[labels == 1, 0] == documents[labels == 1, 1]).all()


@pytest.mark.parametrize("docs", [[[[FIRST_WORD] * 3] * 8], [[[FIRST_WORD] * 3] * 8, []]],
                         ids=["one document", "the other one empty"])
def test_nsp_without_another_document_gives_only_true_pairs(docs):
    rows, segments, labels = pretrain_task.make_nsp_pairs(make_corpus(docs), sequence_length=9,
                                                          seed=0)
    assert len(rows) == 7 and labels.all()


def test_masking_statistics_follow_bert():
    rng = np.random.default_rng(0)
    ids = rng.integers(FIRST_WORD, 1000, size=(512, 40)).astype(np.int32)
    ids[:, 0], ids[:, 30], ids[:, 31:] = data_util.CLS_ID, data_util.SEP_ID, data_util.PAD_ID
    generator = tf.random.Generator.from_seed(1)
    out = pretrain_task.mask_tokens(ids, 1000, 0.15, pretrain_task.max_predictions_for(40, 0.15),
                                    generator)
    positions, targets = out["masked_positions"].numpy(), out["masked_ids"].numpy()
    masked = out["token_ids"].numpy()
    used = targets != data_util.PAD_ID
    # 29 real tokens a row -> round(4.35) = 4 masked per row
    assert (used.sum(axis=1) == 4).all()
    chosen = np.take_along_axis(ids, positions, axis=1)
    assert (chosen[used] == targets[used]).all()
    assert (chosen[used] >= FIRST_WORD).all()  # never PAD, CLS or SEP
    assert (positions[~used] == 0).all()
    after = np.take_along_axis(masked, positions, axis=1)[used]
    share_mask = np.mean(after == data_util.MASK_ID)
    share_kept = np.mean(after == targets[used])
    assert 0.76 < share_mask < 0.84 and 0.07 < share_kept < 0.13
    untouched = np.ones_like(ids, bool)
    np.put_along_axis(untouched, positions, False, axis=1)
    assert (masked[untouched] == ids[untouched]).all()


def test_masking_a_row_with_one_token_masks_it():
    ids = np.array([[data_util.CLS_ID, 9, data_util.SEP_ID, 0, 0, 0]], np.int32)
    out = pretrain_task.mask_tokens(ids, 50, 0.15, 2, tf.random.Generator.from_seed(0))
    assert out["masked_ids"].numpy().tolist() == [[9, 0]]
    assert out["masked_positions"].numpy()[0, 0] == 1


def _first_batch_masks(dataset) -> np.ndarray:
    features, _ = next(iter(dataset))
    return features["masked_positions"].numpy()


def test_dataset_draws_new_masks_each_epoch_but_validation_keeps_its_own():
    ids = np.random.default_rng(0).integers(FIRST_WORD, 500, size=(32, 24)).astype(np.int32)
    train = pretrain_task.make_pretraining_dataset(ids, 500, 32, shuffle=False, seed=1)
    assert not np.array_equal(_first_batch_masks(train), _first_batch_masks(train))
    valid = pretrain_task.make_pretraining_dataset(ids, 500, 32, shuffle=False, seed=1,
                                                   fixed_masks=True)
    first = _first_batch_masks(valid)
    assert np.array_equal(first, _first_batch_masks(valid))
    features, targets = next(iter(valid))
    assert set(features) == {"token_ids", "segment_ids", "padding_mask", "masked_positions"}
    assert targets["mlm"].shape == (32, pretrain_task.max_predictions_for(24, 0.15))


def test_split_documents_is_disjoint_and_complete():
    corpus = make_corpus([[[FIRST_WORD + d, FIRST_WORD + d]] for d in range(20)])
    train, valid = pretrain_task.split_documents(corpus, 0.25, seed=0)
    assert train.num_documents == 15 and valid.num_documents == 5
    assert not set(train.tokens.tolist()) & set(valid.tokens.tolist())
    assert sorted(train.tokens.tolist() + valid.tokens.tolist()) == sorted(corpus.tokens.tolist())


def test_corpus_cache_round_trip_and_reuse(tmp_path, capsys):
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("我 爱 北京 。 天安门 很 大 ！ 真的\n\n今天 天气 好\n", encoding="utf-8")
    cache_dir = tmp_path / "cache"
    vocab, path = pretrain_task.load_or_build_corpus_cache(str(corpus_file), "space", 100,
                                                           str(cache_dir), process_num=1)
    corpus = pretrain_task.read_corpus(path, vocab)
    assert corpus.num_documents == 2
    first_doc = corpus.document_sentences(0)
    assert [vocab.tokens[i] for i in first_doc[0]] == ["我", "爱", "北京", "。"]
    assert len(first_doc) == 3  # split after 。 and ！, the tail is a sentence too
    again_vocab, again = pretrain_task.load_or_build_corpus_cache(str(corpus_file), "space", 100,
                                                                  str(cache_dir), process_num=1)
    assert again == path and "Reusing" in capsys.readouterr().out
    assert again_vocab.tokens == vocab.tokens
    assert pretrain_task.read_corpus(again, vocab).tokens.tolist() == corpus.tokens.tolist()
    corpus_file.write_text("别的 文字\n", encoding="utf-8")
    _, changed = pretrain_task.load_or_build_corpus_cache(str(corpus_file), "space", 100,
                                                          str(cache_dir), process_num=1)
    assert changed != path


# block_tokens None: the provisional ids stay in memory; a number: they go to the scratch file
# (after the first 10), read back in blocks of about that many
@pytest.mark.parametrize("style,vocab_size,block_tokens,process_num,numbering_limit",
                         [("space", 8, None, 1, 1 << 18), ("space", 1000, 7, 1, 1 << 18),
                          ("space", 8, 20, 1, 1 << 18), ("space", 8, 20, 2, 1 << 18),
                          ("word", 12, 20, 2, 5), ("word", 1000, None, 1, 1 << 18),
                          ("word", 12, None, 2, 5)])
def test_one_pass_writes_what_the_two_passes_write(tmp_path, monkeypatch, style, vocab_size,
                                                   block_tokens, process_num, numbering_limit):
    """Same vocabulary (ties and all, literal special tokens too), same cache file name and ids,
    whether the text is tokenized once or once for the vocabulary and once for the cache (line
    by line, `tokenize` itself); the scratch file is read back in blocks of whole rows of any
    size, and removed. The one pass numbers the tokens in the workers: chunks of 2-3 lines,
    blank lines among them, a worker's numbering started afresh every few tokens."""
    if block_tokens:
        monkeypatch.setattr(data_util, "HELD_IDS", 10)
        monkeypatch.setattr(data_util._token_cache_blocks, "__defaults__", (block_tokens,))
    read_back, read = [], data_util._token_cache_blocks
    monkeypatch.setattr(data_util, "_token_cache_blocks",
                        lambda *args: read_back.append(args) or read(*args))
    monkeypatch.setattr(data_util, "RAW_CHUNK_BYTES", 100)  # 2 or 3 lines a chunk
    monkeypatch.setattr(data_util, "NUMBERING_LIMIT", numbering_limit)
    corpus_file = tmp_path / "corpus.txt"
    words = np.random.default_rng(3).choice(["甲", "乙", "丙", "丁", "戊", "己", "[MASK]", "。",
                                             "2008-6-1", "北京", "\u3000", "C++"], size=(40, 9))
    lines = [" ".join(row) + "\n" for row in words]
    lines[7:7] = ["\n", "  \n"]
    corpus_file.write_text("".join(lines), encoding="utf-8")
    vocab, cache = pretrain_task.load_or_build_corpus_cache(str(corpus_file), style, vocab_size,
                                                 str(tmp_path / "one"), process_num=process_num)
    two_vocab = data_util.load_or_build_vocabulary([str(corpus_file)], style, vocab_size,
                                            str(tmp_path / "two"), process_num=1)
    two_cache = data_util.load_or_build_token_cache(str(corpus_file), two_vocab, style,
                                             str(tmp_path / "two"), process_num=1)
    assert vocab.tokens == two_vocab.tokens
    assert os.path.basename(cache) == os.path.basename(two_cache)
    for one, two in zip(data_util.read_token_cache(cache), data_util.read_token_cache(two_cache)):
        np.testing.assert_array_equal(one, two)
    ids, offsets = data_util.read_token_cache(cache)
    expected = [vocab.encode(data_util.tokenize(line, style)) for line in lines if line.strip()]
    assert [list(ids[a:b]) for a, b in zip(offsets[:-1], offsets[1:])] == expected
    with h5py.File(cache, "r") as h5:
        np.testing.assert_array_equal(h5["line_numbers"][:], [*range(1, 8), *range(10, 43)])
    assert not [name for name in os.listdir(tmp_path / "one") if "provisional" in name]
    assert bool(read_back) == bool(block_tokens)


@pytest.mark.parametrize("process_num", [1, 2])
def test_a_bad_byte_deep_in_the_corpus_names_its_line(tmp_path, monkeypatch, process_num):
    """Chunks are decoded where they are tokenized (in the workers); the error still names the
    file and the line, and a GBK corpus reads with --encoding gb18030."""
    monkeypatch.setattr(data_util, "RAW_CHUNK_BYTES", 100)
    text = "".join(f"第{i}行 我们 今天 去 北京\n" for i in range(40))
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_bytes(text.encode("utf-8") + "上海 广州\n".encode("gb18030"))
    with pytest.raises(data_util.DataError, match=r"corpus\.txt:41: cannot decode as utf-8 .*"
                                                  r"--encoding gb18030"):
        pretrain_task.load_or_build_corpus_cache(str(corpus_file), "word", 100,
                                                 str(tmp_path / "c"), process_num=process_num)
    corpus_file.write_bytes((text + "上海 广州\n").encode("gb18030"))
    vocab, _ = pretrain_task.load_or_build_corpus_cache(
        str(corpus_file), "word", 100, str(tmp_path / "c"), "gb18030", process_num=process_num)
    assert "上海" in vocab.tokens and "北京" in vocab.tokens


def test_empty_corpus_is_a_clear_error(tmp_path):
    corpus_file = tmp_path / "empty.txt"
    corpus_file.write_text("\n\n", encoding="utf-8")
    with pytest.raises(data_util.DataError, match="no tokens found"):
        pretrain_task.load_or_build_corpus_cache(str(corpus_file), "space", 50, str(tmp_path / "c"),
                                      process_num=1)


# ------------------------------------------------------------------ streamed from the token cache
STREAM_LENGTH = 16


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory) -> tuple[data_util.Vocabulary, str]:
    """A real token cache of 40 documents; document d's words are all `d_k` (k < 4), its
    sentences end with 。, and its length varies from one short sentence to six long ones."""
    rng = np.random.default_rng(5)
    lines = []
    for d in range(40):
        sentences = [" ".join(f"{d}_{k}" for k in rng.integers(0, 4, rng.integers(1, 13)))
                     for _ in range(rng.integers(1, 7))]
        lines.append(" 。 ".join(sentences) + ("" if d % 3 else " 。"))
    root = tmp_path_factory.mktemp("stream")
    (root / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return pretrain_task.load_or_build_corpus_cache(str(root / "corpus.txt"), "space", 1000,
                                                    str(root / "cache"), process_num=1)


def settings(**changes) -> pretrain_task.PretrainingSettings:
    values = {"sequence_length": STREAM_LENGTH, "batch_size": 8, "valid_fraction": 0.2,
              "seed": 3, "chunk_tokens": 50, **changes}
    return pretrain_task.PretrainingSettings(**values)


def unmasked_rows(dataset) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """(original rows, masked positions, targets) of every batch: the masked ids put back."""
    batches = []
    for features, targets in dataset:
        rows, positions = features["token_ids"].numpy(), features["masked_positions"].numpy()
        masked = targets["mlm"].numpy()
        current = np.take_along_axis(rows, positions, axis=1)
        np.put_along_axis(rows, positions, np.where(masked != data_util.PAD_ID, masked, current),
                          axis=1)
        batches.append((rows, positions, {k: v.numpy() for k, v in targets.items()}))
    return batches


def row_multiset(rows: np.ndarray) -> list[tuple]:
    return sorted(map(tuple, rows.tolist()))


def documents_in(rows: np.ndarray, vocab: data_util.Vocabulary) -> set[int]:
    words = [vocab.tokens[i] for i in np.unique(rows[rows >= FIRST_WORD])]
    return {int(word.split("_")[0]) for word in words if "_" in word}


def test_streamed_rows_are_the_in_memory_packing_of_each_chunk(token_cache):
    """One chunk: exactly the in-memory packing of the training split. Small chunks: packing
    starts afresh at every chunk, so the rows are the in-memory packing of each chunk's
    training documents (the only change: a partly filled row at the end of a chunk)."""
    vocab, cache = token_cache
    corpus = pretrain_task.read_corpus(cache, vocab)
    whole, _ = pretrain_task.split_documents(corpus, 0.2, seed=3)
    offsets = data_util.read_token_cache(cache)[1]
    train_docs, _ = pretrain_task.split_document_indices(corpus.num_documents, 0.2, 3)
    for chunk_tokens in (1 << 30, 50):
        expected = [pretrain_task.pack_sequences(pretrain_task.subset_documents(
            corpus, train_docs[(train_docs >= first) & (train_docs < last)]), STREAM_LENGTH)
            for first, last in pretrain_task.chunk_rows(offsets, chunk_tokens)]
        data = pretrain_task.make_pretraining_datasets(cache, vocab,
                                                       settings(chunk_tokens=chunk_tokens))
        streamed = np.concatenate([rows for rows, _, _ in unmasked_rows(data.train)])
        assert row_multiset(streamed) == row_multiset(np.concatenate(expected))
        assert data.train_examples == len(streamed)
    assert len(expected) > 10
    one_chunk = pretrain_task.pack_sequences(whole, STREAM_LENGTH)
    assert 0 < len(streamed) - len(one_chunk) <= len(expected)
    words = whole.tokens[whole.tokens >= FIRST_WORD]
    assert sorted(streamed[streamed >= FIRST_WORD]) == sorted(words)


@pytest.mark.parametrize("chunk_tokens", [16, 50, 1 << 30])
def test_every_document_lands_in_one_split_whatever_the_chunk_size(token_cache, chunk_tokens):
    vocab, cache = token_cache
    data = pretrain_task.make_pretraining_datasets(cache, vocab,
                                                   settings(chunk_tokens=chunk_tokens))
    train = documents_in(np.concatenate([r for r, _, _ in unmasked_rows(data.train)]), vocab)
    valid = documents_in(np.concatenate([r for r, _, _ in unmasked_rows(data.valid)]), vocab)
    assert not train & valid and train | valid == set(range(40))
    expected_train, expected_valid = pretrain_task.split_document_indices(40, 0.2, seed=3)
    assert train == set(expected_train.tolist()) and valid == set(expected_valid.tolist())


def test_two_shards_read_disjoint_chunks_and_cover_the_training_documents(token_cache):
    vocab, cache = token_cache
    whole, _ = pretrain_task.split_token_cache(cache, vocab, settings())
    shards = [pretrain_task.split_token_cache(cache, vocab, settings(), 2, k)[0] for k in (0, 1)]
    chunks = [set(map(tuple, shard.chunks.tolist())) for shard in shards]
    assert not chunks[0] & chunks[1]
    assert chunks[0] | chunks[1] == set(map(tuple, whole.chunks.tolist()))
    found = []
    for k in (0, 1):
        data = pretrain_task.make_pretraining_datasets(cache, vocab, settings(), 2, k)
        found.append(documents_in(np.concatenate([r for r, _, _ in unmasked_rows(data.train)]),
                                  vocab))
        policy = data.train.options().experimental_distribute.auto_shard_policy
        assert policy == tf.data.experimental.AutoShardPolicy.OFF
    train_docs, _ = pretrain_task.split_document_indices(40, 0.2, seed=3)
    assert not found[0] & found[1] and found[0] | found[1] == set(train_docs.tolist())


@pytest.mark.parametrize("use_nsp", [False, True], ids=["packed", "nsp"])
def test_steps_per_epoch_equal_the_batches_produced(token_cache, use_nsp):
    vocab, cache = token_cache
    data = pretrain_task.make_pretraining_datasets(cache, vocab,
                                                   settings(batch_size=7, use_nsp=use_nsp))
    for _ in range(2):
        batches = unmasked_rows(data.train)
        assert len(batches) == data.steps_per_epoch
        assert sum(len(rows) for rows, _, _ in batches) == data.train_examples
    assert data.train.cardinality().numpy() == data.steps_per_epoch
    assert sum(len(rows) for rows, _, _ in unmasked_rows(data.valid)) == data.valid_examples


def test_streamed_masks_change_between_epochs_but_validation_masks_do_not(token_cache):
    vocab, cache = token_cache
    data = pretrain_task.make_pretraining_datasets(cache, vocab, settings())

    def masks_by_row(dataset) -> dict[bytes, bytes]:
        return {row.tobytes(): np.sort(position).tobytes() for rows, positions, _ in
                unmasked_rows(dataset) for row, position in zip(rows, positions)}

    first, second = masks_by_row(data.train), masks_by_row(data.train)
    assert first.keys() == second.keys()
    assert sum(first[row] != second[row] for row in first) > len(first) // 2
    epochs = [unmasked_rows(data.valid) for _ in range(2)]
    for (rows, positions, _), (rows_again, positions_again, _) in zip(*epochs):
        np.testing.assert_array_equal(rows, rows_again)
        np.testing.assert_array_equal(positions, positions_again)


def test_streamed_nsp_pairs_take_their_random_half_from_another_document_of_the_chunk(
        token_cache):
    vocab, cache = token_cache
    train, _ = pretrain_task.split_token_cache(cache, vocab, settings(use_nsp=True))
    whole = pretrain_task.split_documents(pretrain_task.read_corpus(cache, vocab), 0.2, 3)[0]
    in_memory = pretrain_task.make_nsp_pairs(whole, STREAM_LENGTH, seed=0)
    assert train.count_examples() == len(in_memory[2])
    negatives = 0
    for index, (first, last) in enumerate(train.chunks):
        rows, segments, labels = train.chunk_examples(index)
        for row, segment, label in zip(rows, segments, labels):
            # a half may be the lone 。 cut off a long sentence, which belongs to no document
            a, b = (documents_in(segment_words(row, segment, s), vocab) for s in (0, 1))
            assert len(a) <= 1 and len(b) <= 1
            assert all(first <= d < last for d in a | b)
            if a and b:
                assert (a == b) == bool(label)
                negatives += not label
    assert negatives >= 10
