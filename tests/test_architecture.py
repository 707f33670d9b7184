"""The floors of DESIGN.md hold: no module imports a higher floor, at module level or inside a
function (a function-level import is still a dependency, only a later one).

    cli, report                      what users run
    eval, train, hf                  evaluations, training loops, transformers integration
    nn, distributed                  modules, caches, generation; context parallel
    ops                              the functional surface and the mechanism registry
    backends                         reference, blocked, flex, triton, sdpa
    patterns                         Pattern -> BlockLayout

`sparse_attn/__init__.py` (the public surface), `_extras.py` (optional-dependency helpers),
`_checks.py` (argument checks), `_lru.py` (the bounded cache) and `_env.py` (the environment
record of results), the last four used by any floor, stand outside the floors."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sparse_attn"
FLOORS = {"patterns": 0, "backends": 1, "ops": 2, "nn": 3, "distributed": 3, "eval": 4, "train": 4, "hf": 4,
          "cli": 5, "report": 5}
OUTSIDE = {"__init__", "_extras", "_checks", "_lru", "_env", "__main__"}


def _package_of(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def _imports(path: Path):
    """(line, imported top-level package of sparse_attn) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(SRC).with_suffix("").parts[:-1]  # the folder a `from .` means
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sparse_attn."):
                    yield node.lineno, alias.name.split(".")[1]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("sparse_attn."):
                    yield node.lineno, node.module.split(".")[1]
                elif node.module == "sparse_attn":
                    for alias in node.names:
                        yield node.lineno, _home(alias.name)
                continue
            base = list(package[:len(package) - (node.level - 1)])  # `from .` = this package
            target = base + (node.module.split(".") if node.module else [])
            if target:
                yield node.lineno, target[0]
            else:  # `from .. import x` at the package root: x is a subpackage or a re-exported name
                for alias in node.names:
                    yield node.lineno, _home(alias.name)


def _home(name: str) -> str:
    """The top-level package that defines `sparse_attn.<name>` (a subpackage, or where the root
    re-exports it from): importing it from the root depends on that floor."""
    import sparse_attn

    if (SRC / name).is_dir() or (SRC / f"{name}.py").exists():
        return name
    obj = getattr(sparse_attn, name, None)
    module = getattr(obj, "__module__", None) or ""
    return module.split(".")[1] if module.startswith("sparse_attn.") else name


MODULES = sorted(p for p in SRC.rglob("*.py") if _package_of(p) not in OUTSIDE)


def test_every_module_is_on_a_floor():
    assert {_package_of(p) for p in MODULES} <= set(FLOORS), "a new top-level package needs a floor here"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path):
    own = FLOORS[_package_of(path)]
    upward = [f"line {line}: imports sparse_attn.{target} (floor {FLOORS[target]} > {own})"
              for line, target in _imports(path) if target in FLOORS and FLOORS[target] > own]
    assert not upward, f"{path.relative_to(SRC)} imports upward: " + "; ".join(upward)


# The upper floors hold each command / page in its own module: they share public helpers only
# (cli/args.py, eval/arguments.py, report/text.py), and none imports another in a circle.
COMMAND_FOLDERS = ("cli", "report")


def _local_imports(path: Path):
    """(imported sibling module, names) for each `from .x import ...` / `from . import x` of the same folder."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                yield node.module.split(".")[0], [a.name for a in node.names]
            else:
                for alias in node.names:
                    yield alias.name, []


@pytest.mark.parametrize("folder", COMMAND_FOLDERS)
def test_command_modules_share_no_private_names_and_no_circle(folder):
    paths = {p.stem: p for p in (SRC / folder).glob("*.py")}
    private = [f"{name}.py imports {module}.{n}" for name, p in paths.items() for module, names in _local_imports(p)
               for n in names if n.startswith("_")]
    assert not private, f"private names imported across {folder}/ modules: " + "; ".join(private)
    graph = {name: {m for m, _ in _local_imports(p) if m in paths and m != name} for name, p in paths.items()}

    def reach(start):
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen

    circles = sorted(name for name in graph if name in reach(name))
    assert not circles, f"{folder}/ modules that import themselves through others: {circles}"
