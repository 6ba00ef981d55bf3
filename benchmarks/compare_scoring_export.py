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
import data_util_hdf5 as data_util  # noqa: E402
import model  # noqa: E402
import serving  # noqa: E402


def main(rounds: int = 5) -> None:
    config = model.config_from_preset("small", backbone="transformer",
                                      vocab_size=bench_speed.VOCAB)
    full = model.build_classifier(model.build_backbone(config), bench_speed.LABELS, 0.1)
    scoring = model.build_scoring_classifier(config, bench_speed.LABELS, 0.1)
    scoring.set_weights(full.get_weights())
    vocab = data_util.Vocabulary(data_util.SPECIAL_TOKENS + [
        f"w{i}" for i in range(bench_speed.VOCAB - len(data_util.SPECIAL_TOKENS))])
    labels = [f"l{i}" for i in range(bench_speed.LABELS)]
    workdir, serve = tempfile.mkdtemp(), {}
    for name, classifier in (("full last block", full), ("scoring", scoring)):
        for jit_compile in (False, True):
            export_dir = os.path.join(workdir, f"{name}_{jit_compile}".replace(" ", "_"))
            serving.export_classifier(classifier, export_dir, vocab, labels, "space",
                                      bench_speed.LENGTH, jit_compile=jit_compile)
            serve[name + (", XLA" if jit_compile else "")] = \
                lambda ids, saved=tf.saved_model.load(export_dir): \
                saved.serve_token_ids(ids)["probabilities"]
    ids = bench_speed.synthetic_batch()["token_ids"]
    one, many = tf.constant(ids[:1]), tf.constant(ids)
    for call in serve.values():
        for _ in range(5):
            call(one)
            call(many)
    difference = np.abs(serve["full last block"](many).numpy()
                        - serve["scoring"](many).numpy()).max()
    print(f"largest probability difference, batch 64: {difference:.2g}")
    single, batched = {name: [] for name in serve}, {name: [] for name in serve}
    for _ in range(rounds):
        for name, call in serve.items():
            single[name].append(np.median([bench_speed._seconds(lambda: call(one).numpy())
                                           for _ in range(40)]))
            batched[name] += [bench_speed._seconds(lambda: call(many).numpy()) for _ in range(2)]
    for name in serve:
        print(f"{name:22s} batch 1 {1000 * np.median(single[name]):6.2f} ms (best "
              f"{1000 * min(single[name]):.2f})  batch 64 "
              f"{bench_speed.BATCH / np.median(batched[name]):4.0f} docs/s")


if __name__ == "__main__":
    main()
