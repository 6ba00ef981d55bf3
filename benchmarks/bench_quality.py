"""Does masked-LM pretraining lift F1 over a tuned from-scratch model, and over fastText / TF-IDF?

    pip install -r benchmarks/requirements.txt
    python benchmarks/bench_quality.py            # the README figures (hours on 2 cores; --resume)
    python benchmarks/bench_quality.py --quick    # every row, tiny settings, for checking

For each sample task (sentiment, entities, mentions) and label budget (small: 1,000 labelled
training lines; full: the whole training split) it trains fastText and TF-IDF + logistic
regression (tuned on valid), the TextCNN and Transformer classifiers from scratch (learning rate
searched on valid with one seed, then two more seeds at the chosen rate) and fine-tuned from a
masked-LM pretraining on the training-split text with the script's DEFAULT flags (three seeds, no
search). Every model turns probabilities into labels with per-label thresholds tuned on valid.
The neural runs call the user-facing scripts, so the figures are what a user gets. Writes
benchmarks/results/quality.json, quality.md and quality.png. `--pretrain_budgets` adds the TextCNN
pretrained for 1, 3 and 10 epochs, fine-tuned on each task's small budget.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import classifier_task  # noqa: E402
import data_util_hdf5 as data_util  # noqa: E402
import run_directory  # noqa: E402
import model  # noqa: E402
from data.prepare import ensure_sample_data  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
RESULTS_NAME = "quality"
RESUME = False  # --resume: finished runs with the same command are read back
WORK = os.path.join(ROOT, "benchmarks", "work")
TASKS = ("sentiment", "entities", "mentions")
BUDGETS = ("small", "full")
SMALL_BUDGET_LINES = 1000
SEEDS = (42, 43, 44)
BACKBONE_NAMES = {"textcnn": "TextCNN", "transformer": "Transformer"}
MODELS = ("fasttext", "tfidf_lr", "textcnn_scratch", "textcnn_pretrained",
          "transformer_scratch", "transformer_pretrained")

# What the README figures use. The scripts choose the sequence length (None: no flag), and the
# pretrained arm passes no training flag at all: its figures are those of the fine-tuning
# script's defaults.
FULL = {
    "sequence_length": {"sentiment": None, "entities": None, "mentions": None},
    "pretrain_lines": None,
    "full_lines": None,
    "pretrain": {"textcnn": ["--preset=small", "--num_epochs=3", "--learning_rate=1e-3",
                             "--vocab_size=20000"],
                 # 10 epochs, not 3: at 3 (valid masked-LM accuracy 0.121) the fine-tuned
                 # Transformer was 0.011 under TF-IDF + LR on sentiment/small, at 10 (0.188)
                 # 0.001 (benchmarks/results/quality_v6_sentiment_transformer_pretrained.md)
                 "transformer": ["--preset=small", "--num_layer=2", "--learning_rate=5e-4",
                                 "--warmup_steps=300", "--vocab_size=20000", "--num_epochs=10"]},
    "pretrain_budget_epochs": (1, 3, 10),
    "model": {"textcnn": ["--preset=small", "--vocab_size=20000"],
              "transformer": ["--preset=small", "--num_layer=2", "--vocab_size=20000"]},
    "batch_size": 64,
    "scratch_lr": (3e-4, 1e-3, 3e-3),
    "seeds": SEEDS,
    "pretrained_flags": [],
    "fasttext_grid": [(lr, ep) for lr in (0.5, 1.0) for ep in (25, 50)],
    "tfidf_c": (1.0, 10.0, 100.0),
}
# Every row on slices of the data with tiny models: checks the machinery, not the figures.
QUICK = {
    "sequence_length": {"sentiment": 32, "entities": 48, "mentions": 96},
    "pretrain_lines": 2000,
    "full_lines": 2000,
    "pretrain": {"textcnn": ["--preset=tiny", "--num_epochs=1", "--learning_rate=1e-3"],
                 "transformer": ["--preset=tiny", "--num_layer=2", "--num_epochs=1",
                                 "--learning_rate=5e-4"]},
    "pretrain_budget_epochs": (1, 2),
    "model": {"textcnn": ["--preset=tiny", "--num_epochs=2"],
              "transformer": ["--preset=tiny", "--num_layer=2", "--num_epochs=2"]},
    "batch_size": 64,
    "scratch_lr": (1e-3,),
    "seeds": (42, 43),
    "pretrained_flags": ["--num_epochs=2"],
    "fasttext_grid": [(0.5, 5)],
    "tfidf_c": (10.0,),
    # apart from the full runs', so that a check never overwrites a run --resume reuses
    "run_root": os.path.join(WORK, "quick"),
}


# ------------------------------------------------------------------------------ data
def read_labelled(path: str) -> tuple[list[str], list[list[str]]]:
    texts, labels = [], []
    for _, line in data_util.read_lines(path):
        text, line_labels = data_util.parse_label_line(line)
        if line_labels:
            texts.append(text.strip())
            labels.append(line_labels)
    return texts, labels


def sample_lines(source: str, count: int | None, path: str, seed: int = 42) -> str:
    """`count` lines of `source` drawn with a fixed seed, in their original order."""
    if count is None:
        return source
    lines = open(source, encoding="utf-8").read().splitlines()
    chosen = np.random.default_rng(seed).choice(len(lines), min(count, len(lines)), replace=False)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines[i] for i in sorted(chosen)) + "\n")
    return path


def multi_hot(labels: list[list[str]], names: list[str]) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    out = np.zeros((len(labels), len(names)), np.uint8)
    for row, line_labels in enumerate(labels):
        for label in line_labels:
            if label in index:
                out[row, index[label]] = 1
    return out


# --------------------------------------------------------------------- classic models
def run_tfidf(files: dict, grid) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    start = time.time()
    data = {split: read_labelled(path) for split, path in files.items()}
    names = data_util.build_label_list(files["train"])
    vectorizer = TfidfVectorizer(token_pattern=r"\S+", ngram_range=(1, 2), sublinear_tf=True,
                                 min_df=2)
    x = {"train": vectorizer.fit_transform(data["train"][0])}
    x.update({s: vectorizer.transform(data[s][0]) for s in ("valid", "test")})
    y = {s: multi_hot(data[s][1], names) for s in data}
    best = None
    for c in grid:
        # liblinear: the same objective as lbfgs (bar the intercept's penalty), ~10x faster on
        # hundreds of sparse one-vs-rest problems
        classifier = OneVsRestClassifier(LogisticRegression(C=c, max_iter=2000,
                                                            solver="liblinear"))
        classifier.fit(x["train"], y["train"])
        valid_probs = classifier.predict_proba(x["valid"])
        thresholds = model.tune_thresholds(y["valid"], valid_probs)
        valid = model.f1_scores(y["valid"], valid_probs, thresholds)["f1"]
        if best is None or valid > best[0]:
            best = (valid, c, classifier, thresholds)
    test_probs = best[2].predict_proba(x["test"])
    return classic_row(y["test"], test_probs, best[3], best[0], f"C={best[1]}",
                       time.time() - start)


def run_fasttext(files: dict, grid, multi_label: bool) -> dict:
    import fasttext

    start = time.time()
    names = data_util.build_label_list(files["train"])
    data = {s: read_labelled(p) for s, p in files.items()}
    y = {s: multi_hot(data[s][1], names) for s in data}
    best = None
    for lr, epoch in grid:
        # thread >= 2: with one thread fastText 0.9.3 leaves weights uninitialised (BASELINES.md)
        classifier = fasttext.train_supervised(
            files["train"], lr=lr, epoch=epoch, wordNgrams=2, dim=100,
            loss="ova" if multi_label else "softmax", thread=2, seed=1, verbose=0)
        valid_probs = fasttext_probs(classifier, data["valid"][0], names)
        thresholds = model.tune_thresholds(y["valid"], valid_probs)
        valid = model.f1_scores(y["valid"], valid_probs, thresholds)["f1"]
        if best is None or valid > best[0]:
            best = (valid, (lr, epoch), classifier, thresholds)
    test_probs = fasttext_probs(best[2], data["test"][0], names)
    return classic_row(y["test"], test_probs, best[3], best[0],
                       f"lr={best[1][0]} epoch={best[1][1]}", time.time() - start)


def fasttext_probs(classifier, texts: list[str], names: list[str]) -> np.ndarray:
    labels, probs = classifier.predict(texts, k=-1, threshold=0.0)
    out = np.zeros((len(texts), len(names)))
    index = {n: i for i, n in enumerate(names)}
    for row, (row_labels, row_probs) in enumerate(zip(labels, probs)):
        for label, p in zip(row_labels, row_probs):
            name = label.replace("__label__", "")
            if name in index:
                out[row, index[name]] = p
    return out


def classic_row(gold: np.ndarray, probabilities: np.ndarray, thresholds: np.ndarray,
                valid_f1: float, chosen: str, seconds: float) -> dict:
    """Test scores with the thresholds tuned on valid (and, for reference, with p >= 0.5)."""
    test = model.f1_scores(gold, probabilities, thresholds)
    return {"test_micro_f1": test["micro_f1"], "test_macro_f1": test["macro_f1"],
            "test_f1": test["f1"], "test_f1_sd": 0.0, "seeds": 1,
            "test_f1_half": model.f1_scores(gold, probabilities)["f1"], "valid_f1_epoch1": None,
            "valid_f1_best": valid_f1, "seconds": round(seconds, 1), "chosen": chosen}


# ---------------------------------------------------------------------- neural models
def run_script(script: str, flags: list[str], log_name: str) -> dict:
    """Run one of the user-facing scripts; return its summary line as a dict."""
    os.makedirs(os.path.join(WORK, "logs"), exist_ok=True)
    log_path = os.path.join(WORK, "logs", log_name + ".log")
    with open(log_path, "w", encoding="utf-8") as log:
        result = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=log, text=True)
        log.write(result.stdout)
    if result.returncode != 0:
        raise RuntimeError(f"{script} failed, see {log_path}")
    last = [line for line in result.stdout.splitlines() if "=" in line and " " in line][-1]
    return dict(part.split("=", 1) for part in last.split()[1:])


def training_seconds(run_dir: str, wall: float) -> float:
    """The run's epochs' own wall times summed from its history: a run resumed after a kill
    counts every epoch once, and time between invocations not at all. Histories written before
    the epochs were timed fall back to `wall`, this invocation's time."""
    history = run_directory.read_json_file(os.path.join(run_dir, "history.json"), [])
    if history and all("seconds" in h for h in history):
        return round(sum(h["seconds"] for h in history), 1)
    return round(wall, 1)


def pretrain(backbone: str, settings: dict, corpus: str, suffix: str, resume: bool,
             epochs: int | None = None) -> dict:
    """One masked-LM pretraining run (its --num_epochs replaced by `epochs` when given)."""
    flags = list(settings["pretrain"][backbone])
    if epochs is not None:
        flags = [f for f in flags if not f.startswith("--num_epochs")] + [f"--num_epochs={epochs}"]
    name = pretraining_name(backbone, suffix, pretraining_epochs(flags))
    run_dir = os.path.join(WORK, name)
    record = os.path.join(run_dir, "benchmark_pretraining.json")
    if resume and os.path.exists(record):
        done = run_directory.read_json_file(record)
        if sorted(done["flags"].split()) != sorted(flags):
            sys.exit(f"error: {record} was pretrained with {done['flags']}, not "
                     f"{' '.join(flags)}; move that directory away or drop --resume")
        # the directory it sits in, not the one it was written in: a work tree copied or
        # mounted elsewhere resumes too
        return {**done, "run_dir": run_dir}
    # a long pretraining killed part-way continues from its last epoch under --resume: the
    # script resumes a directory whose run has the same fingerprint (and refuses, with a
    # message, one that differs)
    fresh = [] if resume and os.path.isdir(run_dir) else ["--overwrite=True"]
    start = time.time()
    values = run_script("train_bert_lm.py", [f"--backbone={backbone}", f"--ckpt_dir={run_dir}",
                                             f"--mask_lm_source_file={corpus}",
                                             "--sequence_length_lm=64", *fresh, *flags], name)
    values["seconds"] = training_seconds(run_dir, time.time() - start)
    values["flags"] = " ".join(flags)
    values["run_dir"] = run_dir
    run_directory.write_json_file(record, values)
    return values


def run_command(kind: str, backbone: str, task: str, budget: str, files: dict, settings: dict,
                pretrained_dir: str | None, seed: int, lr: float | None
                ) -> tuple[str, list[str], str, str]:
    """(script, flags, run directory, log name) of one training run."""
    length = settings["sequence_length"][task]
    common = [f"--training_data_file={files['train']}", f"--valid_data_file={files['valid']}",
              f"--test_data_file={files['test']}", f"--batch_size={settings['batch_size']}",
              f"--seed={seed}"] + ([f"--sequence_length={length}"] if length else [])
    tag = f"{kind}_seed{seed}" + (f"_lr{lr:g}" if lr else "")
    run_dir = os.path.join(settings.get("run_root", WORK), task, budget, tag)
    if pretrained_dir:
        return ("train_bert_fine_tuning.py",
                [*common, f"--pretrained_dir={pretrained_dir}", *settings["pretrained_flags"],
                 f"--ckpt_dir_save={run_dir}", "--overwrite=True"], run_dir,
                f"{task}_{budget}_{tag}")
    return ("train_transform.py",
            [*common, f"--backbone={backbone}", *settings["model"][backbone],
             f"--learning_rate={lr}", f"--ckpt_dir_save={run_dir}", "--overwrite=True"], run_dir,
            f"{task}_{budget}_{tag}")


def run_one(kind: str, backbone: str, task: str, budget: str, files: dict, settings: dict,
            pretrained_dir: str | None, seed: int, lr: float | None) -> dict:
    """One training run through the user's script; its scores and validation curve. With
    --resume, a run that finished with the same command and recipe version
    (classifier_task.RECIPE_VERSION) is read back instead of repeated."""
    script, flags, run_dir, log_name = run_command(kind, backbone, task, budget, files, settings,
                                                   pretrained_dir, seed, lr)
    record_path = os.path.join(run_dir, "benchmark_run.json")
    record = run_directory.read_json_file(record_path, {}) if RESUME else {}
    if record.get("recipe") == classifier_task.RECIPE_VERSION and \
            same_command(record.get("command", []), [script, *flags]):
        return record["run"]
    start = time.time()
    values = run_script(script, flags, log_name)
    history = run_directory.read_json_file(os.path.join(run_dir, "history.json"))
    run = {"seed": seed, "lr": lr, "test_f1": float(values["test_f1"]),
           "test_micro_f1": float(values["test_micro_f1"]),
           "test_macro_f1": float(values["test_macro_f1"]),
           "valid_curve": [h["val_f1"] for h in history], "seconds": round(time.time() - start, 1)}
    print(f"  {task}/{budget} {log_name}: valid best {max(run['valid_curve']):.4f} after "
          f"{len(history)} epochs, test {run['test_f1']:.4f}", flush=True)
    run_directory.write_json_file(record_path, {"command": [script, *flags], "run": run,
                                                "recipe": classifier_task.RECIPE_VERSION})
    return run


# a flag's path up to the repository's own part (benchmarks/work/..., data/...)
_CLONE_ROOT = re.compile(r"=/\S*?/(benchmarks/work/|data/)")


def same_command(recorded: list[str], command: list[str]) -> bool:
    """Whether `recorded` ran `command`, perhaps from another clone of this repository (the
    benchmarks run from scratch clones whose benchmarks/work links to one real directory)."""
    def portable(parts: list[str]) -> list[str]:
        return [_CLONE_ROOT.sub(r"=<root>/\1", part) for part in parts]

    return portable(recorded) == portable(command)


def run_classifier(kind: str, backbone: str, task: str, budget: str, files: dict,
                   settings: dict, pretrained_dir: str | None) -> dict:
    """Pretrained: the script's defaults with every seed. Scratch: every learning rate of the
    grid with the first seed, the best on valid F1 then with the other seeds."""
    seeds = settings["seeds"]
    if pretrained_dir:
        runs, chosen, grid = [run_one(kind, backbone, task, budget, files, settings,
                                      pretrained_dir, seed, None) for seed in seeds], "defaults", {}
    else:
        search = [run_one(kind, backbone, task, budget, files, settings, None, seeds[0], lr)
                  for lr in settings["scratch_lr"]]
        best = max(search, key=lambda r: max(r["valid_curve"]))
        grid = {f"{r['lr']:g}": max(r["valid_curve"]) for r in search}
        runs = [best] + [run_one(kind, backbone, task, budget, files, settings, None, seed,
                                 best["lr"]) for seed in seeds[1:]]
        chosen = f"lr={best['lr']:g}"
    return seed_row(runs, chosen, grid, search_seconds=sum(
        r["seconds"] for r in ([] if pretrained_dir else search)))


def seed_row(runs: list[dict], chosen: str, grid: dict, search_seconds: float) -> dict:
    """Mean and sd over seeds; the curve shown is the first seed's."""
    def mean(key):
        return float(np.mean([r[key] for r in runs]))

    return {"test_micro_f1": mean("test_micro_f1"), "test_macro_f1": mean("test_macro_f1"),
            "test_f1": mean("test_f1"),
            "test_f1_sd": float(np.std([r["test_f1"] for r in runs], ddof=1))
            if len(runs) > 1 else 0.0,
            "seeds": len(runs), "test_f1_runs": [r["test_f1"] for r in runs],
            "valid_f1_epoch1": float(np.mean([r["valid_curve"][0] for r in runs])),
            "valid_f1_best": float(np.mean([max(r["valid_curve"]) for r in runs])),
            "epochs": [len(r["valid_curve"]) for r in runs],
            "seconds": round(float(np.mean([r["seconds"] for r in runs])), 1),
            "seconds_all_lr": round(search_seconds + sum(r["seconds"] for r in runs[1:])
                                    + (0 if search_seconds else runs[0]["seconds"]), 1),
            "chosen": chosen, "valid_curve": runs[0]["valid_curve"],
            "valid_curves": [r["valid_curve"] for r in runs], "lr_grid": grid}


# ----------------------------------------------------------------------------- report
def seed_count(r: dict) -> str:
    return f"{r.get('seeds', 1)} seed" + ("s" if r.get("seeds", 1) > 1 else "")


def fmt_f1(r: dict) -> str:
    return f"**{r['test_f1']:.3f}**" + (f" ± {r['test_f1_sd']:.3f}" if r.get("seeds", 1) > 1
                                        else "")


def write_table(results: dict, pretraining: dict, settings_name: str, seconds: float,
                budgets_study: dict | None = None) -> str:
    lines = [f"Test average F1 ((micro + macro) / 2), mean ± sd over seeds for the neural rows; "
             f"settings: {settings_name}; total {seconds / 60:.0f} min on {os.cpu_count()} CPU "
             "cores. Every row labels with per-label thresholds tuned on valid.", ""]
    for task in results:
        lines += [f"**{task}**", "",
                  "| model | budget | test micro-F1 | test macro-F1 | test F1 | seeds | "
                  "valid F1 epoch 1 | valid F1 best | epochs run | chosen | seconds a run |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for budget in results[task]:
            for name, r in results[task][budget].items():
                epoch1 = "–" if r["valid_f1_epoch1"] is None else f"{r['valid_f1_epoch1']:.3f}"
                epochs = "–" if "epochs" not in r else "/".join(map(str, r["epochs"]))
                lines.append(f"| {name} | {budget} | {r['test_micro_f1']:.3f} | "
                             f"{r['test_macro_f1']:.3f} | {fmt_f1(r)} | {r.get('seeds', 1)} | "
                             f"{epoch1} | {r['valid_f1_best']:.3f} | {epochs} | {r['chosen']} | "
                             f"{r['seconds']:.0f} |")
        lines.append("")
    lines.append("Gains of the default fine-tuning over the tuned from-scratch model (same "
                 "backbone; 'counts' when larger than 2 sd of the difference, "
                 "sqrt(sd_a² + sd_b²)):")
    for gain in gains(results):
        noise = (f"2 sd {2 * gain['sd']:.3f}, {'counts' if gain['counts'] else 'within noise'}"
                 if gain["seeded"] else "one seed: noise not measured, does not count")
        lines.append(f"- {gain['task']}/{gain['budget']} {gain['backbone']}: "
                     f"{gain['gain']:+.3f} ({noise}); vs TF-IDF + LR {gain['vs_tfidf']:+.3f}")
    lines.append("")
    lines.append("Pretraining (once per backbone, on the training-split text of the sample "
                 "tasks):")
    for backbone, p in pretraining.items():
        lines.append(f"- {backbone}: {p['flags']}, {p.get('epochs')} epochs, {p.get('steps')} "
                     f"steps, {p['seconds']:.0f} s, best valid masked-LM accuracy "
                     f"{float(p['best_valid_mlm_accuracy']):.3f}")
    if budgets_study:
        lines += ["", f"Pretraining budget ({study_backbone(budgets_study)}; fine-tuned with "
                  "the defaults on each task's small budget; test F1 mean ± sd over seeds):", "",
                  "| pretraining epochs | seconds | valid masked-LM accuracy | "
                  + " | ".join(budgets_study["tasks"]) + " |",
                  "|---|---|---|" + "---|" * len(budgets_study["tasks"])]
        for row in budgets_study["rows"]:
            lines.append(f"| {row['epochs']} | {row['seconds']:.0f} | {row['mlm_accuracy']:.3f} | "
                         + " | ".join(f"{fmt_f1(row[t])} ({seed_count(row[t])})"
                                      for t in budgets_study["tasks"] if t in row) + " |")
    return "\n".join(lines) + "\n"


def gains(results: dict) -> list[dict]:
    """Per task, budget and backbone: pretrained (defaults) minus tuned scratch, with its noise."""
    out = []
    for task in results:
        for budget, cell in results[task].items():
            for backbone in ("textcnn", "transformer"):
                pre, scratch = cell.get(f"{backbone}_pretrained"), cell.get(f"{backbone}_scratch")
                if not pre or not scratch:
                    continue
                sd = float(np.hypot(pre["test_f1_sd"], scratch["test_f1_sd"]))
                gain = pre["test_f1"] - scratch["test_f1"]
                tfidf = cell.get("tfidf_lr", {}).get("test_f1", float("nan"))
                # one seed a row gives no estimate of the noise: such a gain never counts
                seeded = min(pre.get("seeds", 1), scratch.get("seeds", 1)) > 1
                out.append({"task": task, "budget": budget, "backbone": backbone, "gain": gain,
                            "sd": sd, "counts": seeded and gain > 2 * sd, "seeded": seeded,
                            "vs_tfidf": pre["test_f1"] - tfidf})
    return out


def summary(results: dict) -> str:
    """The benchmark's last line: the issue's targets as measured."""
    found = gains(results)
    best_vs_tfidf = []
    for task in results:
        for cell in results[task].values():
            pre = [r["test_f1"] for n, r in cell.items() if n.endswith("_pretrained")]
            if pre and "tfidf_lr" in cell:
                best_vs_tfidf.append(max(pre) - cell["tfidf_lr"]["test_f1"])
    small_gain_tasks = sorted({g["task"] for g in found if g["budget"] == "small"
                               and g["gain"] >= 0.05 and g["counts"]})
    within3 = []
    for budget, cell in results.get("mentions", {}).items():
        for backbone in ("textcnn", "transformer"):
            pre, scratch = cell.get(f"{backbone}_pretrained"), cell.get(f"{backbone}_scratch")
            if pre and scratch:
                early = np.mean([max(c[:3]) for c in pre["valid_curves"]])
                within3.append(f"{budget}_{backbone}:{early - scratch['valid_f1_best']:+.3f}")
    return (f"quality tasks={','.join(results)} "
            f"default_ft_vs_scratch_min="
            f"{min((g['gain'] for g in found), default=float('nan')):.4f} "
            f"default_ft_vs_tfidf_min={min(best_vs_tfidf, default=float('nan')):.4f} "
            f"small_gain_tasks={len(small_gain_tasks)}({','.join(small_gain_tasks)}) "
            f"mentions_valid3_vs_scratch_best={';'.join(within3) or 'n/a'}")


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [(t, b) for t in results for b in BUDGETS if results[t].get(b)]  # only those run
    columns = min(2, len(cells))
    rows = -(-len(cells) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(cells):]:
        ax.set_visible(False)
    for ax, (task, budget) in zip(axes.flat, cells):
        for name, r in results[task].get(budget, {}).items():
            if r.get("valid_curve"):
                curve = r["valid_curve"]
                ax.plot(range(1, len(curve) + 1), curve, marker="o", ms=3, label=name)
            else:
                ax.axhline(r["valid_f1_best"], ls="--", lw=1, label=name,
                           color="grey" if name == "fasttext" else "black")
        ax.set_title(f"{task}, {budget} budget")
        ax.set_xlabel("epoch")
        ax.set_ylabel("valid average F1")
        ax.grid(alpha=0.3)
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def study_backbone(study: dict) -> str:
    """The display name of a pretraining-budget study's backbone (studies written before the
    study took a backbone were the TextCNN's)."""
    return BACKBONE_NAMES[study.get("backbone", "textcnn")]


def plot_budgets(study: dict, path: str) -> None:
    """Downstream test F1 and valid masked-LM accuracy against the pretraining epochs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = study["rows"]
    epochs = [row["epochs"] for row in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for task in study["tasks"]:
        points = [(row["epochs"], row[task]["test_f1"], row[task]["test_f1_sd"])
                  for row in rows if task in row]
        if points:
            x, y, sd = zip(*points)
            ax.errorbar(x, y, yerr=sd, marker="o", ms=4, capsize=3, label=f"{task} test F1")
    ax.set_xscale("log")
    ax.minorticks_off()  # a log axis would label 2, 4, ... beside the budgets
    ax.set_xticks(epochs, [str(e) for e in epochs])
    ax.set_xlabel(f"{study_backbone(study)} pretraining epochs")
    ax.set_ylabel("test average F1 (small budget)")
    ax.grid(alpha=0.3)
    accuracy = ax.twinx()
    accuracy.plot(epochs, [row["mlm_accuracy"] for row in rows], color="grey", ls="--",
                  marker="s", ms=3, label="valid masked-LM accuracy")
    accuracy.set_ylabel("valid masked-LM accuracy")
    handles = [h for a in (ax, accuracy) for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_reports(results: dict, pretraining: dict, settings_name: str, seconds: float,
                  suffix: str, budgets_study: dict | None = None) -> str:
    table = write_table(results, pretraining, settings_name, seconds, budgets_study)
    open(os.path.join(RESULTS, f"{RESULTS_NAME}{suffix}.md"), "w", encoding="utf-8").write(table)
    if any(results.values()):
        plot(results, os.path.join(RESULTS, f"{RESULTS_NAME}{suffix}.png"))
    if budgets_study and len(budgets_study.get("rows", ())) > 1:  # one point is no curve
        plot_budgets(budgets_study, os.path.join(RESULTS,
                                                 f"{RESULTS_NAME}{suffix}_pretrain_budgets.png"))
    return table


def replot(suffix: str) -> None:
    results = run_directory.read_json_file(os.path.join(RESULTS, f"{RESULTS_NAME}{suffix}.json"))
    meta = run_directory.read_json_file(os.path.join(RESULTS, f"{RESULTS_NAME}{suffix}_meta.json"))
    print(write_reports(results, meta["pretraining"], meta["settings"], meta["seconds"], suffix,
                        meta.get("pretrain_budgets")))
    print(summary(results))


def total_seconds(results: dict, pretraining: dict) -> float:
    """What the rows in `results` cost: their runs (every learning rate tried) and the
    pretraining they started from."""
    return sum(float(p["seconds"]) for p in pretraining.values()) + sum(
        r.get("seconds_all_lr", r["seconds"]) for t in results for b in results[t]
        for r in results[t][b].values())


def merge(names: list[str], suffix: str) -> None:
    """Join the results of runs made side by side under other --results_name's into this one
    (a row of a later name replaces the same row of an earlier one), then redraw."""
    results: dict = {}
    meta: dict = {"pretraining": {}, "seconds": 0, "pretrain_budgets": {}}
    for name in names:
        part = run_directory.read_json_file(os.path.join(RESULTS, f"{name}{suffix}.json"))
        part_meta = run_directory.read_json_file(os.path.join(RESULTS,
                                                              f"{name}{suffix}_meta.json"))
        for task, budgets in part.items():
            for budget, rows in budgets.items():
                results.setdefault(task, {}).setdefault(budget, {}).update(rows)
        meta = {**part_meta, "pretraining": {**meta["pretraining"], **part_meta["pretraining"]},
                "pretrain_budgets": part_meta.get("pretrain_budgets") or meta["pretrain_budgets"],
                "merged_from": names}
    # the rows kept, not the parts' totals: a row a later part replaces would count twice
    meta["seconds"] = round(total_seconds(results, meta["pretraining"]))
    run_directory.write_json_file(os.path.join(RESULTS, f"{RESULTS_NAME}{suffix}.json"), results)
    run_directory.write_json_file(os.path.join(RESULTS, f"{RESULTS_NAME}{suffix}_meta.json"),
                                  meta)
    replot(suffix)


def task_files(sample: dict, task: str, budget: str, settings: dict, suffix: str) -> dict:
    files = dict(sample[task])
    lines = SMALL_BUDGET_LINES if budget == "small" else settings["full_lines"]
    files["train"] = sample_lines(files["train"], lines,
                                  os.path.join(WORK, task, f"train_{budget}{suffix}.txt"))
    return files


def run_cell(task: str, budget: str, files: dict, settings: dict, pretraining: dict,
             cell: dict, save, models: list[str]) -> None:
    """Every model row of one task x budget that `cell` does not hold yet."""
    rows = {"fasttext": lambda: run_fasttext(files, settings["fasttext_grid"],
                                             task != "sentiment"),
            "tfidf_lr": lambda: run_tfidf(files, settings["tfidf_c"])}
    for backbone in ("textcnn", "transformer"):
        rows[f"{backbone}_scratch"] = lambda b=backbone: run_classifier(
            f"{b}_scratch", b, task, budget, files, settings, None)
        rows[f"{backbone}_pretrained"] = lambda b=backbone: run_classifier(
            f"{b}_pretrained", b, task, budget, files, settings, pretraining[b]["run_dir"])
    for name in models:
        if name not in cell:
            cell[name] = rows[name]()
            save()  # after every row, so that --resume loses at most one row's work


def pretraining_name(backbone: str, suffix: str, epochs: int | None) -> str:
    """The pretraining's directory under WORK. 3 epochs keep the plain name of the first
    benchmarks, so that the TextCNN rows recorded with it are still read back (the Transformer
    rows of that length were replaced by the 10-epoch ones, under the same run names)."""
    return f"lm_{backbone}{suffix}" + ("" if epochs in (None, 3) else f"_{epochs}ep")


def pretraining_epochs(flags: list[str]) -> int | None:
    values = [f.split("=", 1)[1] for f in flags if f.startswith("--num_epochs=")]
    return int(values[-1]) if values else None


def pretraining_budget_study(sample: dict, settings: dict, corpus: str, suffix: str,
                             tasks: list[str], resume: bool, study: dict, save,
                             main_lm: dict | None, backbone: str = "textcnn") -> dict:
    """`backbone` pretrained for each budget of epochs, fine-tuned with the defaults on every
    task's small budget: how masked-LM accuracy and downstream F1 grow with pretraining."""
    study.setdefault("tasks", tasks)
    if study.setdefault("backbone", backbone) != backbone:
        sys.exit(f"error: this --results_name holds a {study['backbone']} study; "
                 f"give another --results_name for {backbone}")
    done = {row["epochs"]: row for row in study.setdefault("rows", [])}
    main_epochs = pretraining_epochs(settings["pretrain"][backbone])
    for epochs in settings["pretrain_budget_epochs"]:
        if epochs in done and all(t in done[epochs] for t in tasks):
            continue
        # the main table's pretraining and its fine-tuning runs are this budget's: reuse them
        is_main = epochs == main_epochs
        lm = main_lm if is_main else pretrain(backbone, settings, corpus, suffix, resume, epochs)
        kind = f"{backbone}_pretrained" if is_main else f"{backbone}_lm{epochs}ep"
        row = done.get(epochs) or {"epochs": epochs, "seconds": float(lm["seconds"]),
                                   "mlm_accuracy": float(lm["best_valid_mlm_accuracy"])}
        for task in tasks:
            if task not in row:
                files = task_files(sample, task, "small", settings, suffix)
                runs = [run_one(kind, backbone, task, "small", files, settings, lm["run_dir"],
                                seed, None) for seed in settings["seeds"]]
                row[task] = seed_row(runs, "defaults", {}, 0.0)
        if epochs not in done:
            study["rows"].append(row)
            done[epochs] = row
        study["rows"].sort(key=lambda r: r["epochs"])
        save()
    return study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings, for checking")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--budgets", default=",".join(BUDGETS))
    parser.add_argument("--resume", action="store_true",
                        help="keep the pretraining and every model row an interrupted run finished")
    parser.add_argument("--replot", action="store_true",
                        help="only rewrite the table and plot from an earlier run's JSON")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per neural row (default: the settings' 3); fewer to save time")
    parser.add_argument("--scratch_lr", default=None,
                        help="comma-separated learning rates for the from-scratch search")
    parser.add_argument("--results_name", default="quality",
                        help="file name stem under benchmarks/results (separate runs in parallel)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="the rows to run (the others are kept from --resume)")
    parser.add_argument("--merge", default=None,
                        help="comma-separated --results_name's of runs made side by side: join "
                             "them into --results_name and redraw")
    parser.add_argument("--pretrain_budgets", action="store_true",
                        help="only the pretraining-budget study (small budgets)")
    parser.add_argument("--budget_backbone", choices=tuple(BACKBONE_NAMES),
                        default="textcnn", help="the backbone of --pretrain_budgets")
    parser.add_argument("--budget_epochs", default=None,
                        help="comma-separated pretraining epochs of --pretrain_budgets "
                             "(default: the settings' 1,3,10)")
    args = parser.parse_args()
    settings = dict(QUICK if args.quick else FULL)
    if args.seeds:
        settings["seeds"] = settings["seeds"][:args.seeds]
    if args.budget_epochs:
        settings["pretrain_budget_epochs"] = tuple(int(e) for e in args.budget_epochs.split(","))
    if args.scratch_lr:
        settings["scratch_lr"] = tuple(float(lr) for lr in args.scratch_lr.split(","))
    suffix = "_quick" if args.quick else ""
    global RESULTS_NAME, RESUME
    RESULTS_NAME, RESUME = args.results_name, args.resume
    if args.replot:
        return replot(suffix)
    if args.merge:
        return merge(args.merge.split(","), suffix)
    start = time.time()
    sample = ensure_sample_data()
    os.makedirs(RESULTS, exist_ok=True)

    corpus = sample_lines(sample["pretrain"], settings["pretrain_lines"],
                          os.path.join(WORK, "pretrain_corpus_quick.txt"))
    models = args.models.split(",")
    def main_pretraining_needed(backbone: str) -> bool:
        if not args.pretrain_budgets:
            return f"{backbone}_pretrained" in models
        # the study reuses the main pretraining only when its length is one of the budgets
        return backbone == args.budget_backbone and pretraining_epochs(
            settings["pretrain"][backbone]) in settings["pretrain_budget_epochs"]

    pretraining = {b: pretrain(b, settings, corpus, suffix, args.resume)
                   for b in ("textcnn", "transformer") if main_pretraining_needed(b)}
    print("pretraining:", json.dumps(pretraining), flush=True)
    results_path = os.path.join(RESULTS, f"{RESULTS_NAME}{suffix}.json")
    meta_path = os.path.join(RESULTS, f"{RESULTS_NAME}{suffix}_meta.json")
    resumed = args.resume and os.path.exists(results_path)
    results: dict = run_directory.read_json_file(results_path) if resumed else {}
    meta: dict = run_directory.read_json_file(meta_path, {}) if resumed else {}
    study = meta.get("pretrain_budgets", {})
    pretraining = {**meta.get("pretraining", {}), **pretraining}

    def save() -> None:
        # summed over the stages rather than timed end to end, so that a --resume'd run reports
        # the cost of the whole benchmark and not only of its last invocation
        seconds = total_seconds(results, pretraining)
        run_directory.write_json_file(results_path, results)
        run_directory.write_json_file(meta_path, {"settings": "quick" if args.quick else "full",
                                                  "pretraining": pretraining,
                                                  "seconds": round(seconds),
                                                  "cpu_count": os.cpu_count(),
                                                  "pretrain_budgets": study,
                                                  "flags": {k: v for k, v in settings.items()}})
        write_reports(results, pretraining, "quick" if args.quick else "full", seconds, suffix,
                      study)

    tasks = args.tasks.split(",")
    if args.pretrain_budgets:
        pretraining_budget_study(sample, settings, corpus, suffix, tasks, args.resume, study,
                                 save, pretraining.get(args.budget_backbone),
                                 args.budget_backbone)
    else:
        for task in tasks:
            for budget in args.budgets.split(","):
                cell = results.setdefault(task, {}).setdefault(budget, {})
                run_cell(task, budget, task_files(sample, task, budget, settings, suffix),
                         settings, pretraining, cell, save, models)
                print(json.dumps({task: {budget: {m: round(r["test_f1"], 4)
                                                  for m, r in cell.items()}}}), flush=True)
    save()
    print(f"this invocation took {time.time() - start:.0f} s", flush=True)
    print(open(os.path.join(RESULTS, f"{RESULTS_NAME}{suffix}.md"), encoding="utf-8").read())
    print(summary(results))


if __name__ == "__main__":
    main()
