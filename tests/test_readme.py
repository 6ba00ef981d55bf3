"""The README promises every flag with its default and help; hold it to the code."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import flags_table  # noqa: E402


@pytest.mark.slow
def test_readme_lists_every_flag_of_every_script_as_defined():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = flags_table.table()
    assert "`--freeze_backbone`" in table and "`--export_dir`" in table and "`--toy_task`" in table
    assert table in readme, "README flags table is stale: run python tools/flags_table.py"
