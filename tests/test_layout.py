"""The house rules a newcomer can rely on: imports run one way, and only the scripts (and cli.py,
their edge) read flags."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train_bert_lm", "train_bert_fine_tuning", "train_transform", "predict")
# Top to bottom; a module may import only from the layers below its own.
LAYERS = (("cli",), ("classifier_task", "pretrain_task", "serving"), ("train_util",),
          ("run_directory", "data.prepare"), ("data_util_hdf5",), ("model",))
PROJECT = {name.split(".")[0] for layer in LAYERS for name in layer} | set(SCRIPTS)


def module_file(name: str) -> str:
    path = os.path.join(ROOT, *name.split("."))
    return os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"


def imported_project_modules(path: str) -> set[str]:
    """Absolute imports of this project's modules anywhere in the file (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name for name in names if name.split(".")[0] in PROJECT}
    return found


def layer_of(name: str) -> int:
    for depth, layer in enumerate(LAYERS):
        if name in layer or name.split(".")[0] in layer:
            return depth
    raise AssertionError(f"{name} is in no layer")


def library_files() -> list[tuple[str, str]]:
    files = []
    for layer in LAYERS[1:]:
        for name in layer:
            if name == "model":
                folder = os.path.join(ROOT, "model")
                files += [(name, os.path.join(folder, f)) for f in sorted(os.listdir(folder))
                          if f.endswith(".py")]
            else:
                files.append((name, module_file(name)))
    return files


def test_imports_run_down_the_layers_only():
    wrong = []
    for name, path in [("cli", module_file("cli"))] + library_files():
        for imported in imported_project_modules(path):
            if imported.split(".")[0] in SCRIPTS or layer_of(imported) <= layer_of(name):
                wrong.append(f"{os.path.relpath(path, ROOT)} imports {imported}")
    assert not wrong, wrong


def test_only_scripts_and_cli_read_flags():
    readers = [os.path.relpath(path, ROOT) for _, path in library_files()
               if "FLAGS" in open(path, encoding="utf-8").read()
               or "absl" in open(path, encoding="utf-8").read()]
    assert not readers, readers
