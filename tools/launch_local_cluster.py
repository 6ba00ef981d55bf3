"""Start N workers of one training command on this machine, as a multi-worker cluster would.

    python tools/launch_local_cluster.py 2 -- python train_bert_lm.py --test_mode=True \
        --distribution_strategy=multi_worker_mirrored

Each worker gets a free port on 127.0.0.1, its own TF_CONFIG (worker 0 is the chief, which
alone writes the run directory), and one CPU core of its own when there are enough. Output lines
are prefixed with the worker's index. When one worker fails or is killed, the others are
stopped too (they would wait for it forever in the next collective step), and the launcher
exits with the first non-zero exit code; rerunning the same line resumes after the last complete
epoch. On several machines, set TF_CONFIG by hand instead (see the README's "Scaling out").
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading


def free_ports(count: int) -> list[int]:
    """Ports the OS has just handed out; held open together so that they differ."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def worker_env(ports: list[int], index: int) -> dict[str, str]:
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    return {**os.environ,
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker",
                                                                  "index": index}})}


def pin_to_core(index: int) -> None:
    """Give worker `index` one core of its own (round robin), so workers do not fight over
    the same ones; skipped where the OS has no affinity call."""
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[index % len(cores)]})


def relay(stream, prefix: str) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(prefix.encode() + line)
        sys.stdout.flush()


def launch(count: int, command: list[str]) -> int:
    ports = free_ports(count)
    workers = [subprocess.Popen(command, env=worker_env(ports, i), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, preexec_fn=lambda i=i: pin_to_core(i))
               for i in range(count)]
    for i, worker in enumerate(workers):
        print(f"[launcher] worker {i}: pid {worker.pid}, 127.0.0.1:{ports[i]}", flush=True)
    relays = [threading.Thread(target=relay, args=(w.stdout, f"[worker {i}] "), daemon=True)
              for i, w in enumerate(workers)]
    for thread in relays:
        thread.start()
    failed = wait_for_all(workers)
    for thread in relays:
        thread.join(timeout=5)
    return failed


def wait_for_all(workers: list[subprocess.Popen]) -> int:
    """Wait until every worker ended; the first failure stops the rest. Returns 0 or the first
    failing exit code (128 + signal for a killed worker)."""
    running = list(workers)
    first_failure = 0
    while running:
        for worker in list(running):
            try:
                code = worker.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            running.remove(worker)
            if code != 0 and not first_failure:
                first_failure = code if code > 0 else 128 - code
                for other in running:
                    other.send_signal(signal.SIGTERM)
    return first_failure


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit() or int(argv[0]) < 1:
        print("usage: python tools/launch_local_cluster.py N -- <command ...>", file=sys.stderr)
        return 2
    return launch(int(argv[0]), argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
