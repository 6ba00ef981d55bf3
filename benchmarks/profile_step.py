"""Where a training step's time goes: TensorFlow's profiler on a few steps of our model at
bench_speed.py's shape, its host trace summed by op type.

    python benchmarks/profile_step.py                       # masked LM, Transformer small
    python benchmarks/profile_step.py --task=cls --steps=4
    python benchmarks/profile_step.py --precision=bfloat16  # as --mixed_precision=bfloat16

Prints the op types by their share of the traced op time (ops run on 2 threads, so shares, not
wall time), then the top op names. A diagnostic for choosing the next speed change, not a
measurement to compare across runs.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tensorflow as tf  # noqa: E402
from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: E402

import bench_speed  # noqa: E402


def traced_ops(logdir: str) -> tuple[collections.Counter, collections.Counter]:
    """(op type -> microseconds, op name -> microseconds) of the host plane's TF op events."""
    by_type, by_name = collections.Counter(), collections.Counter()
    for path in glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True):
        space = xplane_pb2.XSpace()
        space.ParseFromString(Path(path).read_bytes())
        for plane in space.planes:
            if not plane.name.startswith("/host:CPU"):
                continue
            for line in plane.lines:
                if "TraceMe" in line.name or "python" in line.name.lower():
                    continue
                for event in line.events:
                    name = plane.event_metadata[event.metadata_id].name
                    if ":" not in name:  # TF op events are "name:Type"
                        continue
                    op_name, op_type = name.rsplit(":", 1)
                    if not op_type or op_type == "Process":  # the executor's own spans
                        continue
                    by_type[op_type] += event.duration_ps / 1e6
                    by_name[op_name] += event.duration_ps / 1e6
    return by_type, by_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="mlm", choices=["mlm", "cls"])
    parser.add_argument("--backbone", default="transformer", choices=["transformer", "textcnn"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--precision", default="off", choices=["off", "bfloat16"],
                        help="the scripts' --mixed_precision value the model is built under")
    args = parser.parse_args()
    net, data = bench_speed.our_arm(args.task, args.backbone, precision=args.precision)
    net.fit(data, steps_per_epoch=2, epochs=1, verbose=0)  # trace and warm up
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        net.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0)
        tf.profiler.experimental.stop()
        by_type, by_name = traced_ops(logdir)
    total = sum(by_type.values()) or 1.0
    print(f"{args.task} {args.backbone} ({args.precision}): {args.steps} steps, "
          f"{total / 1e3:.0f} ms of op time")
    for title, counts in (("op type", by_type), ("op name", by_name)):
        print(f"\n{title:70s} ms/step   share")
        for name, micros in counts.most_common(args.top):
            short = name.replace("StatefulPartitionedCall/", "")[-70:]  # the informative end
            print(f"{short:70s} {micros / 1e3 / args.steps:8.1f}  {micros / total:6.1%}")


if __name__ == "__main__":
    main()
