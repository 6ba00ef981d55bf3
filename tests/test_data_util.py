"""data_util_hdf5 on real files with real jieba and h5py: parsing, vocabulary, caches, failures."""
import collections
import errno
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import data_util_hdf5 as data_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, text: str, encoding: str = "utf-8") -> str:
    with open(path, "w", encoding=encoding, newline="") as f:
        f.write(text)
    return str(path)


# ----------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("line, expected", [
    ("我 爱 北京", ("我 爱 北京", [])),
    ("__label__a __label__b", ("", ["a", "b"])),
    ("w1 w2 __label__l1 __label__l5", ("w1 w2", ["l1", "l5"])),
    ("text __label__  __label__b\t", ("text", ["b"])),
    ("__label__a some text", ("some text", ["a"])),
    ("some __label__a text __label__b", ("some text", ["a", "b"])),
    ("text __label__a __label__a", ("text", ["a"])),
    ("  padded text  __label__x", ("padded text", ["x"])),
])
def test_parse_label_line(line, expected):
    assert data_util.parse_label_line(line) == expected


def test_read_lines_strips_bom_and_crlf_and_numbers_from_one(tmp_path):
    path = write(tmp_path / "f.txt", "\ufeff第一 __label__a\r\n\r\n第三\r\n最后")
    assert list(data_util.read_lines(path)) == [(1, "第一 __label__a"), (2, ""), (3, "第三"),
                                                (4, "最后")]


def test_labelled_lines_skip_blank_and_warn_about_unlabelled(tmp_path, capsys):
    path = write(tmp_path / "train.txt", "\ufeff我 爱 北京 __label__a\r\n\n没有 标签\n"
                 "__label__b __label__c\n天安门 __label__a __label__b\n")
    rows = list(data_util.iter_tokenized_lines(path, "space", labelled=True, process_num=1))
    assert rows == [(1, ["我", "爱", "北京"], ["a"]), (4, [], ["b", "c"]),
                    (5, ["天安门"], ["a", "b"])]
    err = capsys.readouterr().err
    assert f"{path}:3: no __label__" in err
    assert "skipped 1 line(s) without a label, kept 3" in err
    assert "lines/s" in err  # the progress line


def test_labelled_file_without_any_label_is_an_error(tmp_path):
    path = write(tmp_path / "plain.txt", "只是 文字\n还是 文字\n")
    with pytest.raises(data_util.DataError, match=r"plain\.txt: no line has a __label__"):
        list(data_util.iter_tokenized_lines(path, "space", labelled=True, process_num=1))


def test_unlabelled_lines_skip_blanks(tmp_path):
    path = write(tmp_path / "corpus.txt", "a b\n   \n\nc\n")
    assert list(data_util.iter_tokenized_lines(path, "space", process_num=1)) == [(1, ["a", "b"]),
                                                                                  (4, ["c"])]


def test_tokenize_styles():
    assert data_util.tokenize(" 我 爱\t北京 ", "space") == ["我", "爱", "北京"]
    assert data_util.tokenize("我 爱 ab", "char") == ["我", "爱", "a", "b"]
    assert data_util.tokenize("我来到北京清华大学  hello", "word") == ["我", "来到", "北京", "清华大学",
                                                              "hello"]
    with pytest.raises(data_util.DataError, match="--tokenize_style='words' is unknown"):
        data_util.tokenize("x", "words")


def test_pool_yields_the_same_tokens_in_file_order(tmp_path):
    lines = [f"第{i}行 我们 今天 去 北京 看 天安门 line{i}" for i in range(300)]
    path = write(tmp_path / "c.txt", "\n".join(lines) + "\n")
    inline = list(data_util.iter_tokenized_lines(path, "word", process_num=1, chunk_lines=7))
    pooled = list(data_util.iter_tokenized_lines(path, "word", process_num=2, chunk_lines=7))
    assert pooled == inline
    assert [no for no, _ in pooled] == list(range(1, 301))
    assert inline[5][1] == data_util.tokenize(lines[5], "word")


TRICKY_LINES = ["我来到北京清华大学  hello", "", "   ", "\t价格 2008-6-1 check-in 很 好\u3000",
                "qq.com 和 802.11n 与 T_T", "中文", "a-b-c-d  e.f", "５月 ２３日 电 ： 9.5%",
                "\u3000\u3000第二段", "ItwasexcellentandIcan.Myroom 的 wifi"]


@pytest.mark.parametrize("backend", data_util.WORD_BACKENDS)
def test_chunks_are_encoded_into_the_tokens_of_their_lines(backend):
    """Two chunks of one run in one worker: the second sends only the tokens new to the
    worker, and its ids index everything the worker has sent."""
    if backend == "rjieba":
        pytest.importorskip("rjieba")
    raw = [("\ufeff" * (i == 0) + text + "\r" * (i % 2) + "\n").encode("utf-8")
           for i, text in enumerate(TRICKY_LINES * 3)]
    known, run = [], "test-run"
    try:
        for first_line_no, lines in ((1, raw[:13]), (14, raw[13:])):
            worker, sent_before, new, line_numbers, lengths, ids, skipped, kept = \
                data_util._encode_chunk("word", "corpus.txt", "utf-8", run, backend, False,
                                        (first_line_no, lines))
            assert worker == os.getpid() and sent_before == len(known)
            assert skipped == [] and kept == 0
            assert len(set(new)) == len(new) and not set(new) & set(known)
            known += new
            expected = [(no, data_util.tokenize(text, "word"))
                        for no, text in enumerate(TRICKY_LINES * 3, start=1)
                        if first_line_no <= no < first_line_no + len(lines) and text.strip()]
            assert line_numbers.tolist() == [no for no, _ in expected]
            assert lengths.tolist() == [len(tokens) for _, tokens in expected]
            assert [known[i] for i in ids] == [t for _, tokens in expected for t in tokens]
        assert "2008" in known and "check" in known and "\t" in known
        assert "\t" not in [known[i] for i in ids]
        assert "我" in known and "\ufeff我" not in known
    finally:
        data_util._forget_numbering()


@pytest.mark.parametrize("backend", data_util.WORD_BACKENDS)
def test_lines_cut_as_one_text_or_one_by_one_give_the_same_tokens(backend):
    """A chunk's lines are cut as one text joined by "\\n"; where the segmenter would merge a
    joint into another token ("\\r" + "\\n" is one token in both), they are cut line by line."""
    if backend == "rjieba":
        pytest.importorskip("rjieba")
    cut = data_util.segmenter(backend)
    for texts in (TRICKY_LINES, ["北京\r", "", "上海 天津"], ["一行"], []):
        numbering = data_util._first_sight_numbering()
        ids, lengths = data_util._cut_lines_joined(cut, texts, numbering)
        tokens = list(numbering)
        assert [tokens[i] for i in ids] == [t for text in texts for t in cut(text)]
        assert lengths.tolist() == [len(cut(text)) for text in texts]


@pytest.mark.slow
def test_rjieba_backend_matches_jieba_on_the_sample_corpora():
    pytest.importorskip("rjieba")
    from data.prepare import read_entities, read_reviews
    reviews = [text for text, _ in read_reviews()]
    paragraphs = ["".join(words) for words, _ in read_entities()[:1500]]
    # All reviews where jieba and jieba-rs disagree before the fix-up, plus a plain sample.
    tricky = [text for text in reviews if data_util._ASCII_NEXT_TO_SYMBOL.search(text)]
    texts = tricky + reviews[:1000] + paragraphs
    assert len(tricky) > 300
    mismatches = [t for t in texts if data_util.cut_words(
        t, "rjieba") != data_util.cut_words(t, "jieba")]
    assert mismatches == []


def test_gbk_file_gets_a_one_line_error_naming_the_line_and_the_flag(tmp_path):
    path = write(tmp_path / "gbk.txt", "abc __label__x\nplain ascii __label__y\n中文 文本 __label__z\n",
                 encoding="gbk")
    with pytest.raises(data_util.DataError) as error:
        list(data_util.iter_tokenized_lines(path, "space", labelled=True, process_num=1))
    message = str(error.value)
    assert message.startswith(f"{path}:3: cannot decode as utf-8") and "\n" not in message
    assert "--encoding gb18030" in message
    rows = list(data_util.iter_tokenized_lines(path, "space", "gb18030", 1, labelled=True))
    assert rows[2] == (3, ["中文", "文本"], ["z"])


def test_bad_flags_are_named(tmp_path):
    path = write(tmp_path / "c.txt", "a\n")
    with pytest.raises(data_util.DataError, match="--encoding='klingon'"):
        list(data_util.read_lines(path, "klingon"))
    with pytest.raises(data_util.DataError, match="--encoding=utf-16"):
        list(data_util.read_lines(path, "utf-16"))
    with pytest.raises(data_util.DataError, match="--process_num=0"):
        list(data_util.iter_tokenized_lines(path, "space", process_num=0))
    with pytest.raises(data_util.DataError, match="missing.txt: no such file"):
        list(data_util.read_lines(str(tmp_path / "missing.txt")))


# ----------------------------------------------------------------------------- vocabulary & labels
def test_vocabulary_is_deterministic_and_ranked(tmp_path):
    path = write(tmp_path / "c.txt", "b a c\nc b\nd e c b\n[MASK] z\n")
    vocab = data_util.build_vocabulary([path], "space", 9, process_num=1)
    # c and b appear 3 times; a, d, e, z once: ties go by the token string, specials never twice.
    assert vocab.tokens == data_util.SPECIAL_TOKENS + ["b", "c", "a", "d"]
    again = data_util.build_vocabulary([path], "space", 9, process_num=2)
    assert again.tokens == vocab.tokens and again.fingerprint() == vocab.fingerprint()
    assert vocab.encode(["c", "zzz"]) == [6, data_util.UNK_ID] and vocab.id_of(
        "[MASK]") == data_util.MASK_ID


def test_vocabulary_save_load_and_corrupt_files(tmp_path):
    vocab = data_util.Vocabulary(data_util.SPECIAL_TOKENS + ["北京", "天安门"])
    vocab.save(str(tmp_path / "vocab.txt"))
    assert data_util.Vocabulary.load(str(tmp_path / "vocab.txt")).tokens == vocab.tokens
    bad = write(tmp_path / "bad.txt", "北京\n[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(data_util.DataError, match=r"bad\.txt:1: a vocabulary must start with"):
        data_util.Vocabulary.load(bad)
    twice = write(tmp_path / "twice.txt",
                  "\n".join(data_util.SPECIAL_TOKENS + ["a", "b", "a"]) + "\n")
    with pytest.raises(data_util.DataError, match=r"twice\.txt:8: token 'a' appears twice"):
        data_util.Vocabulary.load(twice)
    with pytest.raises(data_util.DataError, match="nope.txt: no such file"):
        data_util.Vocabulary.load(str(tmp_path / "nope.txt"))
    lines = data_util.SPECIAL_TOKENS + ["北京", "a b", "天安门"]
    spaced = write(tmp_path / "spaced.txt", "\n".join(lines) + "\n")
    with pytest.raises(data_util.DataError, match=r"spaced\.txt:7: empty token or token with"):
        data_util.Vocabulary.load(spaced)
    windows = tmp_path / "windows.txt"
    windows.write_bytes(("\ufeff" + "\r\n".join(vocab.tokens) + "\r\n").encode("utf-8"))
    assert data_util.Vocabulary.load(str(windows)).tokens == vocab.tokens
    broken = tmp_path / "broken.txt"
    broken.write_bytes("\n".join(vocab.tokens).encode("utf-8") + b"\n\xff\xfe\n")
    with pytest.raises(data_util.DataError, match=r"broken\.txt:8: cannot decode as utf-8"):
        data_util.Vocabulary.load(str(broken))
    with pytest.raises(data_util.DataError, match="--vocab_size=5"):
        data_util.build_vocabulary([bad], "space", 5)


@pytest.mark.parametrize("extra,problem", [
    (["北京", "a\nb"], "7: empty token or token with whitespace"),
    (["北京", ""], "7: empty token or token with whitespace"),
    (["", "北京"], "6: empty token or token with whitespace"),
    (["北京", "a\u3000b"], "7: empty token or token with whitespace"),
    (["北京", "\x1c"], "7: empty token or token with whitespace"),
    (["北京", "上海", "北京"], "8: token '北京' appears twice"),
    (["北京", "[UNK]"], "7: token '[UNK]' appears twice"),
    (["北京", "上海"], None)])
def test_vocabulary_checks_every_token(extra, problem):
    """The quick check of a valid list and the line by line search agree on what is wrong."""
    tokens = data_util.SPECIAL_TOKENS + extra
    if problem is None:
        assert data_util.Vocabulary(tokens).tokens == tokens
        return
    with pytest.raises(data_util.DataError, match=re.escape(f"<vocabulary>:{problem}")):
        data_util.Vocabulary(tokens)
    assert data_util.Vocabulary(tokens, check=False).tokens == tokens


def test_label_list_by_frequency_then_name(tmp_path):
    path = write(tmp_path / "t.txt", "x __label__b\ny __label__a __label__c\nz __label__c\n"
                 "w __label__b __label__b\nno label here\n")
    labels = data_util.build_label_list(path)
    assert labels == ["b", "c", "a"]
    data_util.save_label_list(labels, str(tmp_path / "labels.txt"))
    assert data_util.load_label_list(str(tmp_path / "labels.txt")) == labels
    write(tmp_path / "dup.txt", "a\nb\na\n")
    with pytest.raises(data_util.DataError, match=r"dup\.txt:3: label 'a' appears twice"):
        data_util.load_label_list(str(tmp_path / "dup.txt"))


# ----------------------------------------------------------------------------- caches
@pytest.fixture
def task(tmp_path):
    files = {"train": write(tmp_path / "train.txt", "我 爱 北京 __label__a\n天安门 很 大 __label__b "
                            "__label__a\n北京 __label__c\n"),
             "valid": write(tmp_path / "valid.txt", "我 爱 上海 __label__a __label__new\n"
                            "北京 北京 北京 北京 __label__other\n")}
    vocab = data_util.build_vocabulary([files["train"]], "space", 100, labelled=True, process_num=1)
    return files, vocab, data_util.build_label_list(files["train"]), str(tmp_path / "cache")


def test_classification_cache_contents(task, capsys):
    files, vocab, labels, cache_dir = task
    path = data_util.load_or_build_classification_cache(files, vocab, labels, 4, "space", cache_dir,
                                                        process_num=1)
    ids, hot = data_util.read_classification_split(path, "train")
    assert ids.dtype == np.int32 and hot.dtype == np.uint8 and labels == ["a", "b", "c"]
    v = vocab.id_of
    assert ids.tolist() == [[data_util.CLS_ID, v("我"), v("爱"), v("北京")],
                            [data_util.CLS_ID, v("天安门"), v("很"), v("大")],
                            [data_util.CLS_ID, v("北京"), data_util.PAD_ID, data_util.PAD_ID]]
    assert hot.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    valid_ids, valid_hot = data_util.read_classification_split(path, "valid")
    assert valid_ids[0].tolist() == [data_util.CLS_ID, v("我"), v("爱"), data_util.UNK_ID]
    assert valid_hot.tolist() == [[1, 0, 0], [0, 0, 0]]  # kept, unknown labels reported
    out = capsys.readouterr()
    assert "2 label(s) not in the training label list, on 2 line(s)" in out.err
    assert "Built classification cache" in out.out
    with h5py.File(path, "r") as h5:
        assert h5.attrs["complete"] and h5.attrs["sequence_length"] == 4
        assert h5.attrs["labels"] == '["a", "b", "c"]' and h5.attrs["tokenize_style"] == "space"
        assert h5["valid/line_numbers"][:].tolist() == [1, 2]
    with pytest.raises(data_util.DataError, match="no split 'test'"):
        data_util.read_classification_split(path, "test")


@pytest.mark.parametrize("style,process_num,numbering_limit",
                         [("word", 1, 1 << 18), ("word", 2, 1 << 18), ("word", 2, 5),
                          ("char", 2, 1 << 18), ("space", 1, 1 << 18)])
def test_labelled_examples_encoded_in_the_workers_are_encode_example(
        tmp_path, monkeypatch, capsys, style, process_num, numbering_limit):
    """Chunks of 2-3 lines, counted and encoded where they are tokenized (a worker's numbering
    started afresh every few tokens): the vocabulary is the one counted line by line, every row
    is `encode_example` of the line's tokens, cut or padded to the length; a line with labels
    but no text keeps [CLS] alone; label-less lines warn."""
    monkeypatch.setattr(data_util, "RAW_CHUNK_BYTES", 100)
    monkeypatch.setattr(data_util, "NUMBERING_LIMIT", numbering_limit)
    texts = [line for line in TRICKY_LINES * 3 if line.strip()]
    lines = [f"{text} __label__{'ab'[i % 2]}" for i, text in enumerate(texts)]
    lines[3:3] = ["", "没有 标签 的 一行", "__label__b", "\u3000 __label__a"]
    path = write(tmp_path / "train.txt", "\ufeff" + "\r\n".join(lines) + "\n")
    vocab = data_util.build_vocabulary([path], style, 30, labelled=True, process_num=process_num)
    by_line = list(data_util.iter_tokenized_lines(path, style, process_num=1, labelled=True))
    counted = collections.Counter(token for _, tokens, _ in by_line for token in tokens)
    assert vocab.tokens == data_util.vocabulary_from_counts(counted, 30, [path]).tokens
    chunks = list(data_util.encoded_labelled_chunks(path, vocab, 6, style,
                                                    process_num=process_num))
    assert len(chunks) > 3
    line_numbers = np.concatenate([numbers for numbers, _, _ in chunks])
    ids = np.concatenate([rows for _, rows, _ in chunks])
    expected = [(no, data_util.encode_example(tokens, vocab, 6), labels)
                for no, tokens, labels in by_line]
    assert line_numbers.tolist() == [no for no, _, _ in expected]
    assert ids.tolist() == [row for _, row, _ in expected]
    assert [labels for _, _, chunk in chunks for labels in chunk] == [
        labels for _, _, labels in expected]
    assert ids[line_numbers.tolist().index(6)].tolist() == [data_util.CLS_ID] + [
        data_util.PAD_ID] * 5
    assert f"{path}:5: no __label__" in capsys.readouterr().err


def test_two_labelled_encodings_at_once_keep_their_own_vocabularies(tmp_path, monkeypatch):
    """Without a pool the vocabulary travels with the call, not in a module global."""
    monkeypatch.setattr(data_util, "RAW_CHUNK_BYTES", 40)  # a few lines a chunk
    path = write(tmp_path / "t.txt", "".join(f"甲 乙{i} __label__a\n" for i in range(9)))
    small = data_util.build_vocabulary([path], "space", 7, labelled=True, process_num=1)
    large = data_util.build_vocabulary([path], "space", 50, labelled=True, process_num=1)

    def rows(vocab, chunks):
        return np.concatenate([ids for _, ids, _ in chunks]).tolist()

    alone = rows(small, data_util.encoded_labelled_chunks(path, small, 4, "space", process_num=1))
    first = data_util.encoded_labelled_chunks(path, small, 4, "space", process_num=1)
    head = next(first)
    other = rows(large, data_util.encoded_labelled_chunks(path, large, 4, "space", process_num=1))
    assert rows(small, [head, *first]) == alone and other != alone


def test_a_pool_loads_the_segmenter_it_will_use(tmp_path, monkeypatch):
    """The parent loads the dictionary of WORD_BACKEND's segmenter before it forks."""
    monkeypatch.setattr(data_util, "_word_backend", "jieba")
    monkeypatch.setattr(data_util, "RAW_CHUNK_BYTES", 200)
    loaded, real = [], data_util.segmenter
    monkeypatch.setattr(data_util, "segmenter", lambda backend: loaded.append(backend) or
                        real(backend))
    path = write(tmp_path / "c.txt", "我们 今天 去 北京 __label__a\n" * 40)
    data_util.build_vocabulary([path], "word", 20, labelled=True, process_num=2)
    assert loaded and set(loaded) == {"jieba"}


@pytest.mark.parametrize("text", ["", "\n  \n\n"])
@pytest.mark.parametrize("process_num", [1, 2])
def test_a_vocabulary_of_no_text_is_a_one_line_error(tmp_path, text, process_num):
    path = write(tmp_path / "c.txt", text)
    with pytest.raises(data_util.DataError, match=r"c\.txt: no tokens found"):
        data_util.build_vocabulary([path], "word", 10, process_num=process_num)


def test_vocabulary_from_counts_checks_the_tokens_it_is_given():
    with pytest.raises(data_util.DataError, match="empty token or token with whitespace"):
        data_util.vocabulary_from_counts({"北京": 3, "a b": 2}, 10, ["counts"])


def test_a_narrower_read_equals_a_cache_built_at_that_length(task):
    files, vocab, labels, cache_dir = task

    def build(length):
        return data_util.load_or_build_classification_cache(files, vocab, labels, length,
                                                            "space", cache_dir, process_num=1)

    wide, narrow = build(8), build(3)
    assert data_util.classification_lengths(wide, "train").tolist() == [4, 4, 2]
    assert data_util.classification_lengths(wide, "valid").tolist() == [4, 5]
    for split in files:
        cut = data_util.read_classification_split(wide, split, 3)
        whole = data_util.read_classification_split(narrow, split)
        assert all(np.array_equal(a, b) for a, b in zip(cut, whole))


def test_cache_is_reused_and_each_cause_invalidates_it(task, capsys):
    files, vocab, labels, cache_dir = task

    def build(files=files, vocab=vocab, labels=labels, length=8, style="space"):
        return data_util.load_or_build_classification_cache(files, vocab, labels, length, style,
                                                            cache_dir, process_num=1)

    first = build()
    capsys.readouterr()
    assert build() == first and "Reusing" in capsys.readouterr().out
    changed = {**files, "valid": write(os.path.join(cache_dir, "..", "valid2.txt"),
                                       open(files["valid"], encoding="utf-8").read()[:-2] + "x\n")}
    bigger = data_util.Vocabulary(vocab.tokens + ["新词"])
    others = [build(files=changed), build(length=9), build(vocab=bigger),
              build(labels=labels[::-1]), build(style="char")]
    assert len({first, *others}) == 6
    assert data_util.open_valid_cache(first, data_util.classification_fingerprint(
        files, vocab, labels, 8, "space"))


def test_broken_cache_files_are_not_trusted(tmp_path, capsys):
    garbage = write(tmp_path / "garbage.h5", "not an hdf5 file")
    assert not data_util.open_valid_cache(garbage, "f") and not os.path.exists(garbage)
    unfinished = str(tmp_path / "unfinished.h5")
    with h5py.File(unfinished, "w") as h5:
        h5.attrs["fingerprint"] = "f"
    assert not data_util.open_valid_cache(unfinished, "f")
    data_util.write_hdf5_atomically(str(tmp_path / "ok.h5"),
                                    lambda h5: h5.create_dataset("x", data=[1]), "f")
    assert data_util.open_valid_cache(str(tmp_path / "ok.h5"), "f")
    assert not data_util.open_valid_cache(str(tmp_path / "ok.h5"), "g")  # foreign: deleted too
    assert "incomplete or foreign cache" in capsys.readouterr().err

    def fail(h5):
        h5.create_dataset("x", data=[1])
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        data_util.write_hdf5_atomically(str(tmp_path / "failed.h5"), fail, "f")
    assert os.listdir(tmp_path) == []  # no temporary left behind


# ----------------------------------------------------------------------------- atomic writes
def write_either(path: str, failure: BaseException | None = None) -> None:
    """An HDF5 cache (path ending in .h5) or a text file, raising `failure` half-way through."""
    def fail() -> None:
        if failure is not None:
            raise failure

    def fill_cache(h5: h5py.File) -> None:
        h5.create_dataset("x", data=[1])
        fail()

    def fill_text(temporary: str) -> None:
        data_util.write_utf8(temporary, "half")
        fail()

    if path.endswith(".h5"):
        data_util.write_hdf5_atomically(path, fill_cache, "f")
    else:
        data_util.write_file_atomically(path, fill_text)


BOTH = pytest.mark.parametrize("name", ["cache.h5", "vocab.txt"])


@BOTH
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, name):
    path = str(tmp_path / name)
    write_either(path)
    before = open(path, "rb").read()
    with pytest.raises(KeyboardInterrupt):
        write_either(path, KeyboardInterrupt())
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == [name]


@BOTH
def test_a_dead_writers_leftover_is_swept_and_a_live_ones_kept(tmp_path, name, dead_pid):
    dead = tmp_path / f".tmp-{dead_pid}-{name}"
    alive = tmp_path / f".tmp-1-{name}"  # PID 1 lives as long as the machine
    dead.write_bytes(b"half")
    alive.write_bytes(b"being written")
    write_either(str(tmp_path / name))
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, name])


@BOTH
@pytest.mark.parametrize("failure, error, says", [
    (OSError(errno.ENOSPC, "No space left on device"), data_util.DiskFullError,
     "no space left on the device; free disk space, then rerun the same command"),
    (PermissionError(errno.EACCES, "Permission denied"), data_util.DataError,
     r"cannot write \(Permission denied\); fix the permissions, then rerun the same command"),
])
def test_a_full_disk_or_a_refused_write_is_one_line_naming_the_file(tmp_path, name, failure,
                                                                    error, says):
    path = str(tmp_path / name)
    with pytest.raises(error, match=f"^{re.escape(path)}: {says}") as raised:
        write_either(path, failure)
    assert ".tmp-" not in str(raised.value) and "\n" not in str(raised.value)
    assert ("--cache_dir" in str(raised.value)) == name.endswith(".h5")
    assert os.listdir(tmp_path) == []


@BOTH
def test_other_write_errors_pass_through_whole(tmp_path, name):
    failure = OSError(errno.ENOMEM, "Cannot allocate memory")  # not the file's fault
    with pytest.raises(OSError) as raised:
        write_either(str(tmp_path / name), failure)
    assert raised.value is failure and os.listdir(tmp_path) == []


def test_the_free_space_check_names_the_file_not_its_temporary(tmp_path):
    path = str(tmp_path / "tokens.h5")
    with pytest.raises(data_util.DiskFullError, match=f"^{re.escape(path)}: not enough disk"):
        data_util.ensure_free_space(data_util.temporary_name(path), 1 << 60)


class Unraisable:
    """Raises from __del__, as HDF5 objects freed after a failed write do."""

    def __init__(self, message: str):
        self.message = message

    def __del__(self):
        raise RuntimeError(self.message)


def test_hdf5_echoes_of_a_failed_write_stay_quiet(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(
        str(unraisable.exc_value)))

    def echo_then_fail(h5: h5py.File) -> None:
        Unraisable("Can't write data (file write failed: errno = 28)")
        Unraisable("something else")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(data_util.DiskFullError):
        data_util.write_hdf5_atomically(str(tmp_path / "c.h5"), echo_then_fail, "f")
    assert seen == ["something else"]


KILLED_BUILD = """
import sys
sys.path.insert(0, sys.argv[1])
import data_util_hdf5 as data_util
files = {"train": sys.argv[2]}
vocab = data_util.Vocabulary.load(sys.argv[3])
data_util.load_or_build_classification_cache(files, vocab, ["l0", "l1", "l2"], 32, "space",
                                             sys.argv[4], process_num=1)
"""


@pytest.mark.slow
def test_build_killed_mid_write_is_rebuilt(tmp_path, capsys):
    train = tmp_path / "train.txt"
    with open(train, "w", encoding="utf-8") as f:
        for i in range(60_000):
            f.write(" ".join(f"w{(i * 7 + k) % 500}" for k in range(20)) + f" __label__l{i % 3}\n")
    vocab = data_util.build_vocabulary([str(train)], "space", 300, labelled=True, process_num=1)
    vocab.save(str(tmp_path / "vocab.txt"))
    cache_dir = tmp_path / "cache"
    child = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, ROOT, str(train),
                              str(tmp_path / "vocab.txt"), str(cache_dir)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    temporary = None
    deadline = time.monotonic() + 60
    while temporary is None and time.monotonic() < deadline and child.poll() is None:
        names = os.listdir(cache_dir) if cache_dir.exists() else []
        temporary = next((n for n in names if n.startswith(f".tmp-{child.pid}-")), None)
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert temporary is not None, "the child never started writing"
    assert os.listdir(cache_dir) == [temporary]  # nothing a later run would trust
    path = data_util.load_or_build_classification_cache({"train": str(train)}, vocab,
                                                        ["l0", "l1", "l2"], 32, "space",
                                                        str(cache_dir), process_num=1)
    assert "Built classification cache" in capsys.readouterr().out
    assert os.listdir(cache_dir) == [os.path.basename(path)]  # the orphan was cleaned up
    ids, hot = data_util.read_classification_split(path, "train")
    assert ids.shape == (60_000, 32) and hot.sum() == 60_000


def test_token_cache_round_trip(tmp_path):
    path = write(tmp_path / "c.txt", "我 爱 北京\n\n天安门\n")
    vocab = data_util.build_vocabulary([path], "space", 50)
    cache = data_util.load_or_build_token_cache(path, vocab, "space", str(tmp_path / "cache"))
    ids, offsets = data_util.read_token_cache(cache)
    assert offsets.tolist() == [0, 3, 4]
    assert ids.tolist() == vocab.encode(["我", "爱", "北京", "天安门"])
    assert data_util.load_or_build_token_cache(
        path, vocab, "space", str(tmp_path / "cache")) == cache


def test_encode_example_truncates_and_pads():
    vocab = data_util.Vocabulary(data_util.SPECIAL_TOKENS + ["a", "b"])
    assert data_util.encode_example(["a", "b", "a"], vocab, 3) == [data_util.CLS_ID, 5, 6]
    assert data_util.encode_example(["b", "zz"], vocab, 5) == [data_util.CLS_ID, 6,
                                                               data_util.UNK_ID, data_util.PAD_ID,
                                                               data_util.PAD_ID]
    with pytest.raises(data_util.DataError, match="--sequence_length=1"):
        data_util.check_minimum_sequence_length(1)


def test_vocabulary_cache_is_reused_until_an_input_changes(tmp_path, capsys):
    corpus = write(tmp_path / "corpus.txt", "我 爱 北京\n北京 很 大\n")
    cache_dir = str(tmp_path / "cache")
    first = data_util.load_or_build_vocabulary([corpus], "space", 50, cache_dir, process_num=1)
    assert "vocabulary:" in capsys.readouterr().out
    again = data_util.load_or_build_vocabulary([corpus], "space", 50, cache_dir, process_num=1)
    assert again.tokens == first.tokens and "vocabulary:" not in capsys.readouterr().out
    data_util.load_or_build_vocabulary([corpus], "char", 50, cache_dir, process_num=1)
    data_util.load_or_build_vocabulary([corpus], "space", 7, cache_dir, process_num=1)
    write(tmp_path / "corpus.txt", "我 爱 上海\n")
    changed = data_util.load_or_build_vocabulary([corpus], "space", 50, cache_dir, process_num=1)
    assert "上海" in changed.tokens and "上海" not in first.tokens
    assert len(os.listdir(cache_dir)) == 4


def test_raw_text_with_space_style_gets_a_warning(tmp_path, capsys):
    raw = write(tmp_path / "raw.txt", "今天天气很好我们去公园散步吧\n这家店的菜非常好吃下次还来\n")
    segmented = write(tmp_path / "seg.txt", "今天 天气 很 好 __label__a\n菜 好吃 __label__b\n")
    assert data_util.warn_if_unsegmented(raw, "space")
    assert f"{raw}: 2 of the first 2 lines hold no spaces" in capsys.readouterr().err
    assert not data_util.warn_if_unsegmented(raw, "word")
    assert not data_util.warn_if_unsegmented(segmented, "space", labelled=True)


def test_copy_first_lines_copies_the_first_lines(tmp_path):
    source = tmp_path / "a.txt"
    source.write_text("1\n2\n3\n", encoding="utf-8")
    target = data_util.copy_first_lines(str(source), 2, str(tmp_path / "sub" / "b.txt"))
    assert open(target, encoding="utf-8").read() == "1\n2\n"


def test_copy_first_lines_keeps_the_encoding_and_names_a_bad_line(tmp_path):
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("北京 __label__a\n上海 __label__b\n广州 __label__c\n".encode("gb18030"))
    target = data_util.copy_first_lines(str(gbk), 2, str(tmp_path / "head.txt"), "gb18030")
    assert [t for _, t in data_util.read_lines(target, "gb18030")] == ["北京 __label__a",
                                                                       "上海 __label__b"]
    with pytest.raises(data_util.DataError,
                       match=r"gbk.txt:1: cannot decode as utf-8.*--encoding gb18030"):
        data_util.copy_first_lines(str(gbk), 2, str(tmp_path / "head2.txt"))
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]


def test_vocabulary_ranks_by_count_then_string_at_every_size():
    """The partial sort keeps exactly what a full sort by (-count, token) would, in that order,
    whether the cut falls inside a run of equal counts or beyond the last token."""
    rng = np.random.default_rng(5)
    counts = {f"t{i}": int(c) for i, c in enumerate(rng.integers(0, 5, 300))}
    counts["[MASK]"] = 99  # a literal special token in the text is not ranked twice
    ranked = [t for t, c in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
              if c > 0 and t != "[MASK]"]
    for size in (6, 7, 50, 123, 1000):
        vocab = data_util.vocabulary_from_counts(counts, size, ["x"])
        assert vocab.tokens == data_util.SPECIAL_TOKENS + ranked[:size - 5]
