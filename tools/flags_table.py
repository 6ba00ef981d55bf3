"""Print the README's table of every flag of the four scripts, from their own definitions.

    python tools/flags_table.py     # paste between the README's <details> markers

tests/test_readme.py checks that the README holds exactly this text, so the table cannot drift
from the code.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train_bert_lm.py", "train_bert_fine_tuning.py", "train_transform.py", "predict.py")
OWN_MODULES = ("cli",)

TOOLS = os.path.join(ROOT, "tools")

# In a child process: the scripts are imported in forks of it (tools/script_forks.py)
_DUMP = f"""
import json, sys
sys.path[:0] = [{ROOT!r}, {TOOLS!r}]
import flags_table, script_forks
modules = [script.removesuffix(".py") for script in flags_table.SCRIPTS]
print(json.dumps(script_forks.each_in_a_fork(modules, flags_table.own_flags)))
"""


def own_flags(script) -> dict[str, list[str]]:
    """{flag name: [default, help]} of the flags an imported `script` module and cli define."""
    from absl import flags
    rows = {}
    for path, defined in flags.FLAGS.flags_by_module_dict().items():
        if path.rsplit("/", 1)[-1].removesuffix(".py") in (script.__name__, *OWN_MODULES):
            rows.update({flag.name: [str(flag.default), flag.help] for flag in defined})
    return rows


def all_script_flags() -> dict[str, dict[str, list[str]]]:
    """{script module: its own_flags} for each of SCRIPTS."""
    out = subprocess.run([sys.executable, "-c", _DUMP], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def table() -> str:
    parts = []
    tables = all_script_flags()
    for script in SCRIPTS:
        rows = tables[script.removesuffix(".py")]
        parts += [f"**{script}**", "", "| flag | default | meaning |", "|---|---|---|"]
        parts += [f"| `--{name}` | {default} | {help_text.replace('|', '/')} |"
                  for name, (default, help_text) in sorted(rows.items())]
        parts.append("")
    return "\n".join(parts)


if __name__ == "__main__":
    print(table())
