"""Pretraining examples: sentence packing, NSP pairs, BERT masking in tf.data, the corpus cache."""
import os

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
    rows, segments, labels = pretrain_task.make_nsp_pairs(make_corpus(docs), sequence_length=16, seed=1)
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
    out = pretrain_task.mask_tokens(ids, 1000, 0.15, pretrain_task.max_predictions_for(40, 0.15), generator)
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
    valid = pretrain_task.make_pretraining_dataset(ids, 500, 32, shuffle=False, seed=1, fixed_masks=True)
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
    vocab, path = pretrain_task.load_or_build_corpus_cache(str(corpus_file), "space", 100, str(cache_dir),
                                                process_num=1)
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
    _, changed = pretrain_task.load_or_build_corpus_cache(str(corpus_file), "space", 100, str(cache_dir),
                                               process_num=1)
    assert changed != path


@pytest.mark.parametrize("vocab_size,block_tokens", [(8, 1 << 20), (1000, 7), (8, 20)])
def test_one_pass_writes_what_the_two_passes_write(tmp_path, monkeypatch, vocab_size,
                                                   block_tokens):
    """Same vocabulary (ties and all, literal special tokens too), same cache file name and ids,
    whether the text is tokenized once or once for the vocabulary and once for the cache; the
    scratch file is read back in blocks of whole rows of any size, and removed."""
    monkeypatch.setattr(data_util._token_cache_blocks, "__defaults__", (block_tokens,))
    corpus_file = tmp_path / "corpus.txt"
    words = np.random.default_rng(3).choice(["甲", "乙", "丙", "丁", "戊", "己", "[MASK]", "。"],
                                            size=(40, 9))
    corpus_file.write_text("".join(" ".join(row) + "\n" for row in words), encoding="utf-8")
    vocab, cache = pretrain_task.load_or_build_corpus_cache(str(corpus_file), "space", vocab_size,
                                                 str(tmp_path / "one"), process_num=1)
    two_vocab = data_util.load_or_build_vocabulary([str(corpus_file)], "space", vocab_size,
                                            str(tmp_path / "two"), process_num=1)
    two_cache = data_util.load_or_build_token_cache(str(corpus_file), two_vocab, "space",
                                             str(tmp_path / "two"), process_num=1)
    assert vocab.tokens == two_vocab.tokens
    assert os.path.basename(cache) == os.path.basename(two_cache)
    for one, two in zip(data_util.read_token_cache(cache), data_util.read_token_cache(two_cache)):
        np.testing.assert_array_equal(one, two)
    assert not [name for name in os.listdir(tmp_path / "one") if "provisional" in name]


def test_empty_corpus_is_a_clear_error(tmp_path):
    corpus_file = tmp_path / "empty.txt"
    corpus_file.write_text("\n\n", encoding="utf-8")
    with pytest.raises(data_util.DataError, match="no tokens found"):
        pretrain_task.load_or_build_corpus_cache(str(corpus_file), "space", 50, str(tmp_path / "c"),
                                      process_num=1)
