"""The Transformer small export with the full last block against the scoring classifier's (the
[CLS] position alone, model.build_scoring_classifier), side by side in one process.

    python benchmarks/compare_scoring_export.py

Both exports hold the same weights; rounds of batch-1 calls (median of 40) and batch-64 calls
are interleaved, and the largest probability difference between the two is printed.
"""
import os
import sys
import tempfile

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_speed  # noqa: E402
import model  # noqa: E402


def main(rounds: int = 5) -> None:
    config = model.config_from_preset("small", backbone="transformer",
                                      vocab_size=bench_speed.VOCAB)
    full = model.build_classifier(model.build_backbone(config), bench_speed.LABELS, 0.1)
    scoring = model.build_scoring_classifier(config, bench_speed.LABELS, 0.1)
    scoring.set_weights(full.get_weights())
    workdir, serve = tempfile.mkdtemp(), {}
    for name, classifier in (("full last block", full), ("scoring", scoring)):
        for jit_compile in (False, True):
            export_dir = os.path.join(workdir, f"{name}_{jit_compile}".replace(" ", "_"))
            serve[name + (", XLA" if jit_compile else "")] = bench_speed.exported_scorer(
                classifier, export_dir, jit_compile)
    many = tf.constant(bench_speed.synthetic_batch()["token_ids"])
    difference = np.abs(serve["full last block"](many).numpy()
                        - serve["scoring"](many).numpy()).max()
    print(f"largest probability difference, batch 64: {difference:.2g}")
    figures, _ = bench_speed.time_scorers(serve, rounds)
    for name, figure in figures.items():
        print(f"{name:22s} batch 1 {figure['batch1_ms']:6.2f} ms (best "
              f"{figure['batch1_best_ms']:.2f})  batch 64 {figure['batch64_docs_s']:4.0f} docs/s")


if __name__ == "__main__":
    main()
