"""TensorFlow's CPU memory from malloc (its default) against its BFC pool (what our scripts set,
see cli.py), for our Transformer and keras-hub's at bench_speed.py's shape.

    python benchmarks/compare_allocator.py                   # about 20 min on 2 cores
    python benchmarks/compare_allocator.py --tasks=mlm --repeats=3

The allocator is chosen when a process starts, so every timing runs in a process of its own,
the runs taking turns (ours malloc, ours pool, keras-hub malloc, keras-hub pool, ...; the
machine switches between speed modes, so only neighbours compare). Each child builds one arm,
warms it up, times --steps training steps and reports its sequences a second, the user and
kernel CPU seconds, the page faults a step and its peak resident memory. Ratios are medians of
the per-round ratios. The last line a task: `allocator task=.. ours_pool_vs_malloc=..
keras_hub_pool_vs_malloc=.. ours_pool_vs_keras_hub_malloc=.. ours_vs_keras_hub_both_pool=..`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ALLOCATOR_ENV = "TF_CPU_ALLOCATOR_USE_BFC"
ALLOCATORS = {"malloc": "false", "pool": "true"}
ARMS = ("ours", "keras_hub")


def page_faults() -> int:
    """Minor page faults of this process so far (field 10 of /proc/self/stat)."""
    return int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[7])


def child(task: str, arm: str, steps: int) -> None:
    """Build one arm under this process's allocator, time `steps` steps, print one JSON line."""
    sys.path.insert(0, str(HERE))
    import bench_speed
    net, data = (bench_speed.our_arm(task) if arm == "ours" else bench_speed.keras_hub_arm(task))
    net.fit(data, steps_per_epoch=2, epochs=1, verbose=0)  # trace and warm up
    faults, cpu, start = page_faults(), os.times(), time.perf_counter()
    net.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    seconds, end_cpu = time.perf_counter() - start, os.times()
    print(json.dumps({
        "seq_s": steps * bench_speed.BATCH / seconds,
        "user_s": end_cpu.user - cpu.user, "kernel_s": end_cpu.system - cpu.system,
        "faults_a_step": (page_faults() - faults) / steps,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_child(task: str, arm: str, allocator: str, steps: int) -> dict:
    env = {**os.environ, ALLOCATOR_ENV: ALLOCATORS[allocator]}
    result = subprocess.run([sys.executable, __file__, "--child", f"--tasks={task}",
                             f"--arm={arm}", f"--steps={steps}"],
                            env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"error: the {arm} {task} child under {allocator} failed:\n"
                 f"{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare(task: str, steps: int, repeats: int) -> None:
    names = [(arm, allocator) for arm in ARMS for allocator in ALLOCATORS]
    runs: dict[tuple, list[dict]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names:
            runs[name].append(run_child(task, *name, steps))
        print(f"  {task} round {round_ + 1}: " + ", ".join(
            f"{arm} {allocator} {runs[(arm, allocator)][-1]['seq_s']:.1f}"
            for arm, allocator in names), flush=True)

    def rates(name):
        return np.array([r["seq_s"] for r in runs[name]])

    for name in names:
        median = {key: float(np.median([r[key] for r in runs[name]]))
                  for key in ("seq_s", "user_s", "kernel_s", "faults_a_step", "peak_rss_mib")}
        kernel_share = median["kernel_s"] / (median["user_s"] + median["kernel_s"])
        print(f"{task} {name[0]:9s} {name[1]:6s}: {median['seq_s']:.1f} seq/s (median; best "
              f"{rates(name).max():.1f}), kernel {kernel_share:.0%} of CPU time, "
              f"{median['faults_a_step']:,.0f} page faults a step, peak "
              f"{median['peak_rss_mib']:,.0f} MiB", flush=True)
    ours = np.median(rates(("ours", "pool")) / rates(("ours", "malloc")))
    theirs = np.median(rates(("keras_hub", "pool")) / rates(("keras_hub", "malloc")))
    shipped = np.median(rates(("ours", "pool")) / rates(("keras_hub", "malloc")))
    same = np.median(rates(("ours", "pool")) / rates(("keras_hub", "pool")))
    print(f"allocator task={task} ours_pool_vs_malloc={ours:.2f} "
          f"keras_hub_pool_vs_malloc={theirs:.2f} ours_pool_vs_keras_hub_malloc={shipped:.2f} "
          f"ours_vs_keras_hub_both_pool={same:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="mlm,cls")
    parser.add_argument("--steps", type=int, default=4, help="training steps a timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.tasks, args.arm, args.steps)
    for task in args.tasks.split(","):
        compare(task, args.steps, args.repeats)


if __name__ == "__main__":
    main()
