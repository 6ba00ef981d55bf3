"""Does masked-LM pretraining lift F1 over a tuned from-scratch model, and over fastText / TF-IDF?

    pip install -r benchmarks/requirements.txt
    python benchmarks/bench_quality.py            # the README figures (about 90 minutes on 2 cores)
    python benchmarks/bench_quality.py --quick    # every row, tiny settings, for checking (~10 min)

For each sample task (sentiment, entities) and label budget (small: 1,000 labelled training lines;
full: the whole training split) it trains fastText and TF-IDF + logistic regression (tuned on
valid), and the TextCNN and Transformer classifiers from scratch and fine-tuned from a masked-LM
pretraining on the training-split text of both tasks (every learning rate of its grid tried, the
best picked on valid). The neural runs call the user-facing scripts, so the figures are what a
user gets. Writes benchmarks/results/quality.json, quality.md and quality.png.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data_util_hdf5 as du  # noqa: E402
import train_util as tu  # noqa: E402
from data.prepare import ensure_sample_data  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
WORK = os.path.join(ROOT, "benchmarks", "work")
TASKS = ("sentiment", "entities")
BUDGETS = ("small", "full")
SMALL_BUDGET_LINES = 1000
MODELS = ("fasttext", "tfidf_lr", "textcnn_scratch", "textcnn_pretrained",
          "transformer_scratch", "transformer_pretrained")

# What the README figures use, sized to fit about 75 minutes on 2 cores. Sequence lengths cover
# most lines of each task (entities paragraphs average 58 tokens, reviews fewer).
FULL = {
    "sequence_length": {"sentiment": 64, "entities": 80},
    "pretrain_lines": None,
    "full_lines": None,
    "pretrain": {"textcnn": ["--preset=small", "--num_epochs=3", "--learning_rate=1e-3",
                             "--vocab_size=20000"],
                 "transformer": ["--preset=small", "--num_layer=2", "--num_epochs=3",
                                 "--learning_rate=5e-4", "--warmup_steps=300",
                                 "--vocab_size=20000"]},
    "model": {"textcnn": ["--preset=small", "--vocab_size=20000"],
              "transformer": ["--preset=small", "--num_layer=2", "--vocab_size=20000"]},
    "epochs": {"small": 8, "full": 2},
    "batch_size": 64,
    "scratch_lr": (3e-4, 1e-3, 3e-3),
    # The same grid for both: with 1,000 labelled lines and 8 epochs (128 steps) a fine-tuning
    # rate of 1e-4 barely moves the model (an earlier run: 0.63 against 0.74 at 3e-4).
    "pretrained_lr": (3e-4, 1e-3, 3e-3),
    "fasttext_grid": [(lr, ep) for lr in (0.5, 1.0) for ep in (25, 50)],
    "tfidf_c": (1.0, 10.0, 100.0),
}
# Every row on slices of the data with tiny models: checks the machinery, not the figures.
QUICK = {
    "sequence_length": {"sentiment": 32, "entities": 48},
    "pretrain_lines": 2000,
    "full_lines": 2000,
    "pretrain": {"textcnn": ["--preset=tiny", "--num_epochs=1", "--learning_rate=1e-3"],
                 "transformer": ["--preset=tiny", "--num_layer=2", "--num_epochs=1",
                                 "--learning_rate=5e-4"]},
    "model": {"textcnn": ["--preset=tiny"], "transformer": ["--preset=tiny", "--num_layer=2"]},
    "epochs": {"small": 2, "full": 1},
    "batch_size": 64,
    "scratch_lr": (1e-3,),
    "pretrained_lr": (3e-4,),
    "fasttext_grid": [(0.5, 5)],
    "tfidf_c": (10.0,),
}


# ------------------------------------------------------------------------------ data
def read_labelled(path: str) -> tuple[list[str], list[list[str]]]:
    texts, labels = [], []
    for _, line in du.read_lines(path):
        text, line_labels = du.parse_label_line(line)
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
    names = du.build_label_list(files["train"])
    vectorizer = TfidfVectorizer(token_pattern=r"\S+", ngram_range=(1, 2), sublinear_tf=True,
                                 min_df=2)
    x = {"train": vectorizer.fit_transform(data["train"][0])}
    x.update({s: vectorizer.transform(data[s][0]) for s in ("valid", "test")})
    y = {s: multi_hot(data[s][1], names) for s in data}
    best = None
    for c in grid:
        model = OneVsRestClassifier(LogisticRegression(C=c, max_iter=2000))
        model.fit(x["train"], y["train"])
        valid = tu.f1_scores(y["valid"], model.predict_proba(x["valid"]))["f1"]
        if best is None or valid > best[0]:
            best = (valid, c, model)
    test = tu.f1_scores(y["test"], best[2].predict_proba(x["test"]))
    return classic_row(test, best[0], f"C={best[1]}", time.time() - start)


def run_fasttext(files: dict, grid, multi_label: bool) -> dict:
    import fasttext

    start = time.time()
    names = du.build_label_list(files["train"])
    data = {s: read_labelled(p) for s, p in files.items()}
    y = {s: multi_hot(data[s][1], names) for s in data}
    best = None
    for lr, epoch in grid:
        # thread >= 2: with one thread fastText 0.9.3 leaves weights uninitialised (BASELINES.md)
        model = fasttext.train_supervised(files["train"], lr=lr, epoch=epoch, wordNgrams=2,
                                          dim=100, loss="ova" if multi_label else "softmax",
                                          thread=2, seed=1, verbose=0)
        valid = tu.f1_scores(y["valid"], fasttext_probs(model, data["valid"][0], names))["f1"]
        if best is None or valid > best[0]:
            best = (valid, (lr, epoch), model)
    test = tu.f1_scores(y["test"], fasttext_probs(best[2], data["test"][0], names))
    return classic_row(test, best[0], f"lr={best[1][0]} epoch={best[1][1]}", time.time() - start)


def fasttext_probs(model, texts: list[str], names: list[str]) -> np.ndarray:
    labels, probs = model.predict(texts, k=-1, threshold=0.0)
    out = np.zeros((len(texts), len(names)))
    index = {n: i for i, n in enumerate(names)}
    for row, (row_labels, row_probs) in enumerate(zip(labels, probs)):
        for label, p in zip(row_labels, row_probs):
            name = label.replace("__label__", "")
            if name in index:
                out[row, index[name]] = p
    return out


def classic_row(test: dict, valid_f1: float, chosen: str, seconds: float) -> dict:
    return {"test_micro_f1": test["micro_f1"], "test_macro_f1": test["macro_f1"],
            "test_f1": test["f1"], "valid_f1_epoch1": None, "valid_f1_best": valid_f1,
            "seconds": round(seconds, 1), "chosen": chosen}


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


def pretrain(backbone: str, settings: dict, corpus: str, suffix: str, resume: bool) -> dict:
    run_dir = os.path.join(WORK, f"lm_{backbone}{suffix}")
    record = os.path.join(run_dir, "benchmark_pretraining.json")
    if resume and os.path.exists(record):
        return tu.read_json(record)
    start = time.time()
    values = run_script("train_bert_lm.py", [f"--backbone={backbone}", f"--ckpt_dir={run_dir}",
                                             f"--mask_lm_source_file={corpus}",
                                             "--sequence_length_lm=64",
                                             *settings["pretrain"][backbone]],
                        f"pretrain_{backbone}")
    values["seconds"] = round(time.time() - start, 1)
    values["flags"] = " ".join(settings["pretrain"][backbone])
    values["run_dir"] = run_dir
    tu.write_json(record, values)
    return values


def run_classifier(kind: str, backbone: str, task: str, budget: str, files: dict,
                   settings: dict, pretrained_dir: str | None) -> dict:
    """Every learning rate of the grid; the best on validation F1 is reported on test."""
    grid = settings["pretrained_lr" if pretrained_dir else "scratch_lr"]
    common = [f"--training_data_file={files['train']}", f"--valid_data_file={files['valid']}",
              f"--test_data_file={files['test']}", f"--num_epochs={settings['epochs'][budget]}",
              f"--sequence_length={settings['sequence_length'][task]}",
              f"--batch_size={settings['batch_size']}"]
    runs = []
    for lr in grid:
        run_dir = os.path.join(WORK, task, budget, f"{kind}_lr{lr:g}")
        start = time.time()
        if pretrained_dir:
            values = run_script("train_bert_fine_tuning.py",
                                [*common, f"--pretrained_dir={pretrained_dir}",
                                 f"--learning_rate={lr}", f"--ckpt_dir_save={run_dir}"],
                                f"{task}_{budget}_{kind}_{lr:g}")
        else:
            values = run_script("train_transform.py",
                                [*common, f"--backbone={backbone}", *settings["model"][backbone],
                                 f"--learning_rate={lr}", f"--ckpt_dir_save={run_dir}"],
                                f"{task}_{budget}_{kind}_{lr:g}")
        history = json.load(open(os.path.join(run_dir, "history.json"), encoding="utf-8"))
        runs.append({"lr": lr, "values": values, "history": [h["val_f1"] for h in history],
                     "seconds": round(time.time() - start, 1)})
        print(f"  {task}/{budget} {kind} lr={lr:g}: valid best {max(runs[-1]['history']):.4f}, "
              f"test {float(values['test_f1']):.4f}", flush=True)
    best = max(runs, key=lambda r: max(r["history"]))
    v = best["values"]
    return {"test_micro_f1": float(v["test_micro_f1"]), "test_macro_f1": float(v["test_macro_f1"]),
            "test_f1": float(v["test_f1"]), "valid_f1_epoch1": best["history"][0],
            "valid_f1_best": max(best["history"]), "seconds": best["seconds"],
            "seconds_all_lr": round(sum(r["seconds"] for r in runs), 1),
            "chosen": f"lr={best['lr']:g}", "valid_curve": best["history"],
            "lr_grid": {f"{r['lr']:g}": max(r["history"]) for r in runs}}


# ----------------------------------------------------------------------------- report
def write_table(results: dict, pretraining: dict, settings_name: str, seconds: float) -> str:
    lines = [f"Test average F1 ((micro + macro) / 2); settings: {settings_name}; "
             f"total {seconds / 60:.0f} min on {os.cpu_count()} CPU cores.", ""]
    for task in results:
        lines += [f"**{task}**", "",
                  "| model | budget | test micro-F1 | test macro-F1 | test F1 | valid F1 epoch 1 "
                  "| valid F1 best | chosen | seconds |", "|---|---|---|---|---|---|---|---|---|"]
        for budget in results[task]:
            for name, r in results[task][budget].items():
                epoch1 = "–" if r["valid_f1_epoch1"] is None else f"{r['valid_f1_epoch1']:.3f}"
                lines.append(f"| {name} | {budget} | {r['test_micro_f1']:.3f} | "
                             f"{r['test_macro_f1']:.3f} | **{r['test_f1']:.3f}** | {epoch1} | "
                             f"{r['valid_f1_best']:.3f} | {r['chosen']} | {r['seconds']:.0f} |")
        lines.append("")
    lines.append("Pretraining (once per backbone, on the training-split text of both tasks):")
    for backbone, p in pretraining.items():
        lines.append(f"- {backbone}: {p['flags']}, {p.get('epochs')} epochs, {p.get('steps')} "
                     f"steps, {p['seconds']:.0f} s, best valid masked-LM accuracy "
                     f"{float(p['best_valid_mlm_accuracy']):.3f}")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    budgets = list(results[tasks[0]])
    fig, axes = plt.subplots(len(tasks), len(budgets), figsize=(5.5 * len(budgets),
                                                                 3.6 * len(tasks)), squeeze=False)
    for ax, (task, budget) in zip(axes.flat, [(t, b) for t in tasks for b in budgets]):
        for name, r in results[task][budget].items():
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
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_reports(results: dict, pretraining: dict, settings_name: str, seconds: float,
                  suffix: str) -> str:
    table = write_table(results, pretraining, settings_name, seconds)
    open(os.path.join(RESULTS, f"quality{suffix}.md"), "w", encoding="utf-8").write(table)
    plot(results, os.path.join(RESULTS, f"quality{suffix}.png"))
    return table


def replot(suffix: str) -> None:
    results = tu.read_json(os.path.join(RESULTS, f"quality{suffix}.json"))
    meta = tu.read_json(os.path.join(RESULTS, f"quality{suffix}_meta.json"))
    print(write_reports(results, meta["pretraining"], meta["settings"], meta["seconds"], suffix))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings, for checking")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--budgets", default=",".join(BUDGETS))
    parser.add_argument("--resume", action="store_true",
                        help="keep the pretraining and every model row an interrupted run finished")
    parser.add_argument("--replot", action="store_true",
                        help="only rewrite the table and plot from an earlier run's JSON")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    suffix = "_quick" if args.quick else ""
    if args.replot:
        return replot(suffix)
    start = time.time()
    sample = ensure_sample_data()
    os.makedirs(RESULTS, exist_ok=True)

    corpus = sample_lines(sample["pretrain"], settings["pretrain_lines"],
                          os.path.join(WORK, "pretrain_corpus_quick.txt"))
    pretraining = {b: pretrain(b, settings, corpus, suffix, args.resume)
                   for b in ("textcnn", "transformer")}
    print("pretraining:", json.dumps(pretraining), flush=True)
    results_path = os.path.join(RESULTS, f"quality{suffix}.json")
    results: dict = tu.read_json(results_path) if args.resume and os.path.exists(results_path) \
        else {}
    for task in args.tasks.split(","):
        for budget in args.budgets.split(","):
            files = dict(sample[task])
            lines = SMALL_BUDGET_LINES if budget == "small" else settings["full_lines"]
            files["train"] = sample_lines(files["train"], lines,
                                          os.path.join(WORK, task, f"train_{budget}{suffix}.txt"))
            cell = results.setdefault(task, {}).setdefault(budget, {})
            rows = {"fasttext": lambda: run_fasttext(files, settings["fasttext_grid"],
                                                      task == "entities"),
                    "tfidf_lr": lambda: run_tfidf(files, settings["tfidf_c"])}
            for backbone in ("textcnn", "transformer"):
                rows[f"{backbone}_scratch"] = lambda b=backbone: run_classifier(
                    f"{b}_scratch", b, task, budget, files, settings, None)
                rows[f"{backbone}_pretrained"] = lambda b=backbone: run_classifier(
                    f"{b}_pretrained", b, task, budget, files, settings,
                    pretraining[b]["run_dir"])
            for name in MODELS:
                if name not in cell:
                    cell[name] = rows[name]()
                    # written after every row so that --resume loses at most one row's work
                    tu.write_json(results_path, results)
            print(json.dumps({task: {budget: {m: round(r["test_f1"], 4)
                                              for m, r in cell.items()}}}), flush=True)

    # summed over the stages rather than timed end to end, so that a --resume'd run reports the
    # cost of the whole benchmark and not only of its last invocation
    seconds = sum(float(p["seconds"]) for p in pretraining.values()) + sum(
        r.get("seconds_all_lr", r["seconds"]) for t in results for b in results[t]
        for r in results[t][b].values())
    print(f"this invocation took {time.time() - start:.0f} s", flush=True)
    tu.write_json(os.path.join(RESULTS, f"quality{suffix}_meta.json"),
                  {"settings": "quick" if args.quick else "full", "pretraining": pretraining,
                   "seconds": round(seconds), "cpu_count": os.cpu_count(),
                   "flags": {k: v for k, v in settings.items()}})
    print(write_reports(results, pretraining, "quick" if args.quick else "full", seconds, suffix))
    print(f"quality seconds={seconds:.0f} " + " ".join(
        f"{t}_{b}_{m}={r['test_f1']:.4f}" for t in results for b in results[t]
        for m, r in results[t][b].items()))


if __name__ == "__main__":
    main()
