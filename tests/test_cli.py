"""The TensorFlow runtime the scripts get by importing cli first."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh process imports cli, then computes on a 20 MB tensor a few times and reports the page
# faults a repeat (counted as the allocator benchmark counts them) and the allocator setting.
FAULTS_A_REPEAT = """
import json, os, sys
sys.path[:0] = [{root!r}, os.path.join({root!r}, "benchmarks")]
import cli
import tensorflow as tf
from compare_allocator import page_faults

x = tf.random.normal([16, 8, 200, 200])
tf.nn.softmax(x * 2.0).numpy()
start = page_faults()
for _ in range(5):
    tf.nn.softmax(x * 2.0)
print(json.dumps({{"faults": (page_faults() - start) / 5,
                   "setting": os.environ.get("TF_CPU_ALLOCATOR_USE_BFC")}}))
"""


def faults_a_repeat(env: dict) -> dict:
    base = {k: v for k, v in os.environ.items() if k != "TF_CPU_ALLOCATOR_USE_BFC"}
    result = subprocess.run([sys.executable, "-c", FAULTS_A_REPEAT.format(root=ROOT)],
                            env={**base, **env}, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two fresh processes that load TensorFlow
def test_cli_pools_tensorflow_cpu_memory_unless_the_user_says_otherwise():
    """Under malloc each freed 20 MB tensor goes back to the system and its 5,000 pages fault in
    again at the next repeat (where the kernel gives no huge pages); the pool reuses them."""
    pooled = faults_a_repeat({})
    assert pooled["setting"] == "true"
    assert pooled["faults"] < 16 * 8 * 200 * 200 * 4 / 4096 / 4, pooled
    malloc = faults_a_repeat({"TF_CPU_ALLOCATOR_USE_BFC": "false"})
    assert malloc["setting"] == "false"
    if malloc["faults"] > 1000:  # this machine pays the cost the pool removes
        assert pooled["faults"] < malloc["faults"] / 4, (pooled, malloc)
