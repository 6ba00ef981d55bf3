"""Speed: our models against keras-hub's at the same shape, the machine's peak, the input
pipeline, inference through the exported SavedModel and predict.py end to end.

    python benchmarks/bench_speed.py            # about 15 min on 2 cores
    python benchmarks/bench_speed.py --quick    # 3 repeats instead of 5, about 10 min

Shape (issue 11, our `small` preset): Transformer d_model 128, d_ff 512, 6 layers, 8 heads,
batch 64, length 200, 30 masked positions, vocabulary 30,000; keras-hub's BertMaskedLM and
BertTextClassifier built with the same sizes. Training arms run in one process and take turns
(A, B, C, A, B, C ...): this machine switches between speed modes, so only runs side by side
compare; every ratio is the median of the per-round ratios. MFU = the model's matmul FLOPs
(counted from the shapes, backward = 2x forward) per second over the fp32 matmul peak measured
in the same run. Writes benchmarks/results/speed.md and speed.json (--report names them: the AVX2
machine's are speed_zen3.md and .json); the last line is the summary.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# first, as the scripts do: their TensorFlow runtime (quiet start-up, CPU memory pooled), so the
# figures are what a user of them sees; both projects' arms run under it
import cli  # noqa: E402,F401
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import model  # noqa: E402
import pretrain_task  # noqa: E402
import train_util  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# arms with one setting changed, each compared with the arm named before its last "_"
VARIANT_ARMS = ("ours_xla", "textcnn_xla", "keras_hub_xla", "ours_bf16", "textcnn_bf16")
BATCH, LENGTH, MASKED, VOCAB, LABELS = 64, 200, 30, 30_000, 119
SHAPE = dict(d_model=128, num_layer=6, num_header=8, d_k=16, d_v=16, d_ff=512)


# ------------------------------------------------------------------------------- the machine
def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        info = f.read()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), "unknown CPU")
    flags = train_util.cpu_flags() or set()
    vector = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, {os.cpu_count()} cores, {'/'.join(vector) or 'no AVX2'}"


def matmul_peak(dtype: tf.DType, size: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of one size x size matmul, best of `repeats`."""
    a = tf.cast(tf.random.normal((size, size)), dtype)
    product = tf.function(lambda x: tf.matmul(x, x))
    product(a).numpy()
    best = min(_seconds(lambda: product(a).numpy()) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def _seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------ FLOP counts
def encoder_flops(batch: int, length: int, d_model: int, num_layer: int, num_header: int,
                  d_k: int, d_v: int, d_ff: int, last_rows: int | None = None) -> float:
    """Forward matmul FLOPs of the encoder blocks (projections, attention, feed-forward).
    `last_rows`: the positions the last block computes (None: all; ours compute [CLS] and the
    masked positions alone: the fused query/key/value projection for every position, attention,
    output projection and feed-forward for those rows)."""
    projection = 2 * d_model * num_header * (2 * d_k + d_v)
    per_row = (2 * num_header * d_v * d_model + 2 * length * num_header * (d_k + d_v)
               + 4 * d_model * d_ff)
    rows = length * (num_layer - 1) + (length if last_rows is None else last_rows)
    return batch * (length * num_layer * projection + rows * per_row)


def textcnn_flops(batch: int, length: int, d_model: int, num_filters: int,
                  filter_sizes=(2, 3, 4, 5)) -> float:
    """Forward matmul FLOPs of the TextCNN encoder: two convolutions a width, the projection."""
    convolutions = sum(2 * width * (d_model + num_filters) * num_filters for width in filter_sizes)
    projection = 2 * len(filter_sizes) * num_filters * d_model
    return batch * length * (convolutions + projection)


def inference_flops(backbone: str, last_rows: int | None = 1) -> float:
    """Forward FLOPs of one document at the full length, head included (the latency's work);
    `last_rows` as encoder_flops (ours score [CLS] alone in the last block, keras-hub all)."""
    d = SHAPE["d_model"]
    head = 2 * d * d + 2 * d * LABELS
    if backbone == "textcnn":
        return textcnn_flops(1, LENGTH, d, d) + head
    return encoder_flops(1, LENGTH, **SHAPE, last_rows=last_rows) + head


def training_flops(task: str) -> float:
    """FLOPs of one training step of ours at the benchmark shape (backward = 2 x forward)."""
    # the last block computes [CLS] and the masked positions (masked LM) or [CLS] alone
    forward = encoder_flops(BATCH, LENGTH, **SHAPE, last_rows=1 + (MASKED if task == "mlm" else 0))
    d = SHAPE["d_model"]
    if task == "mlm":
        forward += BATCH * MASKED * (2 * d * d + 2 * d * VOCAB)
    else:
        forward += BATCH * (2 * d * d + 2 * d * LABELS)
    return 3 * forward


def training_gflops(task: str, seq_s: float) -> float:
    """GFLOP/s of training at `seq_s` sequences a second."""
    return training_flops(task) / BATCH * seq_s / 1e9


# ----------------------------------------------------------------------------- training arms
def synthetic_batch(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    ids[:, 0] = 2
    positions = np.sort(rng.choice(np.arange(1, LENGTH), (BATCH, MASKED)), axis=1).astype(np.int32)
    return {"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": np.ones_like(ids),
            "masked_positions": positions,
            "masked_ids": rng.integers(5, VOCAB, (BATCH, MASKED)).astype(np.int32),
            "labels": (rng.random((BATCH, LABELS)) < 0.05).astype(np.float32)}


def backbone_inputs(batch: dict) -> dict:
    return {name: batch[name] for name in ("token_ids", "segment_ids", "padding_mask")}


def repeat(element) -> tf.data.Dataset:
    """`element` over and over, for both projects' arms, through our input pipelines' ending
    (model.prefetched): with tf.data's autotuning on, the iterator a timed fit deletes at its
    end waited for the tuner's next wake-up, so 2 steps of 2.1 s timed as 5.1 s and every arm
    seemed to sit at 25 seq/s in most rounds."""
    return model.prefetched(tf.data.Dataset.from_tensors(element).repeat())


def our_arm(task: str, backbone: str = "transformer", jit_compile: bool = False,
            precision: str = "off", num_layer: int | None = None, rows_only: bool = True,
            bag_of_words: bool = False, optimizer: keras.optimizers.Optimizer | None = None):
    """Our model and its data at the benchmark shape; `precision` is a --mixed_precision value,
    in force while the model is built (a layer keeps the policy it was built under).
    `num_layer`: another depth than the preset's; `rows_only`: the last block computes only the
    rows the head reads, as the scripts train (False: the whole block); `bag_of_words`: the
    classifier's bag-of-words model too, as the scripts train it; `optimizer`: another than a
    plain AdamW."""
    batch = synthetic_batch()
    train_util.set_precision(precision)
    config = model.config_from_preset("small", backbone=backbone, vocab_size=VOCAB,
                                      max_position=512)
    config.num_layer = num_layer or config.num_layer
    optimizer = optimizer or keras.optimizers.AdamW(1e-4)
    if task == "mlm":
        net = model.build_pretraining_model(
            model.build_backbone(config, output_positions=rows_only))
        model.compile_pretraining_model(net, optimizer, jit_compile=jit_compile)
        data = repeat(({**backbone_inputs(batch), "masked_positions": batch["masked_positions"]},
                       {"mlm": batch["masked_ids"]}))
    else:
        net = model.build_classifier(model.build_backbone(config, first_position_only=rows_only),
                                     LABELS, 0.1, bag_of_words)
        model.compile_classifier(net, optimizer, jit_compile=jit_compile)
        data = repeat((backbone_inputs(batch), batch["labels"]))
    train_util.set_precision("off")
    return net, data


def keras_hub_backbone():
    """keras-hub's BertBackbone at our small Transformer's shape."""
    import keras_hub
    return keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB, num_layers=SHAPE["num_layer"], num_heads=SHAPE["num_header"],
        hidden_dim=SHAPE["d_model"], intermediate_dim=SHAPE["d_ff"], max_sequence_length=512)


def keras_hub_arm(task: str, jit_compile: bool = False):
    import keras_hub
    batch = synthetic_batch()
    backbone = keras_hub_backbone()
    if task == "mlm":
        net = keras_hub.models.BertMaskedLM(backbone, preprocessor=None)
        net.compile(optimizer=keras.optimizers.AdamW(1e-4), jit_compile=jit_compile)
        weights = (batch["masked_ids"] != 0).astype(np.float32)
        data = repeat(({**backbone_inputs(batch), "mask_positions": batch["masked_positions"]},
                       batch["masked_ids"], weights))
    else:
        net = keras_hub.models.BertTextClassifier(backbone, LABELS, preprocessor=None)
        net.compile(optimizer=keras.optimizers.AdamW(1e-4),
                    loss=keras.losses.BinaryCrossentropy(from_logits=True), metrics=[],
                    jit_compile=jit_compile)
        data = repeat((backbone_inputs(batch), batch["labels"]))
    return net, data


def interleaved_throughput(arms: dict, steps: int, repeats: int) -> dict[str, list[float]]:
    """Sequences per second of each arm, the arms taking turns `repeats` times."""
    for net, data in arms.values():
        net.fit(data, steps_per_epoch=2, epochs=1, verbose=0)  # trace and warm up
    rates = {name: [] for name in arms}
    for round_ in range(repeats):
        for name, (net, data) in arms.items():
            seconds = _seconds(lambda: net.fit(data, steps_per_epoch=steps, epochs=1, verbose=0))
            rates[name].append(steps * BATCH / seconds)
        print(f"  round {round_ + 1}: " + ", ".join(f"{n} {r[-1]:.1f}" for n, r in rates.items()),
              flush=True)
    return rates


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    return float(np.median(np.array(numerator) / np.array(denominator)))


def summarize(rates: list[float]) -> dict:
    return {"median": float(np.median(rates)), "best": float(max(rates)),
            "all": [round(r, 2) for r in rates]}


# ---------------------------------------------------------------------------- input pipeline
def pretraining_input_rate(batches: int = 60) -> float:
    """Sequences per second that the pretraining tf.data pipeline (shuffle, batch, dynamic
    masking) delivers alone, from packed rows with a realistic share of padding."""
    rng = np.random.default_rng(1)
    rows = rng.integers(5, VOCAB, (BATCH * batches, LENGTH)).astype(np.int32)
    lengths = rng.integers(LENGTH // 2, LENGTH + 1, len(rows))
    rows[np.arange(LENGTH)[None, :] >= lengths[:, None]] = 0
    rows[:, 0] = 2
    data = pretrain_task.make_pretraining_dataset(rows, VOCAB, BATCH, 0.15, seed=0)
    for _ in data.take(2):
        pass
    seconds = _seconds(lambda: sum(1 for _ in data))
    return len(rows) / seconds


# --------------------------------------------------------------------------------- inference
def exported_latency(backbone: str, workdir: str, rounds: int = 5) -> dict:
    """Batch-1 latency (ms, median of 40-call medians over `rounds` interleaved rounds, and the
    best round) and batch-64 rate (docs/s) of the exported SavedModel's token-id endpoint (the
    decision rule included), at the full fine-tuning length; plain export and
    `--export_jit_compile` (XLA) side by side, and for the Transformer keras-hub's classifier of
    the same shape as the reference (its forward pass compiled with XLA, not exported)."""
    config = model.config_from_preset("small", backbone=backbone, vocab_size=VOCAB)
    classifier = model.build_scoring_classifier(config, LABELS, 0.1)  # as predict.py builds it
    serve = {name: exported_scorer(classifier, os.path.join(workdir, f"export_{backbone}_{name}"),
                                   jit_compile)
             for name, jit_compile in (("plain", False), ("xla", True))}
    if backbone == "transformer":
        serve["keras_hub_xla"] = keras_hub_forward()
    figures, single = time_scorers(serve, rounds)
    if "keras_hub_xla" in figures:
        figures["xla"]["vs_keras_hub_xla"] = median_ratio(
            [1 / t for t in single["xla"]], [1 / t for t in single["keras_hub_xla"]])
    return {**figures.pop("plain"), **figures}  # the report's layout: plain, then the others


def exported_scorer(classifier: keras.Model, export_dir: str,
                    jit_compile: bool) -> Callable[[tf.Tensor], tf.Tensor]:
    """`classifier` exported as predict.py exports it (a synthetic vocabulary of VOCAB words,
    LABELS labels, length LENGTH) and loaded back: token ids -> probabilities."""
    import data_util_hdf5 as data_util
    import serving
    vocab = data_util.Vocabulary(data_util.SPECIAL_TOKENS
                                 + [f"w{i}" for i in range(VOCAB - len(data_util.SPECIAL_TOKENS))])
    serving.export_classifier(classifier, export_dir, vocab, [f"l{i}" for i in range(LABELS)],
                              "space", LENGTH, jit_compile=jit_compile)
    # the default argument keeps the loaded object, whose life its variables share
    return lambda ids, saved=tf.saved_model.load(export_dir): \
        saved.serve_token_ids(ids)["probabilities"]


def time_scorers(serve: dict, rounds: int) -> tuple[dict, dict]:
    """Each scorer's batch-1 latency (median of 40 calls a round; median and best round, ms)
    and batch-64 rate (docs/s), the scorers taking turns `rounds` times; and the rounds'
    batch-1 seconds."""
    one = tf.constant(synthetic_batch()["token_ids"][:1])
    many = tf.constant(synthetic_batch()["token_ids"])
    single, batched = {name: [] for name in serve}, {name: [] for name in serve}
    for call in serve.values():
        for _ in range(5):  # trace, compile and warm up both shapes
            call(one)
            call(many)
    for _ in range(rounds):
        for name, call in serve.items():
            single[name].append(float(np.median(
                [_seconds(lambda: call(one).numpy()) for _ in range(40)])))
            batched[name] += [_seconds(lambda: call(many).numpy()) for _ in range(2)]
    figures = {name: {"batch1_ms": 1000 * float(np.median(single[name])),
                      "batch1_best_ms": 1000 * min(single[name]),
                      "batch64_docs_s": BATCH / float(np.median(batched[name]))}
               for name in serve}
    return figures, single


def keras_hub_forward() -> Callable[[tf.Tensor], tf.Tensor]:
    """keras-hub's BertTextClassifier at our small Transformer's shape: token ids -> logits,
    one XLA program (what BASELINES.md timed as the batch-1 reference)."""
    import keras_hub
    classifier = keras_hub.models.BertTextClassifier(keras_hub_backbone(), LABELS,
                                                     preprocessor=None)

    @tf.function(jit_compile=True)
    def forward(ids):  # the inputs made inside the program, as our export makes its own
        return classifier({"token_ids": ids, "segment_ids": tf.zeros_like(ids),
                           "padding_mask": tf.cast(ids != 0, tf.int32)}, training=False)

    return forward


def predict_rate(workdir: str) -> dict:
    """Documents per second of predict.py's path (tokenize, encode, score, choose labels) on the
    sample sentiment test file, with a small Transformer trained one short epoch for the purpose."""
    from data.prepare import ensure_sample_data
    files = ensure_sample_data(str(ROOT / "data"))["sentiment"]
    run_dir = os.path.join(workdir, "sentiment_run")
    slices = {}
    for split, lines in (("train", 640), ("valid", 200), ("test", 200)):
        slices[split] = os.path.join(workdir, f"{split}.txt")
        with open(files[split], encoding="utf-8") as source, \
                open(slices[split], "w", encoding="utf-8") as target:
            target.writelines(line for _, line in zip(range(lines), source))
    subprocess.run([sys.executable, str(ROOT / "train_transform.py"), "--backbone=transformer",
                    "--preset=small", "--num_epochs=1", f"--ckpt_dir_save={run_dir}",
                    f"--training_data_file={slices['train']}",
                    f"--valid_data_file={slices['valid']}", f"--test_data_file={slices['test']}",
                    f"--cache_dir={os.path.join(workdir, 'cache')}"],
                   check=True, capture_output=True)
    import predict
    predictor = predict.Predictor(run_dir)
    with open(files["test"], encoding="utf-8") as f:
        documents = list(enumerate(line.rstrip("\n") for line in f))
    list(predict.predict_lines(predictor, documents[:256], 256, 0.05))  # trace and warm up
    seconds = _seconds(lambda: list(predict.predict_lines(predictor, documents, 256, 0.05)))
    return {"documents": len(documents), "docs_s": len(documents) / seconds}


# ------------------------------------------------------------------------------------ report
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 5")
    parser.add_argument("--steps", type=int, default=2, help="training steps per timed repeat")
    parser.add_argument("--no_training", action="store_true", help="only the input pipeline, "
                        "inference and predict.py sections (printed, no report written)")
    parser.add_argument("--with_xla", action="store_true",
                        help="also time our models and keras-hub's compiled with XLA "
                             "(--jit_compile=True)")
    parser.add_argument("--with_bf16", action="store_true",
                        help="also time our models in mixed precision (--mixed_precision="
                             "bfloat16); worth it where the CPU has AVX512_BF16 or AMX")
    parser.add_argument("--rewrite_report", action="store_true",
                        help="only rewrite the report's .md from its .json (after a change to the "
                             "report)")
    parser.add_argument("--report", default="speed",
                        help="file name of the report under benchmarks/results/, without .md or "
                             ".json: one a machine (speed: AVX-512, speed_zen3: AVX2)")
    args = parser.parse_args()
    if args.rewrite_report:
        return write_report(json.loads((RESULTS / f"{args.report}.json").read_text()),
                            args.report)
    repeats = 3 if args.quick else 5
    results = {"machine": cpu_name(), "shape": {**SHAPE, "batch": BATCH, "length": LENGTH,
                                                "masked": MASKED, "vocab": VOCAB,
                                                "labels": LABELS}}
    print(f"speed benchmark on {results['machine']}", flush=True)
    results["peak_gflops"] = {"fp32": matmul_peak(tf.float32), "bf16": matmul_peak(tf.bfloat16)}
    print(f"matmul peak: fp32 {results['peak_gflops']['fp32']:.0f} GFLOP/s, "
          f"bf16 {results['peak_gflops']['bf16']:.0f} GFLOP/s", flush=True)

    if args.no_training:
        print(json.dumps({"input_seq_s": pretraining_input_rate(), **inference_sections()},
                         indent=1))
        return
    for task in ("mlm", "cls"):
        print(f"{task}: ours vs keras-hub, {repeats} rounds of {args.steps} steps", flush=True)
        arms = {"ours": our_arm(task), "keras_hub": keras_hub_arm(task)}
        if task == "mlm":
            arms["textcnn"] = our_arm(task, "textcnn")
        if args.with_xla:
            arms["ours_xla"] = our_arm(task, jit_compile=True)
            arms["keras_hub_xla"] = keras_hub_arm(task, jit_compile=True)
            if task == "mlm":
                arms["textcnn_xla"] = our_arm(task, "textcnn", jit_compile=True)
        if args.with_bf16:
            arms["ours_bf16"] = our_arm(task, precision="bfloat16")
            if task == "mlm":
                arms["textcnn_bf16"] = our_arm(task, "textcnn", precision="bfloat16")
        rates = interleaved_throughput(arms, args.steps, repeats)
        results[task] = {name: summarize(r) for name, r in rates.items()}
        results[task]["ratio_vs_keras_hub"] = median_ratio(rates["ours"], rates["keras_hub"])
        for name in VARIANT_ARMS:
            if name in rates:
                results[task][name]["vs_without"] = median_ratio(
                    rates[name], rates[name.rsplit("_", 1)[0]])
                if not name.startswith("keras_hub"):
                    results[task][name]["vs_keras_hub"] = median_ratio(rates[name],
                                                                       rates["keras_hub"])
        if "keras_hub_xla" in rates:
            results[task]["ours_xla"]["vs_keras_hub_xla"] = median_ratio(
                rates["ours_xla"], rates["keras_hub_xla"])
        achieved = training_gflops(task, results[task]["ours"]["median"])
        results[task]["gflops"] = achieved
        results[task]["mfu_fp32"] = achieved / results["peak_gflops"]["fp32"]
        if "ours_bf16" in rates:
            results[task]["ours_bf16"]["mfu_bf16"] = training_gflops(
                task, results[task]["ours_bf16"]["median"]) / results["peak_gflops"]["bf16"]
        del arms
        keras.backend.clear_session()

    results["input_seq_s"] = pretraining_input_rate()
    results["input_ratio"] = results["input_seq_s"] / results["mlm"]["ours"]["best"]
    results.update(inference_sections())
    write_report(results, args.report)


def inference_sections() -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        return {"inference": {b: exported_latency(b, workdir) for b in ("textcnn", "transformer")},
                "predict": predict_rate(workdir)}


def write_report(results: dict, name: str = "speed") -> None:
    """benchmarks/results/`name`.json and `name`.md (the notes written below the .md's summary
    block by hand are kept)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    mlm, cls, peak = results["mlm"], results["cls"], results["peak_gflops"]
    inference = results["inference"]
    lines = [
        "# Speed (benchmarks/bench_speed.py)", "",
        f"Machine: {results['machine']}; matmul peak fp32 {peak['fp32']:.0f} GFLOP/s, "
        f"bf16 {peak['bf16']:.0f} GFLOP/s (4096x4096, same run).", "",
        "| training, seq/s (median / best) | ours | keras-hub 0.32 | ours / keras-hub | "
        "ours GFLOP/s | MFU fp32 |", "|---|---|---|---|---|---|",
        *(f"| {title} | {r['ours']['median']:.1f} / {r['ours']['best']:.1f} | "
          f"{r['keras_hub']['median']:.1f} / {r['keras_hub']['best']:.1f} | "
          f"{r['ratio_vs_keras_hub']:.2f} | {r['gflops']:.0f} | {r['mfu_fp32']:.2f} |"
          for title, r in (("masked LM, Transformer small", mlm),
                           ("classifier, Transformer small", cls))),
        "", f"TextCNN small masked LM: {mlm['textcnn']['median']:.1f} seq/s (median), "
        f"{mlm['textcnn']['best']:.1f} best.",
        *(f"With XLA (--jit_compile=True), {title}: {r[name]['median']:.1f} seq/s (median), "
          f"{r[name]['best']:.1f} best, {r[name]['vs_without']:.2f}x without it."
          for title, r, name in (("Transformer masked LM", mlm, "ours_xla"),
                                 ("TextCNN masked LM", mlm, "textcnn_xla"),
                                 ("Transformer classifier", cls, "ours_xla"),
                                 ("keras-hub masked LM", mlm, "keras_hub_xla"),
                                 ("keras-hub classifier", cls, "keras_hub_xla")) if name in r),
        *(f"Both with XLA, {title}: ours / keras-hub {r['ours_xla']['vs_keras_hub_xla']:.2f}."
          for title, r in (("masked LM", mlm), ("classifier", cls)) if "keras_hub_xla" in r),
        *(f"With bf16 mixed precision (--mixed_precision=bfloat16), {title}: "
          f"{r[name]['median']:.1f} seq/s (median), {r[name]['best']:.1f} best, "
          f"{r[name]['vs_without']:.2f}x without it, {r[name]['vs_keras_hub']:.2f}x keras-hub "
          f"(float32)" + (f", MFU {r[name]['mfu_bf16']:.2f} of the bf16 peak"
                          if "mfu_bf16" in r[name] else "") + "."
          for title, r, name in (("Transformer masked LM", mlm, "ours_bf16"),
                                 ("TextCNN masked LM", mlm, "textcnn_bf16"),
                                 ("Transformer classifier", cls, "ours_bf16")) if name in r),
        f"Pretraining input pipeline alone: {results['input_seq_s']:.0f} seq/s = "
        f"{results['input_ratio']:.1f}x the Transformer's best training rate.", "",
        "| exported SavedModel, length 200 | batch 1 latency (ms) | batch 64 (docs/s) | "
        "forward MFLOP a document | batch 1 floor at the fp32 peak (ms) |",
        "|---|---|---|---|---|",
        *(f"| {title} | {r['batch1_ms']:.1f} | {r['batch64_docs_s']:.0f} "
          f"| {inference_flops(b, rows) / 1e6:.0f} "
          f"| {inference_flops(b, rows) / peak['fp32'] / 1e6:.1f} |"
          for b in ("textcnn", "transformer")
          for title, r, rows in (
              (f"{b} small", inference[b], 1),
              (f"{b} small, --export_jit_compile (XLA)", inference[b].get("xla"), 1),
              ("keras-hub 0.32 BertTextClassifier, same shape, XLA forward (not exported)",
               inference[b].get("keras_hub_xla"), None)) if r),
        "", "The floor is the document's matmul FLOPs at the 4096x4096 matmul's rate: no batch-1 "
        "call on this machine can be faster.",
        *(f"Batch 1, Transformer with XLA: ours (exported) / keras-hub (in-process) "
          f"{r['vs_keras_hub_xla']:.2f}x the calls a second (median of the per-round ratios)."
          for r in (inference["transformer"].get("xla", {}),) if "vs_keras_hub_xla" in r),
        "", f"predict.py path (tokenize + score + labels), Transformer small, sample sentiment "
        f"test file: {results['predict']['docs_s']:.0f} documents/s "
        f"({results['predict']['documents']} documents).", ""]
    summary = ("speed " + " ".join(f"{k}={v}" for k, v in (
        ("mlm_vs_keras_hub", f"{mlm['ratio_vs_keras_hub']:.2f}"),
        ("cls_vs_keras_hub", f"{cls['ratio_vs_keras_hub']:.2f}"),
        ("mfu_fp32", f"{mlm['mfu_fp32']:.2f}"),
        ("infer_b1_ms_textcnn", f"{inference['textcnn']['batch1_ms']:.1f}"),
        ("infer_b1_ms_transformer", f"{inference['transformer']['batch1_ms']:.1f}"),
        *((("infer_b1_ms_textcnn_xla", f"{inference['textcnn']['xla']['batch1_ms']:.1f}"),
           ("infer_b1_ms_transformer_xla",
            f"{inference['transformer']['xla']['batch1_ms']:.1f}"))
          if "xla" in inference["transformer"] else ()),
        *((("infer_b1_ms_keras_hub_xla",
            f"{inference['transformer']['keras_hub_xla']['batch1_ms']:.1f}"),)
          if "keras_hub_xla" in inference["transformer"] else ()),
        ("predict_docs_s", f"{results['predict']['docs_s']:.0f}"),
        ("input_ratio", f"{results['input_ratio']:.1f}"),
        *((("mlm_bf16_vs_keras_hub", f"{mlm['ours_bf16']['vs_keras_hub']:.2f}"),
           ("cls_bf16_vs_keras_hub", f"{cls['ours_bf16']['vs_keras_hub']:.2f}"),
           ("mfu_bf16", f"{mlm['ours_bf16']['mfu_bf16']:.2f}")) if "ours_bf16" in mlm else ()))))
    report = RESULTS / f"{name}.md"
    # what was written by hand after the summary block (notes on the run) is kept
    notes = report.read_text().split("```\n", 2)[2] if report.exists() and \
        report.read_text().count("```\n") >= 2 else ""
    report.write_text("\n".join(lines + ["```", summary, "```", ""]) + notes)
    print("\n".join(lines))
    print(summary)


if __name__ == "__main__":
    main()
