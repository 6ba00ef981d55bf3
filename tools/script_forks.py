"""Run code against several of the top-level scripts in one process that loads TensorFlow once.

A script defines its absl flags when it is imported, and two scripts cannot share absl's global
registry, so each needs a process of its own. A fresh interpreter spends 8-10 s of a 2-core
machine importing TensorFlow and Keras; a fork of a process that has imported them starts at
once. tools/flags_table.py and benchmarks/bench_robustness.py use it from a child process of their
own (never fork a process that has already run TensorFlow: its thread pools do not survive).
"""
import importlib
import json
import os
import sys
import traceback
from typing import Any, Callable


def each_in_a_fork(modules: list[str], work: Callable[[Any], Any]) -> dict[str, Any]:
    """{module name: work(the imported module)}, each computed in a fork of this process made
    after TensorFlow and Keras are imported here. `work` returns something JSON can hold."""
    import keras  # noqa: F401  (imports TensorFlow too: both once, before the first fork)
    results = {}
    for name in modules:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            status = 0
            try:
                with os.fdopen(write, "w") as answer:
                    json.dump(work(importlib.import_module(name)), answer)
            except BaseException:
                traceback.print_exc()
                status = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        os.close(write)
        with os.fdopen(read) as answer:
            text = answer.read()
        if os.waitpid(pid, 0)[1] != 0:
            raise RuntimeError(f"{name}: importing or running it failed in its fork (see above)")
        results[name] = json.loads(text)
    return results
