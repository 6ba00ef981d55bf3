"""How fast does the classifier's bag-of-words model learn a task on its own, at a given rate?

    python benchmarks/probe_bag_of_words.py --rates=5,10,20,40,80 --epochs=8
    python benchmarks/probe_bag_of_words.py --choose=42,43,44 \
        --pretrained_dir=benchmarks/work/lm_textcnn

The linear model over TF-IDF vectors alone, with the label priors as fixed biases
(classifier_task.bag_of_words_trial: trained as fine-tuning trains it, batch 64, SGD with
momentum at `rate` x the schedule, a one-epoch warm-up, linear decay over the epochs the script
would plan) on the benchmark's training files (`sentiment` and `entities` at 1,000 lines,
`mentions` whole). Prints valid F1 (thresholds tuned on valid, as the epoch choice sees it)
after each epoch, one line a task and rate, and writes them to
benchmarks/results/bag_of_words_probe.json. --choose: the rate the scripts' default would pick
for each seed (classifier_task.choose_bag_of_words_rate).
"""
import argparse
import os
import sys

import keras
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_quality  # noqa: E402
import classifier_task  # noqa: E402
import cli  # noqa: E402
import data_util_hdf5 as data_util  # noqa: E402
import run_directory  # noqa: E402


def task_data(task: str, vocab: data_util.Vocabulary | None) -> classifier_task.ClassificationData:
    """The benchmark's training file of `task` (`sentiment` and `entities` at 1,000 lines,
    `mentions` whole) and valid, in `vocab` or (None) a vocabulary built from the training
    file as from-scratch training builds one."""
    sample = bench_quality.ensure_sample_data()
    budget = "full" if task == "mentions" else "small"
    files = bench_quality.task_files(sample, task, budget, bench_quality.FULL, "")
    files.pop("test", None)
    return classifier_task.load_data(files, "space", classifier_task.ClassifierSettings(),
                                     vocab=vocab, vocab_size=None if vocab else 20000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="sentiment,entities,mentions")
    parser.add_argument("--rates", default="5,10,20,40,80")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--pretrained_dir", default=None,
                        help="use this pretraining run's vocabulary (default: built from train)")
    parser.add_argument("--choose", default=None,
                        help="comma-separated seeds: only print the rate each would choose")
    args = parser.parse_args()
    vocab = (data_util.Vocabulary.load(os.path.join(args.pretrained_dir, "vocab.txt"))
             if args.pretrained_dir else None)
    path = os.path.join(bench_quality.RESULTS, "bag_of_words_probe.json")
    results = run_directory.read_json_file(path, {})
    for task in args.tasks.split(","):
        data = task_data(task, vocab)
        planned = cli.planned_classifier_epochs(data.steps_per_epoch())
        if args.choose:
            for seed in map(int, args.choose.split(",")):
                settings = classifier_task.ClassifierSettings(seed=seed)
                keras.utils.set_random_seed(seed)  # as the scripts do first
                chosen = classifier_task.choose_bag_of_words_rate(data, planned, settings)
                print(f"{task} seed {seed}: rate {chosen.bag_of_words_learning_rate:g}",
                      flush=True)
            continue
        for rate in (float(r) for r in args.rates.split(",")):
            keras.utils.set_random_seed(42)
            f1 = classifier_task.bag_of_words_trial(data, rate, args.epochs, planned,
                                                    classifier_task.ClassifierSettings())
            results.setdefault(task, {})[f"{rate:g}"] = [round(f, 4) for f in f1]
            run_directory.write_json_file(path, results)
            print(f"{task} rate {rate:g}: " + " ".join(f"{f:.3f}" for f in f1)
                  + f"  best {max(f1):.3f} at epoch {int(np.argmax(f1)) + 1}", flush=True)


if __name__ == "__main__":
    main()
