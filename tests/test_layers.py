"""The package's layers: every module imports only lower layers or its own package, and never another
package's private (`_name`) module. Read from the source with `ast`, so nothing needs importing."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "longred"

# Layer of each top-level part of longred; a module may import strictly lower layers and its own part.
# precompute, train and eval are peer stages: data flows corpus -> precompute -> storage -> train -> eval
# through storage's public API, never from one stage into another.
LAYERS = {
    "base": 0,
    "__init__": 1,
    "corpus": 1,
    "models": 2,
    "ops": 3,
    "storage": 3,
    "precompute": 4,
    "train": 4,
    "eval": 4,
    "recipes": 5,
    "benchmarks": 5,
    "cli": 6,
    "__main__": 7,
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> dict[str, Path]:
    found = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return found


def _imports(module: str, file: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every `longred` import in a file, function-level ones included."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("longred")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("longred"):
                names = [f"{target}.{a.name}" for a in node.names]
                # `from longred.x import y`: y is a module of x or a name in it; judge the module path
                out += [
                    (node.lineno, n if n.removeprefix("longred.") and _is_module(n) else target)
                    for n in names
                ]
    return out


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def layer_violations(modules: dict[str, Path]) -> list[str]:
    problems = []
    for module, file in sorted(modules.items()):
        own = _part(module)
        if own not in LAYERS:
            problems.append(f"{module}: part {own!r} has no layer in tests/test_layers.py")
            continue
        for line, target in _imports(module, file):
            other = _part(target)
            where = f"{module}:{line} imports {target}"
            if other != own and LAYERS.get(other, 99) >= LAYERS[own]:
                problems.append(f"{where}: layer {other} is not below {own}")
            private = [p for p in target.split(".")[2:] if p.startswith("_") and p != "__init__"]
            if other != own and private:
                problems.append(f"{where}: private module of {other}")
    return problems


def test_imports_only_look_down():
    modules = _modules()
    assert len(modules) > 40
    assert layer_violations(modules) == []


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("longred.storage._reader", "from longred.train.data import Streams\n", "layer train is not below"),
        ("longred.eval.run", "from longred.train import objectives\n", "layer train is not below"),
        ("longred.train.data", "from longred.storage._reader import TeacherCache\n", "private module"),
        ("longred.corpus.windows", "def f():\n    from longred.models import loading\n", "not below"),
        ("longred.ops.capture", "from ..precompute import job\n", "layer precompute is not below"),
    ],
)
def test_a_bad_import_is_named(tmp_path, module, source, expected):
    """The check itself: an upward, sideways or private import in a module is reported with its line."""
    file = tmp_path / (module.rsplit(".", 1)[1] + ".py")
    file.write_text(source)
    (problem,) = layer_violations({module: file})
    assert expected in problem and ":" in problem
