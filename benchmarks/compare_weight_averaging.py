"""What the moving average of the weights (--weight_averaging, on by default for epochs of 100 or
more steps) costs a classifier training step: the scripts' classifier (bag-of-words model
included) with and without it, at bench_speed.py's shape, the two arms taking turns in one
process.

    python benchmarks/compare_weight_averaging.py                         # about 6 min on 2 cores
    python benchmarks/compare_weight_averaging.py --backbones=textcnn --repeats=9

Each arm trains on train_util.make_optimizer's AdamW; the averaged arm also keeps Keras'
exponential moving average of every weight (momentum 0.99), updated after each step as the
scripts do. The last line a backbone:
`weight_averaging backbone=.. averaged_vs_plain=.. (median of the per-round ratios)`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_speed  # noqa: E402  (first: the scripts' TensorFlow runtime, see cli.py)
import train_util  # noqa: E402


def classifier_arm(backbone: str, averaged: bool):
    """The scripts' classifier (bag-of-words model included) at the benchmark shape, on the
    scripts' optimiser, and its repeated synthetic batch."""
    optimizer = train_util.make_optimizer(1e-4, 10_000, 100,
                                          average_momentum=0.99 if averaged else None)
    return bench_speed.our_arm("cls", backbone, bag_of_words=True, optimizer=optimizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="textcnn,transformer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="training steps a timed turn")
    args = parser.parse_args()
    for backbone in args.backbones.split(","):
        print(f"{backbone} classifier: plain vs averaged, {args.repeats} rounds of "
              f"{args.steps} steps", flush=True)
        arms = {"plain": classifier_arm(backbone, False),
                "averaged": classifier_arm(backbone, True)}
        rates = bench_speed.interleaved_throughput(arms, args.steps, args.repeats)
        for name, values in rates.items():
            summary = bench_speed.summarize(values)
            print(f"  {name}: {summary['median']:.1f} seq/s (median; best {summary['best']:.1f})")
        ratio = bench_speed.median_ratio(rates["averaged"], rates["plain"])
        print(f"weight_averaging backbone={backbone} averaged_vs_plain={ratio:.3f}", flush=True)


if __name__ == "__main__":
    main()
