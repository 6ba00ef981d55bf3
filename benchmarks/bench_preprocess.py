"""Preprocessing speed and memory: our pipeline vs bare jieba, on the sample corpus at 1x and 10x.

    python benchmarks/bench_preprocess.py [--repeat 10] [--rounds 3] [--process_num N]

Corpus: data/pretrain_corpus.txt with the spaces between tokens removed, so the word segmenter has
the raw text to work on (29k reviews and paragraphs); the 10x corpus is that file repeated.
Every measurement runs in a fresh Python process, so peak memory is its own. On the 1x corpus
the three runs below are repeated in interleaved rounds (--rounds) and the ratios are medians.
  jieba      jieba.lcut on every line, one process (dictionary loaded before the clock starts)
  pipeline   end to end: load_or_build_corpus (word style), vocabulary and token cache in one
             tokenizing pass, a miss; beside it the former two passes (vocabulary, then cache)
  reload     load_or_build_corpus on the existing files + reading the cache's arrays
             (the median of 3 runs), compared with the pipeline run that built both
Informational lines: the 1x pipeline tokenizing in-process, with plain jieba, and the
classification cache (`word` tokens, length 512) of the mentions task's training documents
with their spaces removed (3x, to give the workers work), against jieba.lcut on the same texts.
Peak memory (of the pipeline run) = the process's VmHWM + process_num x the largest tokenizing
worker's peak (0 workers when it tokenizes in-process).
The last line is the summary, checked by scripts; everything printed also goes to
benchmarks/results/preprocess.txt.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORK = ROOT / "benchmarks" / "work"
RESULTS = ROOT / "benchmarks" / "results" / "preprocess.txt"
VOCAB_SIZE = 50_000
RELOADS_PER_ROUND = 3


# ----------------------------------------------------------------------------- measured in a child
def peak_rss_mib(workers: int) -> dict:
    """This process's peak RSS, the largest reaped child's, and own + workers x child, in MiB.

    `workers` is 0 when tokenizing ran in this process (any child was not a tokenizer).
    """
    with open("/proc/self/status") as f:
        own = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"own_mib": own, "child_mib": child, "total_mib": own + workers * child}


def run_jieba(corpus: str) -> dict:
    import jieba
    jieba.setLogLevel(60)
    jieba.initialize()
    start, lines = time.perf_counter(), 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                jieba.lcut(line.rstrip("\n"))
                lines += 1
    return {"lines": lines, "seconds": time.perf_counter() - start, **peak_rss_mib(0)}


def run_pipeline(corpus: str, cache_dir: str, process_num: int | None,
                 two_passes: bool = False) -> dict:
    """What train_bert_lm.py runs: vocabulary + token cache in one tokenizing pass (or, with
    `two_passes`, the former way: a vocabulary pass, then a cache pass)."""
    import h5py

    import data_util_hdf5 as data_util
    workers = data_util.resolve_process_num(process_num, "word")
    start = time.perf_counter()
    if two_passes:
        vocab = data_util.build_vocabulary([corpus], "word", VOCAB_SIZE, process_num=process_num)
        cache = data_util.load_or_build_token_cache(corpus, vocab, "word", cache_dir,
                                                    process_num=process_num)
    else:
        _, cache = data_util.load_or_build_corpus(corpus, "word", VOCAB_SIZE, cache_dir,
                                                  process_num=process_num)
    seconds = time.perf_counter() - start
    with h5py.File(cache, "r") as h5:  # shapes only: holding the ids would grow with the corpus
        lines, tokens = h5["offsets"].shape[0] - 1, h5["input_ids"].shape[0]
    return {"lines": lines, "tokens": tokens, "seconds": seconds,
            "backend": data_util.word_backend(),
            **peak_rss_mib(workers if workers > 1 else 0)}


def run_labelled(corpus: str, cache_dir: str) -> dict:
    """The classification cache of a labelled file, with the vocabulary of the 1x corpus (as a
    fine-tuning run has its pretraining's), built before the clock starts."""
    import data_util_hdf5 as data_util
    vocab, _ = data_util.load_or_build_corpus(str(WORK / "raw_1x.txt"), "word", VOCAB_SIZE,
                                              cache_dir)
    labels = data_util.build_label_list(corpus)
    start = time.perf_counter()
    data_util.load_or_build_classification_cache({"train": corpus}, vocab, labels, 512, "word",
                                                 cache_dir)
    seconds = time.perf_counter() - start
    return {"lines": len(data_util.read_classification_split(
        str(next(Path(cache_dir).glob("classification-*.h5"))), "train")[0]),
        "seconds": seconds}


def run_reload(corpus: str, cache_dir: str) -> dict:
    import data_util_hdf5 as data_util
    start = time.perf_counter()
    _, cache = data_util.load_or_build_corpus(corpus, "word", VOCAB_SIZE, cache_dir)
    ids, offsets = data_util.read_token_cache(cache)
    return {"lines": len(offsets) - 1, "seconds": time.perf_counter() - start, **peak_rss_mib(0)}


def child_main(args: argparse.Namespace) -> None:
    if args.child == "jieba":
        result = run_jieba(args.corpus)
    elif args.child == "labelled":
        result = run_labelled(args.corpus, args.cache_dir)
    elif args.child in ("pipeline", "two_passes"):
        result = run_pipeline(args.corpus, args.cache_dir, args.process_num,
                              args.child == "two_passes")
    else:
        result = run_reload(args.corpus, args.cache_dir)
    print("RESULT " + json.dumps(result))


# ----------------------------------------------------------------------------- driver
def in_fresh_process(kind: str, corpus: Path, cache_dir: Path | None = None,
                     process_num: int | None = None, env: dict | None = None) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--corpus", str(corpus)]
    if cache_dir:
        command += ["--cache_dir", str(cache_dir)]
    if process_num:
        command += ["--process_num", str(process_num)]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        sys.exit(f"error: the {kind} run on {corpus} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.rsplit("RESULT ", 1)[1])


def make_corpora(repeat: int) -> tuple[Path, Path]:
    from data.prepare import ensure_sample_data
    source = ensure_sample_data()["pretrain"]
    WORK.mkdir(parents=True, exist_ok=True)
    single, repeated = WORK / "raw_1x.txt", WORK / f"raw_{repeat}x.txt"
    with open(source, encoding="utf-8") as f:
        text = "".join("".join(line.split()) + "\n" for line in f)
    single.write_text(text, encoding="utf-8")
    with open(repeated, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            f.write(text)
    return single, repeated


def make_labelled(repeat: int) -> tuple[Path, Path]:
    """The mentions task's training file with the spaces between tokens removed (labels kept),
    `repeat` times, and its texts alone (for jieba)."""
    from data.prepare import ensure_sample_data
    source = ensure_sample_data()["mentions"]["train"]
    labelled, texts = WORK / f"mentions_raw_{repeat}x.txt", WORK / f"mentions_texts_{repeat}x.txt"
    rows = []
    with open(source, encoding="utf-8") as f:
        for line in f:
            words = line.split()
            rows.append(("".join(w for w in words if not w.startswith("__label__")),
                         " ".join(w for w in words if w.startswith("__label__"))))
    labelled.write_text("".join(f"{text} {labels}\n" for text, labels in rows) * repeat,
                        encoding="utf-8")
    texts.write_text("".join(f"{text}\n" for text, _ in rows) * repeat, encoding="utf-8")
    return labelled, texts


def labelled_variant(repeat: int, out) -> None:
    labelled, texts = make_labelled(repeat)
    cache_dir = WORK / "cache_labelled"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.mkdir(parents=True)
    jieba = in_fresh_process("jieba", texts)
    ours = in_fresh_process("labelled", labelled, cache_dir)
    rate, jieba_rate = ours["lines"] / ours["seconds"], jieba["lines"] / jieba["seconds"]
    out(f"  labelled: classification cache of {ours['lines']:,} mentions documents ({repeat}x, "
        f"word, length 512): {rate:,.0f} lines/s = {rate / jieba_rate:.2f}x jieba.lcut on the "
        f"same texts ({jieba_rate:,.0f} lines/s)")


def measure(corpus: Path, label: str, process_num: int | None, rounds: int, out) -> dict:
    """`rounds` of (jieba, pipeline, reload) interleaved, so both arms meet the machine's slow
    and fast spells alike; the ratios are per round, reported as median and best."""
    cache_dir = WORK / f"cache_{label}"
    jieba_rates, speedups, reloads, ours = [], [], [], {}
    for _ in range(rounds):
        shutil.rmtree(cache_dir, ignore_errors=True)
        cache_dir.mkdir(parents=True)
        jieba = in_fresh_process("jieba", corpus)
        ours = in_fresh_process("pipeline", corpus, cache_dir, process_num)
        # a reload takes a tenth of a second, where one sample is at the mercy of the machine
        reload_seconds = np.median([in_fresh_process("reload", corpus, cache_dir)["seconds"]
                                    for _ in range(RELOADS_PER_ROUND)])
        jieba_rates.append(jieba["lines"] / jieba["seconds"])
        speedups.append(ours["lines"] / ours["seconds"] / jieba_rates[-1])
        reloads.append(ours["seconds"] / reload_seconds)
    shutil.rmtree(cache_dir)
    cache_dir.mkdir()
    former = in_fresh_process("two_passes", corpus, cache_dir, process_num)
    jieba_rate = float(np.median(jieba_rates))
    speedup, reload_speedup = float(np.median(speedups)), float(np.median(reloads))
    former_rate = former["lines"] / former["seconds"]
    out(f"{label:>4} {ours['lines']:>8,} lines, {rounds} round(s) | jieba.lcut {jieba_rate:>6,.0f} "
        f"lines/s | pipeline ({ours['backend']}, one pass) {speedup:.2f}x jieba (best "
        f"{max(speedups):.2f}x; two passes, one run: {former_rate / jieba_rate:.2f}x) | reload "
        f"{reload_speedup:.0f}x faster than building (best {max(reloads):.0f}x) | peak "
        f"{ours['total_mib']:.0f} MiB (jieba.lcut alone {jieba['own_mib']:.0f})")
    return {"speedup": speedup, "reload": reload_speedup, "rss": ours["total_mib"],
            "jieba_rate": jieba_rate}


def variant(corpus: Path, label: str, process_num: int | None, env: dict, jieba_rate: float,
            out) -> None:
    """An informational 1x pipeline run with other settings."""
    cache_dir = WORK / "cache_variant"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.mkdir(parents=True)
    ours = in_fresh_process("pipeline", corpus, cache_dir, process_num, env)
    rate = ours["lines"] / ours["seconds"]
    out(f"  1x {label}: {rate:,.0f} lines/s end to end = {rate / jieba_rate:.2f}x jieba.lcut; "
        f"peak {ours['total_mib']:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--process_num", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds (jieba, pipeline, reload) on the 1x corpus")
    parser.add_argument("--rounds_large", type=int, default=1,
                        help="the same on the large corpus (jieba alone takes minutes there)")
    parser.add_argument("--skip_variants", action="store_true",
                        help="skip the informational runs (one process, plain jieba)")
    parser.add_argument("--child", choices=["jieba", "pipeline", "two_passes", "reload",
                                            "labelled"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    lines = []

    def out(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    out(f"preprocessing benchmark, {os.cpu_count()} cores, process_num="
        f"{args.process_num or 'default'}, vocab_size={VOCAB_SIZE:,}")
    single, repeated = make_corpora(args.repeat)
    small = measure(single, "1x", args.process_num, args.rounds, out)
    large = measure(repeated, f"{args.repeat}x", args.process_num, args.rounds_large, out)
    if not args.skip_variants:
        variant(single, "rjieba in-process (--process_num 1)", 1, {}, small["jieba_rate"], out)
        variant(single, "WORD_BACKEND=jieba (no rjieba), default pool", None,
                {"WORD_BACKEND": "jieba"}, small["jieba_rate"], out)
        labelled_variant(3, out)
    out(f"preprocess speedup_vs_jieba={min(small['speedup'], large['speedup']):.2f} "
        f"cache_reload_speedup={min(small['reload'], large['reload']):.1f} "
        f"rss_ratio_10x={large['rss'] / small['rss']:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
