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

import keras  # noqa: E402
import numpy as np  # noqa: E402

import bench_speed  # noqa: E402
import model  # noqa: E402


def training_arm(task: str, num_layer: int, rows_only: bool):
    """(model, data) of one arm: the masked LM ("mlm") or the classifier ("cls")."""
    config = model.config_from_preset("small", backbone="transformer",
                                      vocab_size=bench_speed.VOCAB, max_position=512)
    config.num_layer = num_layer
    batch = bench_speed.synthetic_batch()
    features = bench_speed.backbone_inputs(batch)
    optimizer = keras.optimizers.AdamW(1e-4)
    if task == "mlm":
        net = model.build_pretraining_model(
            model.build_backbone(config, output_positions=rows_only))
        model.compile_pretraining_model(net, optimizer)
        data = ({**features, "masked_positions": batch["masked_positions"]},
                {"mlm": batch["masked_ids"]})
    else:
        net = model.build_classifier(model.build_backbone(config, first_position_only=rows_only),
                                     bench_speed.LABELS, 0.1)
        model.compile_classifier(net, optimizer)
        data = (features, batch["labels"])
    return net, bench_speed.repeat(data)


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
            arms = {"whole": training_arm(task, num_layer, False),
                    "rows": training_arm(task, num_layer, True)}
            rates = bench_speed.interleaved_throughput(arms, args.steps, args.repeats)
            ratios = [rows / whole for whole, rows in zip(rates["whole"], rates["rows"])]
            print(f"{task} layers={num_layer}: whole block {np.median(rates['whole']):.1f} seq/s, "
                  f"rows alone {np.median(rates['rows']):.1f} seq/s (medians); ratio median "
                  f"{np.median(ratios):.2f}, best {max(ratios):.2f}", flush=True)


if __name__ == "__main__":
    main()
