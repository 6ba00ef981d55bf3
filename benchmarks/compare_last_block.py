"""Training with the last Transformer block computing only the rows its head reads, against the
whole block, side by side in one process.

    python benchmarks/compare_last_block.py                # about 10 min on 2 cores
    python benchmarks/compare_last_block.py --layers=6 --repeats=3

The masked-LM head reads the masked positions and the classifier head the [CLS] state, so the
scripts build the backbone with `output_positions` (train_bert_lm.py) or `first_position_only`
(the classifiers): the last block computes those rows alone, with the dropout masks the whole
block would draw, so both arms train the same model (tests/test_model.py checks logits and
gradients). Shape: bench_speed.py's (Transformer small, batch 64, length 200, 30 masked
positions, vocabulary 30,000) at each --layers depth. The arms take turns (whole, rows, whole,
rows ...); the ratio is the median of the per-round ratios. Prints one line a task and depth.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import bench_speed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="6,2", help="Transformer depths to compare, e.g. 6,2")
    parser.add_argument("--tasks", default="mlm,cls")
    parser.add_argument("--steps", type=int, default=3, help="training steps a timed round")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {bench_speed.cpu_name()}", flush=True)
    for task in args.tasks.split(","):
        for num_layer in (int(n) for n in args.layers.split(",")):
            arms = {"whole": bench_speed.our_arm(task, num_layer=num_layer, rows_only=False),
                    "rows": bench_speed.our_arm(task, num_layer=num_layer, rows_only=True)}
            rates = bench_speed.interleaved_throughput(arms, args.steps, args.repeats)
            ratios = [rows / whole for whole, rows in zip(rates["whole"], rates["rows"])]
            print(f"{task} layers={num_layer}: whole block {np.median(rates['whole']):.1f} seq/s, "
                  f"rows alone {np.median(rates['rows']):.1f} seq/s (medians); ratio median "
                  f"{np.median(ratios):.2f}, best {max(ratios):.2f}", flush=True)


if __name__ == "__main__":
    main()
