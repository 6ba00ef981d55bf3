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

# Run in a child per script: each script defines its flags on import, and the four share absl's
# global registry, so they cannot be imported into one process together.
_DUMP = """
import importlib, json, sys
from absl import flags
sys.path.insert(0, {root!r})
importlib.import_module({module!r})
rows = {{}}
for module, defined in flags.FLAGS.flags_by_module_dict().items():
    name = module.rsplit("/", 1)[-1].removesuffix(".py")
    if name in {own!r}:
        for flag in defined:
            rows[flag.name] = [str(flag.default), flag.help]
print(json.dumps(rows))
"""


def script_flags(script: str) -> dict[str, list[str]]:
    module = script.removesuffix(".py")
    code = _DUMP.format(root=ROOT, module=module, own=(module, *OWN_MODULES))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def table() -> str:
    parts = []
    for script in SCRIPTS:
        rows = script_flags(script)
        parts += [f"**{script}**", "", "| flag | default | meaning |", "|---|---|---|"]
        parts += [f"| `--{name}` | {default} | {help_text.replace('|', '/')} |"
                  for name, (default, help_text) in sorted(rows.items())]
        parts.append("")
    return "\n".join(parts)


if __name__ == "__main__":
    print(table())
