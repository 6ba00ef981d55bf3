"""Pretraining memory: peak RSS of one epoch of train_bert_lm.py on a corpus 1x and 10x as large.

    python benchmarks/bench_memory.py [--lines 3000] [--repeat 10] [--skip_old] [--skip_data]

Corpus: the first --lines lines of the sample pretraining corpus (data/pretrain_corpus.txt, built
on first use); the 10x corpus is that file repeated. Each run is `train_bert_lm.py
--num_epochs=1 --preset=tiny --batch_size=64 --vocab_size=2000 --process_num=1` with its own
run directory and an empty --cache_dir under a temporary directory, so the measured epoch also
tokenizes and caches its corpus. A small vocabulary keeps the masked-LM head (and so the run time)
small; it does not change what grows with the corpus.
Every run is the only child of a fresh Python process, whose getrusage(RUSAGE_CHILDREN) then
is that run's peak RSS (one process: --process_num=1 tokenizes in it).
  streamed   this checkout: examples read from the HDF5 token cache a chunk at a time
  in memory  commit OLD_COMMIT (--old_commit; a git worktree at /tmp/wt_memory, removed after),
             the last before streaming: the whole token cache read, packed into one [N, L]
             array and shuffled in tf.data
Training a model on a 10x corpus takes long on 2 cores, so the script runs are on a small 1x; the
data pipeline alone (the datasets built and read for one epoch, no model) also runs on the whole
sample corpus and 10x that (88 MB of text, the size of the corpus that pushed the in-memory path
to 2.6 GB), its peak the process's VmHWM, both paths reading the same token cache.
The last line is the summary, checked by scripts; the tables go to
benchmarks/results/memory.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "memory.md"
OLD_TREE = Path("/tmp/wt_memory")
OLD_COMMIT = "1bbaa46"  # the last commit whose train_bert_lm.py held the whole corpus in memory
TRAIN_FLAGS = ["--num_epochs=1", "--preset=tiny", "--batch_size=64", "--vocab_size=2000",
               "--process_num=1"]
RUN_TIMEOUT = 900  # seconds; a run this slow means the machine is too busy to measure
DATA_VOCAB = 30_000  # train_bert_lm.py's default


# ----------------------------------------------------------------------------- measured in a child
def child_main(script: str, args: list[str]) -> None:
    """Run the training script as this process's only child; report its peak RSS."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          cwd=os.path.dirname(script), timeout=RUN_TIMEOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"error: {script} failed:\n{done.stderr[-3000:]}")
    summary = re.search(r"^pretrain .*\bsteps=(\d+)", done.stdout, re.MULTILINE)
    sequences = re.search(r"^(\d+) training and (\d+) validation sequences", done.stdout,
                          re.MULTILINE)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RESULT " + json.dumps({"peak_mib": peak, "seconds": seconds,
                                  "steps": int(summary.group(1)),
                                  "train_sequences": int(sequences.group(1))}))


def data_child_main(path: str, corpus: str, cache_dir: str) -> None:
    """Build one path's datasets from an existing cache, read an epoch of each; report VmHWM."""
    if path == "in_memory":
        sys.path.insert(0, str(OLD_TREE))
    import pretrain_task
    vocab, cache = pretrain_task.load_or_build_corpus_cache(corpus, "space", DATA_VOCAB,
                                                            cache_dir, process_num=1)
    start = time.perf_counter()
    datasets = (in_memory_datasets if path == "in_memory" else streamed_datasets)(
        pretrain_task, vocab, cache)
    batches = [sum(1 for _ in dataset) for dataset in datasets]
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    print("RESULT " + json.dumps({"peak_mib": peak, "seconds": time.perf_counter() - start,
                                  "steps": batches[0]}))


def streamed_datasets(pretrain_task, vocab, cache: str) -> tuple:
    settings = pretrain_task.PretrainingSettings(sequence_length=64, batch_size=64,
                                                 valid_fraction=0.05, seed=42)
    data = pretrain_task.make_pretraining_datasets(cache, vocab, settings)
    return data.train, data.valid


def in_memory_datasets(pretrain_task, vocab, cache: str) -> tuple:
    """What the old train_bert_lm.py built (its make_datasets without NSP)."""
    train, valid = pretrain_task.split_documents(pretrain_task.read_corpus(cache, vocab), 0.05,
                                                 42)
    train_rows, valid_rows = (pretrain_task.pack_sequences(split, 64) for split in (train, valid))
    return (pretrain_task.make_pretraining_dataset(train_rows, len(vocab), 64, seed=42),
            pretrain_task.make_pretraining_dataset(valid_rows, len(vocab), 64, shuffle=False,
                                                   seed=43, fixed_masks=True))


# ----------------------------------------------------------------------------- driver
def measure(script: Path, corpus: Path, work: Path, label: str) -> dict:
    run_args = [*TRAIN_FLAGS, f"--mask_lm_source_file={corpus}",
                f"--ckpt_dir={work / ('run_' + label)}", f"--cache_dir={work / ('cache_' + label)}"]
    command = [sys.executable, __file__, "--child", str(script), "--", *run_args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: the {label} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.rsplit("RESULT ", 1)[1])


def measure_data(path: str, corpus: Path, cache_dir: Path) -> dict:
    command = [sys.executable, __file__, "--data_child", path, "--corpus", str(corpus),
               "--cache_dir", str(cache_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    if done.returncode != 0:
        sys.exit(f"error: the {path} data run on {corpus} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.rsplit("RESULT ", 1)[1])


def build_cache(corpus: Path, cache_dir: Path) -> None:
    """In a child, so that this process stays small."""
    code = ("import pretrain_task; pretrain_task.load_or_build_corpus_cache("
            f"{str(corpus)!r}, 'space', {DATA_VOCAB}, {str(cache_dir)!r})")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)


def make_corpora(work: Path, lines: int | None, repeat: int, name: str = "corpus"
                 ) -> tuple[Path, Path]:
    from data.prepare import ensure_sample_data
    source = ensure_sample_data()["pretrain"]
    with open(source, encoding="utf-8") as f:
        text = "".join(line for _, line in zip(range(lines or 1 << 62), f))
    single, repeated = work / f"{name}_1x.txt", work / f"{name}_{repeat}x.txt"
    single.write_text(text, encoding="utf-8")
    with open(repeated, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            f.write(text)
    return single, repeated


def make_old_tree(commit: str) -> None:
    """A worktree of `commit`, whose train_bert_lm.py is the in-memory path."""
    remove_old_tree()
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(OLD_TREE),
                    commit], check=True, capture_output=True)


def remove_old_tree() -> None:
    if OLD_TREE.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(OLD_TREE)],
                       check=False, capture_output=True)
    shutil.rmtree(OLD_TREE, ignore_errors=True)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=False,
                   capture_output=True)


def corpus_size(corpus: Path) -> dict:
    with open(corpus, encoding="utf-8") as f:
        return {"lines": sum(1 for _ in f), "mb": corpus.stat().st_size / 1e6}


def table(runs: list[tuple[str, str, dict, dict]]) -> list[str]:
    rows = ["| path | corpus | lines | MB | steps an epoch | seconds | peak RSS (MiB) |",
            "|---|---|---|---|---|---|---|"]
    for path, label, size, run in runs:
        rows.append(f"| {path} | {label} | {size['lines']:,} | {size['mb']:.1f} | "
                    f"{run['steps']:,} | {run['seconds']:.0f} | {run['peak_mib']:.0f} |")
    return rows


def ratios(runs: list[tuple[str, str, dict, dict]]) -> dict[str, float]:
    """Peak RSS of each path's second run (the large corpus) over its first."""
    peaks: dict[str, list[float]] = {}
    for path, _, _, run in runs:
        peaks.setdefault(path, []).append(run["peak_mib"])
    return {path: large / small for path, (small, large) in peaks.items()}


def script_runs(work: Path, args: argparse.Namespace, out) -> list[tuple]:
    corpora = zip(("1x", f"{args.repeat}x"), make_corpora(work, args.lines, args.repeat))
    scripts = {"streamed": ROOT / "train_bert_lm.py"}
    if not args.skip_old:
        scripts["in memory (old)"] = OLD_TREE / "train_bert_lm.py"
    runs = []
    for label, corpus in corpora:
        for path, script in scripts.items():
            run = measure(script, corpus, work, f"{path.split()[0]}_{label}")
            out(f"train_bert_lm.py {path:>16} {label:>4}: {run['steps']} steps, "
                f"{run['seconds']:.0f} s, peak {run['peak_mib']:.0f} MiB")
            runs.append((path, label, corpus_size(corpus), run))
    return runs


def data_runs(work: Path, args: argparse.Namespace, out) -> list[tuple]:
    paths = ["streamed"] + ([] if args.skip_old else ["in_memory"])
    runs = []
    for label, corpus in zip(("1x", f"{args.repeat}x"),
                             make_corpora(work, None, args.repeat, "whole")):
        cache_dir = work / f"data_cache_{label}"
        build_cache(corpus, cache_dir)
        for path in paths:
            run = measure_data(path, corpus, cache_dir)
            out(f"data pipeline {path:>19} {label:>4}: {run['steps']} steps, "
                f"{run['seconds']:.0f} s, peak {run['peak_mib']:.0f} MiB")
            runs.append((path.replace("_", " ") + ("" if path == "streamed" else " (old)"),
                         label, corpus_size(corpus), run))
    return runs


def report(args: argparse.Namespace, scripts: list[tuple], data: list[tuple]) -> str:
    command = " ".join(["python benchmarks/bench_memory.py", f"--lines {args.lines}",
                        f"--repeat {args.repeat}"] + (["--skip_old"] * args.skip_old)
                       + (["--skip_data"] * args.skip_data))
    old = [] if args.skip_old else [f"The old path is commit {args.old_commit}."]
    text = [f"# Pretraining memory at 1x and {args.repeat}x corpus", "",
            f"`{command}` on {os.cpu_count()} cores (shared with other jobs, so the seconds "
            "are rough). `train_bert_lm.py` for one epoch, each run tokenizing into an empty "
            f"cache directory, with `{' '.join(TRAIN_FLAGS)}`. {' '.join(old)}", "",
            *table(scripts), ""]
    text += [f"- {path}: peak RSS {args.repeat}x / 1x = {ratio:.2f}"
             for path, ratio in ratios(scripts).items()]
    if data:
        text += ["", "The data pipeline alone (datasets built from an existing cache, one epoch "
                 "of training and validation batches read, no model), on the whole sample "
                 "corpus and 10x that:", "", *table(data), ""]
        text += [f"- {path}: peak RSS {args.repeat}x / 1x = {ratio:.2f}"
                 for path, ratio in ratios(data).items()]
    return "\n".join(text) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=3000,
                        help="lines of the sample corpus in the 1x corpus of the script runs")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--skip_old", action="store_true",
                        help="measure only this checkout, not the old in-memory path")
    parser.add_argument("--old_commit", default=OLD_COMMIT,
                        help="the commit whose in-memory path is the reference")
    parser.add_argument("--skip_data", action="store_true",
                        help="skip the data-pipeline runs on the whole sample corpus")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data_child", choices=["streamed", "in_memory"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        child_main(args.child, [a for a in rest if a != "--"])
        return
    if args.data_child:
        data_child_main(args.data_child, args.corpus, args.cache_dir)
        return
    printed = []

    def out(line: str) -> None:
        print(line, flush=True)
        printed.append(line)

    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        if not args.skip_old:
            make_old_tree(args.old_commit)
        try:
            scripts = script_runs(Path(tmp), args, out)
            data = [] if args.skip_data else data_runs(Path(tmp), args, out)
        finally:
            remove_old_tree()
    for kind, runs in (("train_bert_lm.py", scripts), ("data pipeline", data)):
        for path, ratio in ratios(runs).items():
            out(f"{kind}, {path}: peak RSS {args.repeat}x / 1x = {ratio:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report(args, scripts, data), encoding="utf-8")
    out(f"memory pretrain_rss_ratio_10x={ratios(scripts)['streamed']:.2f}")


if __name__ == "__main__":
    main()
