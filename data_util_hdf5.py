"""Text -> tokens -> ids -> HDF5 caches, shared by pretraining, fine-tuning and prediction.

Input formats
  labelled (fine-tuning): one example a line, text then labels: ``w1 w2 w3 __label__a __label__b``
  unlabelled (pretraining): free text, one document a line.
Files are read as ``--encoding`` (utf-8 by default); a UTF-8 BOM and CRLF line ends are accepted.

Tokenization styles (``--tokenize_style``)
  word   Chinese word segmentation with jieba. When the ``rjieba`` package (a Rust port of jieba)
         is installed it is used instead, ~10x faster, with a fix-up that makes its tokens identical
         to ``jieba.lcut`` (see ``cut_words``).
  char   one token per character, whitespace dropped.
  space  the text is already segmented: tokens are separated by whitespace.

Vocabulary: ``vocab.txt``, one token a line, the line number (from 0) is the id; the first five
lines are always [PAD] [UNK] [CLS] [SEP] [MASK]. Labels: ``labels.txt``, one label a line.

Classification cache (HDF5, one file per fingerprint of sources, tokenizer, vocabulary, labels and
sequence length, named ``classification-<fingerprint>.h5``):
  <split>/input_ids     int32 [N, T]  [CLS] + token ids, truncated / padded with [PAD] to T
  <split>/labels        uint8 [N, L]  multi-hot over the label list
  <split>/line_numbers  int64 [N]     source line of each example (1-based)
  root attrs: fingerprint, complete, format_version, labels (JSON list), sequence_length,
              tokenize_style, vocab_size, vocab_fingerprint; each split group: source, num_examples.
Token cache (``load_or_build_token_cache``, unlabelled text kept as ragged rows):
  input_ids int32 [total tokens], offsets int64 [N + 1], line_numbers int64 [N];
  row i is input_ids[offsets[i]:offsets[i + 1]].
Every cache is written under a temporary name and renamed into place with attrs ``complete=True``
and its ``fingerprint`` set last, so a run killed mid-write never leaves a file a later run trusts.
"""
from __future__ import annotations

import codecs
import collections
import contextlib
import errno
import functools
import glob
import hashlib
import importlib.util
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from typing import Callable, Iterable, Iterator

import h5py
import numpy as np

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]
_SPECIAL_SET = frozenset(SPECIAL_TOKENS)
TOKENIZE_STYLES = ("word", "char", "space")
WORD_BACKENDS = ("rjieba", "jieba")
LABEL_PREFIX = "__label__"
FORMAT_VERSION = 1
DEFAULT_CHUNK_LINES = 2000
# A chunk also ends at this many characters, so a file of very long lines stays bounded in memory.
CHUNK_CHARS = 4_000_000
# Chunks read as bytes and decoded where they are tokenized (a worker) hold about this many.
RAW_CHUNK_BYTES = 1 << 19  # about 2,000 lines of the sample corpus
MAX_LISTED_WARNINGS = 10


class DataError(ValueError):
    """A problem with the user's data or flags, in one line: ``where: what is wrong; what to do``.

    The scripts print it without a traceback.
    """


class DiskFullError(DataError):
    """A write failed for want of space. The scripts print it and exit at once: HDF5 objects
    left over from the failed write can crash the interpreter's normal shutdown."""


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or an error it arose from, reports a full disk (HDF5 wraps ENOSPC in a
    RuntimeError whose text carries it, and its clean-up may raise further errors on top)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


# Kept free beyond what a write needs: HDF5 adds metadata, and once it meets a full disk it
# reports the failure from every object it frees (and can crash the interpreter), so a write
# that might not fit is refused before it starts.
FREE_SPACE_MARGIN = 4 << 20


def ensure_free_space(path: str, needed_bytes: int) -> None:
    """Raise DiskFullError unless the file system holding `path` has room for `needed_bytes`
    plus FREE_SPACE_MARGIN."""
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    if free < needed_bytes + FREE_SPACE_MARGIN:
        path = _target_of(path)  # HDF5 knows its file by the temporary name
        raise DiskFullError(f"{path}: not enough disk space to write it ({free >> 20} MiB free, "
                            f"about {(needed_bytes + FREE_SPACE_MARGIN) >> 20} MiB needed); free "
                            "some space (or point the directory flag at a larger disk), then "
                            "rerun the same command")


@contextlib.contextmanager
def quiet_failed_hdf5_writes():
    """HDF5 repeats a failed write's error from every object it frees on the way out, each as
    an "Exception ignored" traceback; those echoes would bury the one line the user needs."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not is_disk_full(unraisable.exc_value) and \
                "file write failed" not in str(unraisable.exc_value):
            previous(unraisable)
    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


# ----------------------------------------------------------------------------- writing files
TEMPORARY_PREFIX = ".tmp-"
_TEMPORARY = re.compile(r"\.tmp-(\d+)-(.+)")
RERUN = "rerun the same command"
# A write refused for want of rights, which the user can fix. Any other OSError met while
# writing (a failed fork in the tokenizer pool, say) is left whole: "cannot write" would mislead.
_REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS)


def temporary_name(path: str) -> str:
    """``dir/.tmp-<pid>-name`` beside `path`: on its file system, so the rename is atomic; the
    PID tells a later writer whether this one still lives; and the name keeps its ending, as
    Keras only saves weights to names ending in ``.weights.h5``."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f"{TEMPORARY_PREFIX}{os.getpid()}-{name}")


def _target_of(path: str) -> str:
    """The file a temporary name stands for (`path` itself otherwise): the name the user knows.
    A writer handed a temporary may nest one more level, hence the loop."""
    directory, name = os.path.split(path)
    while match := _TEMPORARY.fullmatch(name):
        name = match[2]
    return os.path.join(directory, name)


def write_file_atomically(path: str, write: Callable[[str], None], then: str = RERUN) -> None:
    """Call `write(temporary)` for a file beside `path`, flush it to disk and rename it to
    `path`: whenever the process dies, `path` holds its old content or all of the new one.

    A killed writer's leftover for `path` is removed first. On failure the temporary is removed
    and `path` is untouched; a full disk raises DiskFullError and a refused write DataError, one
    line naming `path` and ending in `then` (the user's next step).
    """
    directory = os.path.dirname(os.path.abspath(path))
    temporary = temporary_name(path)
    with _undone_on_failure(path, temporary, then):
        os.makedirs(directory, exist_ok=True)
        remove_dead_temporaries(directory, os.path.basename(path))
        write(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
    _fsync_directory(directory)


def write_directory_atomically(path: str, write: Callable[[str], None],
                               then: str = RERUN) -> None:
    """`write_file_atomically` for a directory (a SavedModel export): `write(temporary)` fills
    a new directory beside `path`, which then takes its place. A directory cannot be renamed
    over a full one, so an older `path` is moved aside first and removed after the swap."""
    path = os.path.normpath(path)
    directory, name = os.path.split(os.path.abspath(path))
    temporary, old = temporary_name(path), temporary_name(path + "-replaced")
    with _undone_on_failure(path, temporary, then):
        os.makedirs(directory, exist_ok=True)
        for leftover in (name, name + "-replaced"):
            remove_dead_temporaries(directory, leftover)
        write(temporary)
        _fsync_tree(temporary)
        _swap_in(temporary, path, old)
    _fsync_directory(directory)
    _remove_file_or_tree(old)


def _swap_in(temporary: str, path: str, old: str) -> None:
    if os.path.lexists(path):
        os.replace(path, old)
    try:
        os.replace(temporary, path)
    except BaseException:
        if os.path.lexists(old):  # the swap failed half-way: the previous one goes back
            os.replace(old, path)
        raise


@contextlib.contextmanager
def _undone_on_failure(path: str, temporary: str, then: str):
    with quiet_failed_hdf5_writes():
        try:
            yield
        except BaseException as error:
            _remove_file_or_tree(temporary)
            explained = _write_error(error, _target_of(path), then)
            if explained is None:
                raise
            raise explained from None


def _write_error(error: BaseException, path: str, then: str) -> DataError | None:
    """The one-line error the scripts print for a failed write, or None to let `error` through
    (a DataError already says what to do)."""
    if isinstance(error, DataError):
        return None
    if is_disk_full(error):
        return DiskFullError(f"{path}: no space left on the device; free disk space, then {then}")
    if isinstance(error, OSError) and error.errno in _REFUSED:
        # os.strerror, not the error's text: h5py's names the temporary file
        return DataError(f"{path}: cannot write ({os.strerror(error.errno)}); fix the "
                         f"permissions, then {then}")
    return None


def remove_dead_temporaries(directory: str, name: str | None = None) -> int:
    """Remove the temporary files and directories that killed writers left in `directory`
    (only those standing for `name`, when given); returns how many. A live writer's stay."""
    removed = 0
    for path in glob.glob(os.path.join(glob.escape(directory), TEMPORARY_PREFIX + "*")):
        match = _TEMPORARY.fullmatch(os.path.basename(path))
        if match and name in (None, match[2]) and not process_alive(int(match[1])):
            _remove_file_or_tree(path)
            removed += 1
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_directory(directory: str) -> None:
    """Make a rename inside `directory` survive a power cut. Some file systems refuse to sync a
    directory; the rename has happened by then, so that is no reason to fail the write."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: str) -> None:
    for directory, _, names in os.walk(root):
        for name in names:
            _fsync(os.path.join(directory, name))
        _fsync_directory(directory)


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _remove_file_or_tree(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        remove_quietly(path)


def write_text_atomically(path: str, text: str, then: str = RERUN) -> None:
    """`text` to `path` through `write_file_atomically`, as UTF-8 with "\\n" line ends."""
    write_file_atomically(path, lambda temporary: write_utf8(temporary, text), then)


def write_utf8(path: str, text: str) -> None:
    """Write `text` as UTF-8 with "\\n" line ends; a `write` for `write_file_atomically`."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


# ----------------------------------------------------------------------------- tokenization
_word_backend: str | None = None
# jieba's HMM fallback splits ASCII runs like "2008-6-1" at every symbol; jieba-rs keeps them whole.
_ASCII_NEXT_TO_SYMBOL = re.compile(r"[A-Za-z0-9][+#&._%\-]|[+#&._%\-][A-Za-z0-9]")
_ASCII_RUN = re.compile(r"[A-Za-z0-9+#&._%\-]+")
_JIEBA_HMM_SKIP = re.compile(r"([A-Za-z0-9]+(?:\.\d+)?%?)")
_SPACE_BUT_NEWLINE = re.compile(r"[^\S\n]")  # \s is what str.isspace() and str.split() see


def word_backend() -> str:
    """The segmenter behind ``word`` tokens: "rjieba" when installed, else "jieba".

    Set the environment variable ``WORD_BACKEND=jieba`` to force plain jieba.
    """
    global _word_backend
    if _word_backend is None:
        wanted = os.environ.get("WORD_BACKEND", "")
        if wanted and wanted not in WORD_BACKENDS:
            raise DataError(f"WORD_BACKEND={wanted!r} is unknown; use one of "
                            f"{', '.join(WORD_BACKENDS)}")
        _word_backend = wanted or ("rjieba" if _rjieba_installed() else "jieba")
    return _word_backend


def _rjieba_installed() -> bool:
    # find_spec, not import: reusing a cache must not pay for loading the segmenter.
    return importlib.util.find_spec("rjieba") is not None


def cut_words(text: str, backend: str | None = None) -> list[str]:
    """Segment `text` into words exactly as ``jieba.lcut(text)`` does (whitespace tokens included).

    With backend "rjieba", tokens that jieba-rs keeps whole but jieba splits (ASCII runs joined by
    ``- _ . + # & %`` that are not dictionary words) are re-split with jieba's own rule.
    """
    backend = backend or word_backend()
    tokens = segmenter(backend)(text)
    if backend == "jieba" or not _ASCII_NEXT_TO_SYMBOL.search(text):
        return tokens
    return [piece for token in tokens for piece in _resplit_like_jieba(token)]


def segmenter(backend: str) -> Callable[[str], list[str]]:
    """The backend's own cut (text -> tokens), before the fix-up that `cut_words` applies."""
    if backend == "jieba":
        import jieba
        return jieba.lcut
    import rjieba
    return rjieba.cut


def _resplit_like_jieba(token: str) -> list[str]:
    if len(token) < 2 or token.isalnum() or not _ASCII_RUN.fullmatch(token):
        return [token]
    import rjieba
    if rjieba.has_word(token):
        return [token]
    return [piece for piece in _JIEBA_HMM_SKIP.split(token) if piece]


def _word_pieces(token: str, backend: str) -> list[str]:
    """What `tokenize(.., "word")` makes of one segmenter token: [] for whitespace."""
    if backend == "jieba":
        return token.split()
    return [word for piece in _resplit_like_jieba(token) for word in piece.split()]


def tokenize(text: str, style: str) -> list[str]:
    """Tokens of `text` in `style` ("word", "char" or "space"); never returns whitespace tokens."""
    if style == "space":
        return text.split()
    if style == "char":
        return list("".join(text.split()))
    if style == "word":
        # Joining then splitting drops whitespace tokens in C rather than in a Python loop.
        return " ".join(cut_words(text)).split()
    raise DataError(f"--tokenize_style={style!r} is unknown; use one of "
                    f"{', '.join(TOKENIZE_STYLES)}")


def _check_style(style: str) -> None:
    if style not in TOKENIZE_STYLES:
        tokenize("", style)


# ----------------------------------------------------------------------------- reading
def parse_label_line(line: str) -> tuple[str, list[str]]:
    """Split ``text __label__a __label__b`` into ("text", ["a", "b"]).

    As in fastText, every whitespace-separated token that starts with ``__label__`` is a label,
    wherever it stands (``__label__a some text`` works too); the other tokens, in order, are
    the text. Empty labels are ignored and repeats kept once.
    """
    if LABEL_PREFIX not in line:
        return line.strip(), []
    words, labels = [], []
    for token in line.split():
        if token.startswith(LABEL_PREFIX):
            labels.append(token[len(LABEL_PREFIX):])
        else:
            words.append(token)
    return " ".join(words), list(dict.fromkeys(label for label in labels if label))


def check_encoding(encoding: str) -> None:
    """Raise DataError unless `encoding` is a known codec that writes "\\n" as the byte 0x0a."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"--encoding={encoding!r} is not a known text encoding; use e.g. utf-8 "
                        "or gb18030") from None
    if "\n".encode(encoding) != b"\n":
        raise DataError(f"--encoding={encoding}: files are read line by line, which needs an "
                        "ASCII-compatible encoding; convert the file to utf-8 first")


def copy_first_lines(source: str, num_lines: int, target: str, encoding: str = "utf-8") -> str:
    """Copy the first `num_lines` lines of `source` to `target` (test mode's small slice), in the
    source's own encoding so that later reads with the same encoding see the same text."""
    def write(temporary: str) -> None:
        with open(temporary, "w", encoding=encoding, newline="\n") as copy:
            for line_no, line in read_lines(source, encoding):
                if line_no > num_lines:
                    break
                copy.write(line + "\n")

    write_file_atomically(target, write)
    return target


def read_lines(path: str, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """Yield (line number from 1, text) without the line end; streams, so any file size is fine."""
    check_encoding(encoding)
    with _open_binary(path) as f:
        yield from decode_lines(f, path, encoding)


def decode_lines(stream, name: str, encoding: str = "utf-8",
                 first_line_no: int = 1) -> Iterator[tuple[int, str]]:
    """`read_lines` for an open binary stream (stdin, say) called `name` in error messages, or
    for lines as bytes from `first_line_no` on."""
    for line_no, raw in enumerate(stream, start=first_line_no):
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as error:
            raise DataError(f"{name}:{line_no}: cannot decode as {encoding} (bad byte at "
                            f"column {error.start + 1}); pass --encoding gb18030 for "
                            "GBK/GB2312 files, or the file's real encoding") from None
        if line_no == 1 and text.startswith("\ufeff"):
            text = text[1:]
        yield line_no, text.rstrip("\r\n")


def _open_binary(path: str):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; check the path flag") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory; give a text file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied; make the file readable") from None


def check_readable(path: str, what: str) -> None:
    """Raise DataError (naming `what`, e.g. 'the train data file') unless `path` can be read."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file ({what}); check the path flag")
    _open_binary(path).close()


def _read_chunks(path: str, encoding: str, chunk_lines: int) -> Iterator[list[tuple[int, str]]]:
    chunk, chars = [], 0
    for item in read_lines(path, encoding):
        chunk.append(item)
        chars += len(item[1])
        if len(chunk) >= chunk_lines or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _read_raw_chunks(path: str, chunk_bytes: int) -> Iterator[tuple[int, list[bytes]]]:
    """(number of the first line, whole lines as bytes) of about `chunk_bytes` at a time: read
    in C, and decoded by `_decode_chunk` where the chunk is tokenized."""
    with _open_binary(path) as f:
        line_no = 1
        while lines := f.readlines(chunk_bytes):
            yield line_no, lines
            line_no += len(lines)


def _decode_chunk(path: str, encoding: str, first_line_no: int,
                  raw_lines: list[bytes]) -> list[tuple[int, str]]:
    """What `read_lines` gives for these lines of `path`."""
    try:
        texts = [raw.decode(encoding).rstrip("\r\n") for raw in raw_lines]
    except UnicodeDecodeError:  # the line by line reader names the line
        return list(decode_lines(raw_lines, path, encoding, first_line_no))
    if first_line_no == 1 and texts and texts[0].startswith("\ufeff"):
        texts[0] = texts[0][1:]
    return list(zip(itertools.count(first_line_no), texts))


# A chunk's result: (line_no, tokens, labels); tokens None marks a labelled line without a label.
def _tokenize_chunk(style: str, labelled: bool, backend: str,
                    lines: list[tuple[int, str]]) -> list[tuple]:
    global _word_backend
    _word_backend = backend  # spawn/forkserver workers do not inherit the parent's choice
    out = []
    for line_no, text in lines:
        if not text.strip():
            continue
        if not labelled:
            out.append((line_no, tokenize(text, style), None))
            continue
        body, labels = parse_label_line(text)
        out.append((line_no, tokenize(body, style), labels) if labels else (line_no, None, None))
    return out


def _tokenize_chunk_packed(*args) -> list[tuple]:
    """Pool-side version: tokens go back space-joined, which pickles several times faster."""
    return [(no, None if tokens is None else " ".join(tokens), labels)
            for no, tokens, labels in _tokenize_chunk(*args)]


class _ChunkNumbering:
    """A tokenizing worker's numbering of the tokens of one run, kept from chunk to chunk, so a
    token crosses to the parent once (with the chunk where the worker first met it) instead of
    once per chunk: the parent's share of the work then shrinks with the number of chunks."""

    def __init__(self, run: str):
        self.run, self.ids, self.sent = run, _first_sight_numbering(), 0
        self.replaced: dict[int, list[int]] = {}  # `word`: what tokenize() makes of odd tokens
        self.vocabulary_ids = np.zeros(0, np.int32)  # a labelled run's: number -> vocabulary id

    def new_tokens(self) -> tuple[int, list[str]]:
        """(how many tokens were sent before, the tokens numbered since), now marked as sent."""
        first, self.sent = self.sent, len(self.ids)
        return first, _numbered_since(self.ids, first)


_numbering: _ChunkNumbering | None = None
# A worker that has numbered this many tokens starts afresh, so its memory stays bounded (about
# 40 MB a worker); a fresh start only sends the frequent tokens to the parent again.
NUMBERING_LIMIT = 1 << 18


def _numbering_for(run: str) -> _ChunkNumbering:
    global _numbering
    if _numbering is None or _numbering.run != run or len(_numbering.ids) > NUMBERING_LIMIT:
        _numbering = _ChunkNumbering(run)
    return _numbering


def _forget_numbering() -> None:
    global _numbering
    _numbering = None


def _encode_chunk(style: str, path: str, encoding: str, run: str, backend: str, labelled: bool,
                  chunk: tuple[int, list[bytes]]) -> tuple:
    """A chunk of `_read_raw_chunks` decoded, tokenized and numbered in the worker: (worker,
    tokens it sent before, tokens new to it, line numbers int64 [n], lengths int64 [n], ids
    int32 [tokens], numbers of the lines without a label, how many lines had one), the ids in
    the worker's numbering of run `run`. A `labelled` chunk gives the tokens of its labelled
    lines' texts (the last two items are [] and 0 otherwise). The arrays pickle in one piece
    and every per-token step stays in the workers."""
    lines, skipped = _decode_chunk(path, encoding, *chunk), []
    if labelled:
        bodies, skipped = _labelled_bodies(lines)
        lines = [(line_no, body) for line_no, body, _ in bodies]
    numbering = _numbering_for(run)
    if style == "word":
        line_numbers, lengths, ids = _encode_word_chunk(backend, lines, numbering)
    else:
        line_numbers, lengths, tokens = [], [], []
        for line_no, line_tokens, _ in _tokenize_chunk(style, False, backend, lines):
            line_numbers.append(line_no)
            lengths.append(len(line_tokens))
            tokens.extend(line_tokens)
        line_numbers, lengths = np.array(line_numbers, np.int64), np.array(lengths, np.int64)
        ids = _number_tokens(numbering.ids, tokens)
    return (os.getpid(), *numbering.new_tokens(), line_numbers, lengths, ids, skipped,
            len(lines) if labelled else 0)


def _labelled_bodies(lines: list[tuple[int, str]]) -> tuple[list[tuple], list[int]]:
    """(line number, text, labels) of the lines with a label, and the numbers of the non-blank
    lines without one."""
    kept, skipped = [], []
    for line_no, text in lines:
        if text.strip():
            body, labels = parse_label_line(text)
            if labels:
                kept.append((line_no, body, labels))
            else:
                skipped.append(line_no)
    return kept, skipped


def _first_sight_numbering() -> collections.defaultdict:
    """A dict that gives each new key the next number (0, 1, ...) when first looked up, so that
    `_number_tokens` numbers tokens in C, one hash each."""
    return collections.defaultdict(itertools.count().__next__)


def _number_tokens(numbering: collections.defaultdict, tokens: Iterable[str],
                  count: int = -1) -> np.ndarray:
    """int32 numbers of `tokens` in a `_first_sight_numbering`, new ones numbered on the way;
    `count` (how many tokens, when `tokens` is not sized) lets numpy allocate once."""
    return np.fromiter(map(numbering.__getitem__, tokens), np.int32,
                       len(tokens) if count < 0 else count)


def _numbered_since(numbering: dict, start: int) -> list[str]:
    """The keys of `numbering` numbered `start` and later, in order (read from the end)."""
    return list(itertools.islice(reversed(numbering), len(numbering) - start))[::-1]


def _encode_word_chunk(backend: str, lines: list[tuple[int, str]],
                       numbering: _ChunkNumbering) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(line numbers, lengths, ids) of the `word` tokens of the non-blank `lines`. `tokenize`'s
    fix-ups of the segmenter's tokens (the re-split that makes jieba-rs agree with jieba,
    dropping whitespace) are worked out once per token new to the worker and applied to the ids
    with array operations: per token, in Python, they cost as much as the segmenter itself."""
    examined = len(numbering.ids)
    ids, cut_lengths = _cut_lines_joined(segmenter(backend), [text for _, text in lines],
                                         numbering.ids)
    # Every token new to the worker is examined once, the pieces of a re-split too (should the
    # segmenter ever give them whole). Words of letters or digits, nearly all, stay as they are.
    while examined < len(numbering.ids):
        fresh = _numbered_since(numbering.ids, examined)
        for i, token in enumerate(fresh, start=examined):
            if not token.isalnum():
                pieces = [numbering.ids[piece] for piece in _word_pieces(token, backend)]
                if pieces != [i]:
                    numbering.replaced[i] = pieces
        examined += len(fresh)
    ids, per_token = _replace_ids(ids, numbering.replaced, len(numbering.ids))
    line_of_token = np.repeat(np.arange(len(lines)), cut_lengths)
    lengths = np.bincount(line_of_token, weights=per_token, minlength=len(lines)).astype(np.int64)
    # blank as the other styles' rule has it (a segmenter that dropped a character would still
    # keep its line, as an empty row)
    nonblank = np.fromiter((bool(text.strip()) for _, text in lines), bool, len(lines))
    line_numbers = np.fromiter((line_no for line_no, _ in lines), np.int64, len(lines))
    return line_numbers[nonblank], lengths[nonblank], ids


def _cut_lines_joined(cut: Callable[[str], list[str]], texts: list[str],
                      numbering: collections.defaultdict) -> tuple[np.ndarray, np.ndarray]:
    """(numbers of the segmenter's tokens of all `texts`, end to end; tokens per text).

    The texts are cut as one string joined by "\\n", which both segmenters give back as a token
    of its own: one call per chunk instead of one per line made the segmenter about 1.3x faster.
    A text holds no "\\n" and ends in no "\\r" (lines are read with both stripped), so no other
    token can swallow a joint; should the count of "\\n" tokens say otherwise, the texts are cut
    one by one.
    """
    ids = _number_tokens(numbering, cut("\n".join(texts)))
    joints = np.flatnonzero(ids == numbering["\n"]) if len(texts) > 1 else np.zeros(0, np.int64)
    if len(joints) == len(texts) - 1:
        lengths = np.diff(np.concatenate(([-1], joints, [len(ids)]))) - 1
        return np.delete(ids, joints), lengths
    per_text = [cut(text) for text in texts]
    lengths = np.fromiter(map(len, per_text), np.int64, len(per_text))
    return (_number_tokens(numbering, itertools.chain.from_iterable(per_text),
                           int(lengths.sum())), lengths)


def _replace_ids(ids: np.ndarray, replacements: dict[int, list[int]],
                 num_ids: int) -> tuple[np.ndarray, np.ndarray]:
    """`ids` with every id i in `replacements` replaced by the ids replacements[i] (none or
    several), and for each input id how many it became."""
    per_id = np.ones(num_ids, np.int64)
    per_id[list(replacements)] = [len(new) for new in replacements.values()]
    first = np.cumsum(per_id) - per_id
    table = np.arange(num_ids, dtype=np.int32).repeat(per_id)  # id i -> table[first[i]:][:n]
    for i, new in replacements.items():
        table[first[i]:first[i] + len(new)] = new
    per_token = per_id[ids]
    # output position k of input token t reads table[first[t] + (k - start of t's outputs)]
    shift = np.repeat(first[ids] - (np.cumsum(per_token) - per_token), per_token)
    return table[shift + np.arange(len(shift))], per_token


def resolve_process_num(process_num: int | None, tokenize_style: str = "word") -> int:
    """How many tokenizing processes to use; DataError names --process_num when it is invalid.

    None means every usable core for `word` (segmentation is worth shipping to workers) and 1 for
    `char` and `space`, which split a line faster than a worker round trip costs (a pool of 2 ran
    them 2.4x slower; see benchmarks/results/preprocess.txt for `word`).
    """
    if process_num is None:
        if tokenize_style != "word":
            return 1
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1)
    if not isinstance(process_num, int) or process_num < 1:
        raise DataError(f"--process_num={process_num!r} must be a whole number of 1 or more")
    return process_num


def _pool_context():
    # spawn/forkserver workers re-import the caller's main script (and with it TensorFlow), costing
    # seconds per worker; fork children only run the tokenizer, so they are safe and start at once.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def _map_chunks_in_order(chunks: Iterable[list], job: tuple, process_num: int,
                         work: Callable = _tokenize_chunk, remote: Callable | None = None,
                         unpack: Callable = lambda result: result, count: Callable = len,
                         initializer: Callable | None = None, initargs: tuple = ()
                         ) -> Iterator[tuple[int, object]]:
    """Yield (count(chunk), work(*job, chunk)) in file order, with at most 2 chunks per worker
    in flight. A pool runs `remote` (default `work`) and the parent `unpack`s its result.
    `initializer(*initargs)` runs once in each pool worker. `job[0]` is the tokenize style."""
    chunks = iter(chunks)
    head = list(itertools.islice(chunks, 2))
    if process_num == 1 or len(head) < 2:  # one chunk: a pool would cost more than it saves
        for chunk in itertools.chain(head, chunks):
            yield count(chunk), work(*job, chunk)
        return
    if job[0] == "word":
        # the dictionary loaded once here and inherited by forked workers, not once per worker
        segmenter(word_backend())("中文")
    with _pool_context().Pool(process_num, initializer, initargs) as pool:
        pending = collections.deque()
        for chunk in itertools.chain(head, chunks):
            pending.append((count(chunk), pool.apply_async(remote or work, (*job, chunk))))
            if len(pending) >= 2 * process_num:
                num_lines, result = pending.popleft()
                yield num_lines, unpack(result.get())
        while pending:
            num_lines, result = pending.popleft()
            yield num_lines, unpack(result.get())


def _unpack_tokens(result: list[tuple]) -> list[tuple]:
    return [(no, None if joined is None else joined.split(" ") if joined else [], labels)
            for no, joined, labels in result]


def _encoded_blocks(path: str, tokenize_style: str, encoding: str, process_num: int | None,
                    number: Callable[[list[str]], np.ndarray],
                    labelled: bool = False) -> Iterator[tuple]:
    """(line numbers, row lengths, ids) for every chunk of a file (of a `labelled` file, its
    labelled lines' texts), in file order, with a progress line; `number` maps tokens new to a
    worker to their int32 ids, once each."""
    translations: dict[int, np.ndarray] = {}  # worker -> its numbering of tokens -> ours
    for worker, sent_before, new, line_numbers, lengths, ids in _encoded_chunks(
            path, tokenize_style, encoding, process_num, labelled):
        known = translations.get(worker, np.zeros(0, np.int32))
        if sent_before not in (0, len(known)):  # 0: the worker started a new numbering
            raise RuntimeError(f"worker {worker} numbered {sent_before} tokens before this "
                               f"chunk, the parent knows {len(known)}: chunks out of order")
        translations[worker] = known = np.concatenate([known[:sent_before], number(new)])
        yield line_numbers, lengths, known[ids]


def _encoded_chunks(path: str, tokenize_style: str, encoding: str, process_num: int | None,
                    labelled: bool = False) -> Iterator[tuple]:
    """`_encode_chunk`'s first six results for every chunk of a file, in file order, with a
    progress line; label-less lines of a `labelled` file are reported as `iter_tokenized_lines`
    reports them, and a labelled file without any label raises DataError."""
    return _worked_raw_chunks(path, tokenize_style, encoding, process_num, labelled, (labelled,),
                              work=_encode_chunk)


def _worked_raw_chunks(path: str, tokenize_style: str, encoding: str, process_num: int | None,
                       labelled: bool, job_tail: tuple, **mapping) -> Iterator[tuple]:
    """`work(tokenize_style, path, encoding, run, backend, *job_tail, chunk)` for every chunk of
    `_read_raw_chunks`, in file order, by `process_num` processes (`mapping`: the other
    arguments of `_map_chunks_in_order`), with a progress line. Each result ends in (numbers of
    the lines without a label, how many lines had one): a `labelled` file's are reported as
    `iter_tokenized_lines` reports them (no label at all raises DataError), and the rest of each
    result is yielded."""
    _check_style(tokenize_style)
    check_encoding(encoding)
    job = (tokenize_style, path, encoding, os.urandom(8).hex(), word_backend(), *job_tail)
    progress, skips, parsed = _Progress(path), _SkipReport(path), 0
    try:
        for num_lines, (*result, skipped, kept) in _map_chunks_in_order(
                _read_raw_chunks(path, RAW_CHUNK_BYTES), job,
                resolve_process_num(process_num, tokenize_style),
                count=lambda chunk: len(chunk[1]), **mapping):
            progress.advance(num_lines)
            for line_no in skipped:
                skips.add(line_no)
            parsed += kept
            yield tuple(result)
    finally:
        _forget_numbering()  # this process's, when it tokenized without a pool
    progress.done()
    if labelled:
        skips.finish(parsed)


_chunk_vocabulary: "Vocabulary | None" = None  # a pool worker's, for _encode_labelled_chunk


def _use_vocabulary(vocab: "Vocabulary | None") -> None:
    global _chunk_vocabulary
    _chunk_vocabulary = vocab


def _encode_labelled_chunk(style: str, path: str, encoding: str, run: str, backend: str,
                           sequence_length: int, chunk: tuple[int, list[bytes]],
                           vocab: "Vocabulary | None" = None) -> tuple:
    """A labelled chunk of `_read_raw_chunks` decoded, tokenized and encoded where it is
    tokenized, with `vocab` (in a pool worker, the one `_use_vocabulary` installed): (line
    numbers int64 [n], ids int32 [n, sequence_length] as `encode_example` gives them, the labels
    of each row, the numbers of the lines without a label, n). Only arrays and labels cross
    back to the parent."""
    vocab = _chunk_vocabulary if vocab is None else vocab
    kept, skipped = _labelled_bodies(_decode_chunk(path, encoding, *chunk))
    line_numbers = np.fromiter((line_no for line_no, _, _ in kept), np.int64, len(kept))
    if style == "word":
        lengths, ids = _labelled_word_ids(backend, kept, line_numbers, run, vocab)
    else:
        rows = [tokenize(body, style) for _, body, _ in kept]
        lengths = np.fromiter(map(len, rows), np.int64, len(rows))
        ids = vocab.ids_of(list(itertools.chain.from_iterable(rows)))
    # each row's first sequence_length - 1 ids, after [CLS], padded
    take = np.minimum(lengths, sequence_length - 1)
    first = np.repeat(np.cumsum(lengths) - lengths, take)
    within = np.arange(int(take.sum())) - np.repeat(np.cumsum(take) - take, take)
    matrix = np.full((len(kept), sequence_length), PAD_ID, np.int32)
    matrix[:, 0] = CLS_ID
    matrix[:, 1:][np.arange(sequence_length - 1) < take[:, None]] = ids[first + within]
    return line_numbers, matrix, [labels for _, _, labels in kept], skipped, len(kept)


def _labelled_word_ids(backend: str, kept: list[tuple], line_numbers: np.ndarray, run: str,
                       vocab: "Vocabulary") -> tuple[np.ndarray, np.ndarray]:
    """(tokens a row [n], the rows' vocabulary ids end to end) of the `word` tokens of the
    bodies in `kept`, by `_encode_word_chunk` (so a token new to this worker is looked up in the
    vocabulary once) and a map from the worker's numbering to the vocabulary's ids."""
    numbering = _numbering_for(run)
    body_lines, body_lengths, numbers = _encode_word_chunk(
        backend, [(line_no, body) for line_no, body, _ in kept], numbering)
    known = numbering.vocabulary_ids
    numbering.vocabulary_ids = np.concatenate(
        [known, vocab.ids_of(_numbered_since(numbering.ids, len(known)))])
    lengths = np.zeros(len(kept), np.int64)  # a row whose body is blank keeps [CLS] alone
    lengths[np.searchsorted(line_numbers, body_lines)] = body_lengths
    return lengths, numbering.vocabulary_ids[numbers]


def encoded_labelled_chunks(path: str, vocab: "Vocabulary", sequence_length: int,
                            tokenize_style: str, encoding: str = "utf-8",
                            process_num: int | None = None) -> Iterator[tuple]:
    """A labelled file as examples, in file order, a chunk at a time: (line numbers [n], ids
    int32 [n, sequence_length] as `encode_example` gives them, the labels of each row), by
    `process_num` processes that tokenize and encode (see resolve_process_num). Blank lines are
    skipped silently, label-less ones with a warning; a file in which no line has a label
    raises DataError."""
    check_minimum_sequence_length(sequence_length)
    yield from _worked_raw_chunks(
        path, tokenize_style, encoding, process_num, True, (sequence_length,),
        work=functools.partial(_encode_labelled_chunk, vocab=vocab),
        remote=_encode_labelled_chunk, initializer=_use_vocabulary, initargs=(vocab,))


class _Progress:
    """A progress line on stderr: rewritten in place on a terminal, every 10 s in a log file."""

    def __init__(self, path: str):
        self.path, self.lines, self.start = path, 0, time.monotonic()
        self.tty = sys.stderr.isatty()
        self.last = self.start

    def advance(self, num_lines: int) -> None:
        self.lines += num_lines
        now = time.monotonic()
        if now - self.last >= (0.5 if self.tty else 10.0):
            self.last = now
            print(("\r" if self.tty else "") + self._status(now), end="" if self.tty else "\n",
                  file=sys.stderr, flush=True)

    def done(self) -> None:
        print(("\r" if self.tty else "") + self._status(time.monotonic()) + " done",
              file=sys.stderr, flush=True)

    def _status(self, now: float) -> str:
        rate = self.lines / max(now - self.start, 1e-9)
        return f"tokenizing {self.path}: {self.lines:,} lines, {rate:,.0f} lines/s"


class _SkipReport:
    """Warns about labelled lines without a label: the first few by path:line, then a count."""

    def __init__(self, path: str):
        self.path, self.skipped = path, 0

    def add(self, line_no: int) -> None:
        self.skipped += 1
        if self.skipped <= MAX_LISTED_WARNINGS:
            print(f"warning: {self.path}:{line_no}: no {LABEL_PREFIX} on this line; skipped",
                  file=sys.stderr)

    def finish(self, parsed: int) -> None:
        if parsed == 0:
            raise DataError(f"{self.path}: no line has a {LABEL_PREFIX}; a labelled file needs "
                            f"lines like 'some text {LABEL_PREFIX}pos'")
        if self.skipped:
            print(f"warning: {self.path}: skipped {self.skipped:,} line(s) without a label, kept "
                  f"{parsed:,}", file=sys.stderr)


def iter_tokenized_lines(path: str, tokenize_style: str, encoding: str = "utf-8",
                         process_num: int | None = None, labelled: bool = False,
                         chunk_lines: int = DEFAULT_CHUNK_LINES) -> Iterator[tuple]:
    """Stream `path` tokenized, in file order, by `process_num` processes (see resolve_process_num).

    Yields (line_no, tokens) for unlabelled files, skipping blank lines, or
    (line_no, tokens, labels) when `labelled`, skipping blank lines silently and label-less lines
    with a warning. Memory stays bounded by a few chunks of `chunk_lines` lines whatever the file
    size. A labelled file in which no line has a label raises DataError.
    """
    _check_style(tokenize_style)
    check_encoding(encoding)
    job = (tokenize_style, labelled, word_backend())
    chunks = _read_chunks(path, encoding, chunk_lines)
    progress, skips, parsed = _Progress(path), _SkipReport(path), 0
    workers = resolve_process_num(process_num, tokenize_style)
    for num_lines, results in _map_chunks_in_order(chunks, job, workers,
                                                   remote=_tokenize_chunk_packed,
                                                   unpack=_unpack_tokens):
        progress.advance(num_lines)
        for line_no, tokens, labels in results:
            if tokens is None:
                skips.add(line_no)
                continue
            parsed += 1
            yield (line_no, tokens, labels) if labelled else (line_no, tokens)
    progress.done()
    if labelled:
        skips.finish(parsed)


# ----------------------------------------------------------------------------- vocabulary
class Vocabulary:
    """Token <-> id map. ``tokens[i]`` is the token of id i; the first five are SPECIAL_TOKENS."""

    def __init__(self, tokens: list[str], source: str = "<vocabulary>", check: bool = True):
        """`check` False skips the validation, for a list ranked here (its tokens are unique
        and free of whitespace by construction)."""
        self.tokens = list(tokens)
        self._ids = dict(zip(self.tokens, range(len(self.tokens))))
        problem = check and _vocabulary_problem(self.tokens, len(self._ids) == len(self.tokens))
        if problem:
            raise DataError(f"{source}:{problem}")

    def __len__(self) -> int:
        return len(self.tokens)

    def id_of(self, token: str) -> int:
        return self._ids.get(token, UNK_ID)

    def ids_of(self, tokens: Iterable[str]) -> np.ndarray:
        """int32 ids of `tokens` (a list or any sized iterable), [UNK] for unknown ones."""
        return np.fromiter(map(self._ids.get, tokens, itertools.repeat(UNK_ID)), np.int32,
                           len(tokens))

    def encode(self, tokens: list[str]) -> list[int]:
        get = self._ids.get
        return [get(token, UNK_ID) for token in tokens]

    def save(self, path: str) -> None:
        """Write ``vocab.txt``: one token a line, line i (from 0) holding the token of id i."""
        write_text_atomically(path, "".join(token + "\n" for token in self.tokens))

    @classmethod
    def load(cls, path: str) -> "Vocabulary":
        # read whole: every script and the cache check load it, and line by line cost 4x more
        with _open_binary(path) as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            line_no = data.count(b"\n", 0, error.start) + 1
            raise DataError(f"{path}:{line_no}: cannot decode as utf-8; a vocabulary is written "
                            "as utf-8, rebuild it (delete the file)") from None
        text = text.removeprefix("\ufeff")
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if "\r" in text:  # edited on Windows
            lines = [line.removesuffix("\r") for line in lines]
        return cls(lines, source=path)

    def fingerprint(self) -> str:
        """sha256 of the token list: equal fingerprints mean identical token <-> id maps."""
        return hashlib.sha256("\n".join(self.tokens).encode("utf-8")).hexdigest()


def _vocabulary_problem(tokens: list[str], unique: bool) -> str | None:
    """None if valid, else 'line: what is wrong; what to do' (line numbers from 1); `unique`
    says whether the tokens are all different."""
    if list(tokens[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
        return (f"1: a vocabulary must start with the {len(SPECIAL_TOKENS)} special tokens "
                f"{' '.join(SPECIAL_TOKENS)}, one a line; rebuild it (delete the file) rather than "
                "editing it")
    # the common case, a valid file, checked at C speed (no whitespace but the joints, no empty
    # token); the loop below finds the line
    joined = "\n".join(tokens)
    if (unique and joined.count("\n") == len(tokens) - 1 and "\n\n" not in joined
            and not joined.endswith("\n") and not _SPACE_BUT_NEWLINE.search(joined)):
        return None
    seen = set()
    for line_no, token in enumerate(tokens, start=1):
        if not token or token != token.strip() or len(token.split()) != 1:
            return f"{line_no}: empty token or token with whitespace; one token a line, no spaces"
        if token in seen:
            return f"{line_no}: token {token!r} appears twice; ids must be unique, rebuild the file"
        seen.add(token)
    return None


def build_vocabulary(paths: list[str], tokenize_style: str, vocab_size: int,
                     labelled: bool = False, encoding: str = "utf-8",
                     process_num: int | None = None) -> Vocabulary:
    """The `vocab_size` (total, the 5 special tokens included) most frequent tokens of `paths`.

    Ties in frequency are broken by the token string, so the result never depends on file order
    or on the number of processes.
    """
    _check_vocab_size(vocab_size)
    provisional, counts, pending = _first_sight_numbering(), np.zeros(0, np.int64), []

    def count_pending() -> np.ndarray:  # a bincount per HELD_IDS ids, not per chunk
        block = np.bincount(np.concatenate([np.zeros(0, np.int32), *pending]),
                            minlength=len(provisional))
        pending.clear()
        return np.pad(counts, (0, len(block) - len(counts))) + block

    for path in paths:
        for _, _, ids in _encoded_blocks(path, tokenize_style, encoding, process_num,
                                         lambda new: _number_tokens(provisional, new), labelled):
            pending.append(ids)
            if sum(map(len, pending)) >= HELD_IDS:
                counts = count_pending()
    counts = count_pending()
    return _vocabulary_by_rank(list(provisional), counts, vocab_size, paths)[0]


def _check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
        raise DataError(f"--vocab_size={vocab_size!r} must exceed {len(SPECIAL_TOKENS)}: it counts "
                        "the special tokens [PAD] [UNK] [CLS] [SEP] [MASK] too")


def vocabulary_from_counts(counts: dict[str, int], vocab_size: int,
                           paths: list[str]) -> Vocabulary:
    """The special tokens, then the `vocab_size` - 5 most frequent tokens (ties by string)."""
    return _vocabulary_by_rank(list(counts), np.fromiter(counts.values(), np.int64, len(counts)),
                               vocab_size, paths, check=True)[0]


def _vocabulary_by_rank(tokens: list[str], counts: np.ndarray, vocab_size: int,
                        paths: list[str], check: bool = False) -> tuple[Vocabulary, np.ndarray]:
    """`vocabulary_from_counts` for tokens[i] seen counts[i] times, and the id there of each of
    `tokens` (int32; [UNK] for those left out): what `Vocabulary.ids_of(tokens)` gives. `check`:
    validate the tokens (tokenize's are whitespace-free and distinct by construction)."""
    specials = []
    if not _SPECIAL_SET.isdisjoint(tokens):  # literal "[MASK]" in the text: never ranked
        specials = [i for i, token in enumerate(tokens) if token in _SPECIAL_SET]
        counts = counts.copy()
        counts[specials] = 0
    total = int(counts.sum())
    if not total:
        raise DataError(f"{', '.join(paths)}: no tokens found; the vocabulary needs some text")
    room = vocab_size - len(SPECIAL_TOKENS)
    # only tokens as frequent as the room's last one can be kept: the rest need no ordering
    cutoff = max(1, np.partition(counts, len(counts) - room)[len(counts) - room]
                 if len(counts) > room else 1)
    by_string = sorted(np.flatnonzero(counts >= cutoff).tolist(), key=tokens.__getitem__)
    ranked = np.array(by_string, np.int64)[np.argsort(-counts[by_string], kind="stable")][:room]
    kept = list(map(tokens.__getitem__, ranked.tolist()))
    print(f"vocabulary: {len(kept) + len(SPECIAL_TOKENS):,} tokens (of "
          f"{int(np.count_nonzero(counts)):,} distinct), covering "
          f"{int(counts[ranked].sum()) / total:.1%} of {total:,} token occurrences")
    ids = np.full(len(tokens), UNK_ID, np.int32)
    ids[ranked] = np.arange(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(ranked))
    ids[specials] = [SPECIAL_TOKENS.index(tokens[i]) for i in specials]
    return Vocabulary(SPECIAL_TOKENS + kept, check=check), ids


# ----------------------------------------------------------------------------- labels
def load_or_build_vocabulary(paths: list[str], tokenize_style: str, vocab_size: int,
                             cache_dir: str, labelled: bool = False, encoding: str = "utf-8",
                             process_num: int | None = None) -> Vocabulary:
    """`build_vocabulary`, kept in `cache_dir` under a fingerprint of its inputs so that an
    unchanged corpus is not tokenized again just to count its words."""
    path = _vocabulary_file(paths, tokenize_style, vocab_size, cache_dir, labelled, encoding)
    if os.path.exists(path):
        return Vocabulary.load(path)
    vocab = build_vocabulary(paths, tokenize_style, vocab_size, labelled, encoding, process_num)
    vocab.save(path)
    return vocab


def _vocabulary_file(paths: list[str], tokenize_style: str, vocab_size: int, cache_dir: str,
                     labelled: bool, encoding: str, file_prints: list[str] | None = None) -> str:
    """`file_prints`: the `file_fingerprint`s of `paths` when the caller has them already."""
    fingerprint = fingerprint_of({"files": file_prints or [file_fingerprint(p) for p in paths],
                                  "tokenize_style": tokenize_style, "vocab_size": vocab_size,
                                  "labelled": labelled, "encoding": encoding,
                                  "format": FORMAT_VERSION})
    return os.path.join(cache_dir, f"vocab-{fingerprint[:20]}.txt")


def warn_if_unsegmented(path: str, tokenize_style: str, labelled: bool = False,
                        encoding: str = "utf-8", sample_lines: int = 200) -> bool:
    """Warn (one line) when `space` style meets text that has no spaces, e.g. raw Chinese, where
    every line would become a single token. Returns whether it warned."""
    if tokenize_style != "space":
        return False
    unsegmented = seen = 0
    for _, line in itertools.islice(read_lines(path, encoding), sample_lines):
        text = parse_label_line(line)[0] if labelled else line.strip()
        if text:
            seen += 1
            unsegmented += len(text) >= 10 and len(text.split()) == 1
    if seen and unsegmented > seen / 2:
        print(f"warning: {path}: {unsegmented} of the first {seen} lines hold no spaces, so "
              "--tokenize_style=space makes each of them one token; for raw text pass "
              "--tokenize_style=word (jieba) or char", file=sys.stderr)
        return True
    return False


def build_label_list(train_path: str, encoding: str = "utf-8") -> list[str]:
    """Labels of the training file, most frequent (in lines) first, ties by name."""
    counts: collections.Counter = collections.Counter()
    for _, line in read_lines(train_path, encoding):
        counts.update(parse_label_line(line)[1])
    if not counts:
        raise DataError(f"{train_path}: no line has a {LABEL_PREFIX}; a labelled file needs lines "
                        f"like 'some text {LABEL_PREFIX}pos'")
    return sorted(counts, key=lambda label: (-counts[label], label))


def save_label_list(labels: list[str], path: str) -> None:
    """Write ``labels.txt``: one label a line, in index order."""
    write_text_atomically(path, "".join(label + "\n" for label in labels))


def load_label_list(path: str) -> list[str]:
    labels = []
    for line_no, label in read_lines(path):
        if not label.strip() or label != label.strip():
            raise DataError(f"{path}:{line_no}: empty label or label with surrounding spaces; one "
                            "label a line")
        if label in labels:
            raise DataError(f"{path}:{line_no}: label {label!r} appears twice; fix or rebuild it")
        labels.append(label)
    if not labels:
        raise DataError(f"{path}: no labels; the file should list one label a line")
    return labels


# ----------------------------------------------------------------------------- caches
def file_fingerprint(path: str) -> str:
    """sha256 of the file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with _open_binary(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_of(parts: dict) -> str:
    """sha256 of a JSON-serialisable description of everything a cache depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def cache_path(cache_dir: str, prefix: str, fingerprint: str) -> str:
    return os.path.join(cache_dir, f"{prefix}-{fingerprint[:20]}.h5")


def write_hdf5_atomically(path: str, write_fn: Callable[[h5py.File], None],
                          fingerprint: str) -> None:
    """Run `write_fn` on a new HDF5 file, mark it complete with `fingerprint`, and put it at
    `path` through `write_file_atomically`: a file found at `path` is always a whole cache."""
    def write(temporary: str) -> None:
        with h5py.File(temporary, "w") as h5:
            write_fn(h5)
            h5.attrs["fingerprint"] = fingerprint
            h5.attrs["complete"] = True

    write_file_atomically(path, write, then=f"{RERUN}, or point --cache_dir elsewhere")


def open_valid_cache(path: str, fingerprint: str) -> bool:
    """True if `path` is a complete cache with this fingerprint; a broken one is deleted."""
    if not os.path.exists(path):
        return False
    try:
        with h5py.File(path, "r") as h5:
            valid = bool(h5.attrs.get("complete", False)) \
                and h5.attrs.get("fingerprint") == fingerprint
    except (OSError, KeyError, ValueError):
        valid = False
    if not valid:
        print(f"warning: {path}: incomplete or foreign cache file; deleting it and rebuilding",
              file=sys.stderr)
        remove_quietly(path)
    return valid


# ----------------------------------------------------------------------------- classification
def check_minimum_sequence_length(sequence_length: int) -> None:
    """Raise DataError unless `sequence_length` is a whole number with room for [CLS] and at
    least one token (model.check_sequence_length checks the other end, against max_position)."""
    if not isinstance(sequence_length, int) or sequence_length < 2:
        raise DataError(f"--sequence_length={sequence_length!r} must be at least 2 ([CLS] and one "
                        "token)")


def encode_example(tokens: list[str], vocab: Vocabulary, sequence_length: int) -> list[int]:
    """[CLS] + token ids, truncated to `sequence_length` and padded with [PAD] up to it."""
    ids = vocab.encode(tokens[:sequence_length - 1])
    return [CLS_ID] + ids + [PAD_ID] * (sequence_length - 1 - len(ids))


def classification_fingerprint(files: dict[str, str], vocab: Vocabulary, labels: list[str],
                               sequence_length: int, tokenize_style: str,
                               encoding: str = "utf-8") -> str:
    """What a classification cache depends on: source bytes, vocabulary, labels, T, tokenizer."""
    return fingerprint_of({
        "kind": "classification", "format_version": FORMAT_VERSION,
        "files": {split: file_fingerprint(path) for split, path in files.items()},
        "vocab": vocab.fingerprint(), "labels": labels, "sequence_length": sequence_length,
        "tokenize_style": tokenize_style, "encoding": encoding,
        "word_backend": word_backend() if tokenize_style == "word" else None})


def load_or_build_classification_cache(files: dict[str, str], vocab: Vocabulary, labels: list[str],
                                       sequence_length: int, tokenize_style: str, cache_dir: str,
                                       encoding: str = "utf-8",
                                       process_num: int | None = None) -> str:
    """Path of the HDF5 cache for `files` ({"train": ..., "valid": ..., "test": ...}).

    Reuses a complete cache with the same fingerprint, else tokenizes and writes a new one.
    Labels missing from `labels` are counted and reported; their examples are kept.
    """
    if "train" not in files:
        raise DataError("no training file given; pass --training_data_file")
    check_minimum_sequence_length(sequence_length)
    _check_style(tokenize_style)
    if not labels:
        raise DataError("the label list is empty; the training file needs __label__ labels")
    fingerprint = classification_fingerprint(files, vocab, labels, sequence_length,
                                             tokenize_style, encoding)
    path = cache_path(cache_dir, "classification", fingerprint)
    if open_valid_cache(path, fingerprint):
        print(f"Reusing classification cache {path}")
        return path
    start = time.monotonic()

    def write(h5: h5py.File) -> None:
        h5.attrs.update({"format_version": FORMAT_VERSION, "labels": json.dumps(labels),
                         "sequence_length": sequence_length, "tokenize_style": tokenize_style,
                         "vocab_size": len(vocab), "vocab_fingerprint": vocab.fingerprint()})
        for split, source in files.items():
            _write_classification_split(h5.create_group(split), source, vocab, labels,
                                        sequence_length, tokenize_style, encoding, process_num)

    write_hdf5_atomically(path, write, fingerprint)
    print(f"Built classification cache {path} in {time.monotonic() - start:.1f} s")
    return path


class _RowWriter:
    """Appends rows to resizable datasets through fixed numpy blocks: memory stays flat."""

    BLOCK = 2048

    def __init__(self, group: h5py.Group, specs: dict[str, tuple[tuple, str]]):
        self.datasets = {name: group.create_dataset(name, (0, *shape), maxshape=(None, *shape),
                                                    dtype=dtype, chunks=(self.BLOCK, *shape))
                         for name, (shape, dtype) in specs.items()}
        self.blocks = {name: np.zeros((self.BLOCK, *shape), dtype)
                       for name, (shape, dtype) in specs.items()}
        self.filled = self.rows = 0

    def extend(self, **rows: np.ndarray) -> None:
        """Append rows given as arrays of equal length, one per dataset."""
        count, done = len(next(iter(rows.values()))), 0
        while done < count:
            take = min(count - done, self.BLOCK - self.filled)
            for name, values in rows.items():
                self.blocks[name][self.filled:self.filled + take] = values[done:done + take]
            self.filled, done = self.filled + take, done + take
            if self.filled == self.BLOCK:
                self.flush()

    def flush(self) -> None:
        for name, dataset in self.datasets.items():
            ensure_free_space(dataset.file.filename, self.blocks[name][:self.filled].nbytes)
            dataset.resize(self.rows + self.filled, axis=0)
            dataset[self.rows:] = self.blocks[name][:self.filled]
        self.rows += self.filled
        self.filled = 0


def _write_classification_split(group: h5py.Group, source: str, vocab: Vocabulary,
                                labels: list[str], sequence_length: int, tokenize_style: str,
                                encoding: str, process_num: int | None) -> None:
    label_index = {label: i for i, label in enumerate(labels)}
    writer = _RowWriter(group, {"input_ids": ((sequence_length,), "int32"),
                                "labels": ((len(labels),), "uint8"), "line_numbers": ((), "int64")})
    unknown, lines_with_unknown = collections.Counter(), 0
    for line_numbers, ids, row_labels in encoded_labelled_chunks(
            source, vocab, sequence_length, tokenize_style, encoding, process_num):
        hot = np.zeros((len(row_labels), len(labels)), np.uint8)
        for row, line_labels in enumerate(row_labels):
            missing = [label for label in line_labels if label not in label_index]
            hot[row, [label_index[label] for label in line_labels if label in label_index]] = 1
            unknown.update(missing)
            lines_with_unknown += bool(missing)
        writer.extend(input_ids=ids, labels=hot, line_numbers=line_numbers)
    writer.flush()
    group.attrs.update({"source": os.path.abspath(source), "num_examples": writer.rows})
    if unknown:
        listed = ", ".join(f"{label} ({count})" for label, count in unknown.most_common(5))
        print(f"warning: {source}: {len(unknown)} label(s) not in the training label list, on "
              f"{lines_with_unknown:,} line(s): {listed}{', ...' if len(unknown) > 5 else ''}; "
              "those examples are kept with their known labels", file=sys.stderr)


def read_classification_split(cache_file: str, split: str,
                              width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int32 [N, T], labels uint8 [N, L]) of one split of a classification cache;
    with `width`, only the first `width` columns of the ids (the rows truncated to it)."""
    with h5py.File(cache_file, "r") as h5:
        group = _classification_split(h5, cache_file, split)
        return group["input_ids"][:, :width], group["labels"][:]


def classification_lengths(cache_file: str, split: str) -> np.ndarray:
    """int [N]: the real ([CLS] + tokens, no padding) length of each row of one split, read in
    blocks so that memory does not hold the split's ids."""
    with h5py.File(cache_file, "r") as h5:
        ids = _classification_split(h5, cache_file, split)["input_ids"]
        return np.concatenate([np.sum(ids[start:start + _RowWriter.BLOCK] != PAD_ID, axis=1)
                               for start in range(0, len(ids), _RowWriter.BLOCK)] or
                              [np.zeros(0, np.int64)])


def _classification_split(h5: h5py.File, cache_file: str, split: str) -> h5py.Group:
    if split not in h5:
        raise DataError(f"{cache_file}: no split {split!r} (has {', '.join(h5.keys())}); "
                        "pass the matching data file flag")
    return h5[split]


# ----------------------------------------------------------------------------- token cache
def load_or_build_token_cache(path: str, vocab: Vocabulary, tokenize_style: str, cache_dir: str,
                              encoding: str = "utf-8", process_num: int | None = None,
                              file_print: str | None = None) -> str:
    """Path of an HDF5 cache of `path`'s non-blank lines as ragged rows of token ids
    (`file_print`: `path`'s `file_fingerprint`, when the caller has it already)."""
    cache, fingerprint = _token_cache_file(path, vocab, tokenize_style, cache_dir, encoding,
                                           file_print)
    if open_valid_cache(cache, fingerprint):
        print(f"Reusing token cache {cache}")
        return cache
    blocks = _encoded_blocks(path, tokenize_style, encoding, process_num, vocab.ids_of)
    _write_token_cache(cache, fingerprint, blocks, tokenize_style, path)
    return cache


def load_or_build_corpus(path: str, tokenize_style: str, vocab_size: int, cache_dir: str,
                         encoding: str = "utf-8",
                         process_num: int | None = None) -> tuple[Vocabulary, str]:
    """The corpus's vocabulary and token cache, tokenizing the text once.

    Both are the files `load_or_build_vocabulary` and `load_or_build_token_cache` would write
    (same names, same contents), but when neither exists the text is tokenized in one pass:
    every token gets a provisional id in order of first sight, the vocabulary is ranked from
    those ids' counts, and the provisional ids (kept in memory up to HELD_IDS, past that in a
    scratch HDF5 file beside the cache, so memory does not grow with the corpus) are mapped to
    the final ones by array lookups.
    """
    file_print = file_fingerprint(path)  # hashed once for both file names
    vocab_file = _vocabulary_file([path], tokenize_style, vocab_size, cache_dir, False, encoding,
                                  [file_print])
    if os.path.exists(vocab_file):
        vocab = Vocabulary.load(vocab_file)
        return vocab, load_or_build_token_cache(path, vocab, tokenize_style, cache_dir, encoding,
                                                process_num, file_print)
    _check_vocab_size(vocab_size)
    provisional = _first_sight_numbering()
    scratch = vocab_file[:-len(".txt")] + "-provisional.h5"  # rewritten by the next run if left
    blocks = _encoded_blocks(path, tokenize_style, encoding, process_num,
                             lambda new_tokens: _number_tokens(provisional, new_tokens))
    try:
        replay = _replayable_blocks(blocks, scratch, tokenize_style, path)
        counts = np.zeros(len(provisional), np.int64)
        for _, _, ids in replay():
            counts += np.bincount(ids, minlength=len(provisional))
        vocab, final = _vocabulary_by_rank(list(provisional), counts, vocab_size, [path])
        vocab.save(vocab_file)
        cache, fingerprint = _token_cache_file(path, vocab, tokenize_style, cache_dir, encoding,
                                               file_print)
        if not open_valid_cache(cache, fingerprint):
            remapped = ((lines, lengths, final[ids]) for lines, lengths, ids in replay())
            _write_token_cache(cache, fingerprint, remapped, tokenize_style, path)
    finally:
        remove_quietly(scratch)
    return vocab, cache


# A one-pass build keeps up to this many provisional ids (16 MiB, and 16 bytes a line beside
# them) in memory, which spares a small corpus the scratch file's write and read; a larger one
# goes to the scratch file, so memory stays flat whatever the corpus size. Counting a
# vocabulary holds as many ids before a bincount.
HELD_IDS = 1 << 22


def _replayable_blocks(blocks: Iterator[tuple], scratch: str, tokenize_style: str,
                       source: str) -> Callable[[], Iterable[tuple]]:
    """A function that gives `blocks` (line numbers, row lengths, ids) again at each call: held
    in memory up to HELD_IDS ids, else written to the HDF5 file `scratch` and read back from it
    (the caller removes it)."""
    held, num_ids = [], 0
    for block in blocks:
        held.append(block)
        num_ids += len(block[2])
        if num_ids > HELD_IDS:
            _write_token_cache(scratch, "provisional", itertools.chain(held, blocks),
                               tokenize_style, source, quiet=True)
            return lambda: ((lines, np.diff(starts), ids)
                            for lines, starts, ids in _token_cache_blocks(scratch))
    return lambda: held


def _token_cache_blocks(cache_file: str, block_tokens: int = 1 << 20):
    """Whole rows of a token cache, about `block_tokens` ids at a time, so memory stays flat
    whatever the corpus size: (line numbers [n], row starts within the block [n + 1], ids)."""
    with h5py.File(cache_file, "r") as h5:
        offsets, line_numbers, ids = h5["offsets"][:], h5["line_numbers"][:], h5["input_ids"]
        row = 0
        while row < len(line_numbers):
            end = int(np.searchsorted(offsets, offsets[row] + block_tokens, side="right")) - 1
            end = min(max(end, row + 1), len(line_numbers))
            yield (line_numbers[row:end], offsets[row:end + 1] - offsets[row],
                   ids[offsets[row]:offsets[end]])
            row = end


def _token_cache_file(path: str, vocab: Vocabulary, tokenize_style: str, cache_dir: str,
                      encoding: str, file_print: str | None = None) -> tuple[str, str]:
    fingerprint = fingerprint_of({
        "kind": "tokens", "format_version": FORMAT_VERSION,
        "file": file_print or file_fingerprint(path),
        "vocab": vocab.fingerprint(), "tokenize_style": tokenize_style, "encoding": encoding,
        "word_backend": word_backend() if tokenize_style == "word" else None})
    return cache_path(cache_dir, "tokens", fingerprint), fingerprint


def _write_token_cache(cache: str, fingerprint: str, blocks: Iterable[tuple],
                       tokenize_style: str, source: str, quiet: bool = False) -> None:
    """`blocks` of (line numbers [n], row lengths [n], the rows' ids end to end) as one flat id
    array with row offsets."""

    def write(h5: h5py.File) -> None:
        datasets = {name: h5.create_dataset(name, (0,), maxshape=(None,), dtype=dtype,
                                            chunks=(chunk,))
                    for name, dtype, chunk in (("input_ids", "int32", 1 << 18),
                                               ("offsets", "int64", _RowWriter.BLOCK),
                                               ("line_numbers", "int64", _RowWriter.BLOCK))}
        _append(datasets["offsets"], np.zeros(1, np.int64))
        total = 0
        for line_numbers, lengths, ids in blocks:
            _append(datasets["input_ids"], ids)
            _append(datasets["offsets"], total + np.cumsum(lengths))
            _append(datasets["line_numbers"], line_numbers)
            total += int(np.sum(lengths))
        h5.attrs.update({"format_version": FORMAT_VERSION, "tokenize_style": tokenize_style,
                         "source": os.path.abspath(source)})

    write_hdf5_atomically(cache, write, fingerprint)
    if not quiet:
        print(f"Built token cache {cache}")


def _append(dataset: h5py.Dataset, values) -> None:
    if len(values):
        ensure_free_space(dataset.file.filename, len(values) * dataset.dtype.itemsize)
        start = dataset.shape[0]
        dataset.resize((start + len(values),))
        dataset[start:] = np.asarray(values, dataset.dtype)


def read_token_cache(cache_file: str) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int32 [total], offsets int64 [N + 1]) of a token cache."""
    with h5py.File(cache_file, "r") as h5:
        return h5["input_ids"][:], h5["offsets"][:]
