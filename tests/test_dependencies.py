"""Declared dependencies (pyproject.toml) are exactly the third-party packages the code imports, and
figures are drawn without pyplot."""
import ast
import functools
import re
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("genflow", "train.py", "sample.py", "scripts")

# declared without an import statement of ours: the name that needs it must still appear in the code
RUN_TIME_ONLY = {"tensorboard": "TensorBoardLogger"}
# import names of optional distributions that need not be installed to run the tests
NOT_INSTALLED = {"open-clip-torch": "open_clip"}
# top-level modules of the reference code extracts that the side-by-side tests load from EDM_DIR / PFGMPP_DIR
# (never installed, never a dependency)
REFERENCE_EXTRACTS = {"dnnlib", "training", "torch_utils", "generate"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    return _norm(re.match(r"[A-Za-z0-9_.\-]+", spec.strip()).group(0))


def _pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _catches_import_error(node: ast.Try) -> bool:
    names = []
    for handler in node.handlers:
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        names += [t.id for t in types if isinstance(t, ast.Name)]
    return bool({"ImportError", "ModuleNotFoundError"} & set(names))


def _imports(tree: ast.AST, guarded: bool = False):
    """(top-level module, guarded) for every absolute import; guarded = inside try/except ImportError."""
    if isinstance(tree, ast.Import):
        for alias in tree.names:
            yield alias.name.split(".")[0], guarded
    elif isinstance(tree, ast.ImportFrom) and tree.level == 0:
        yield tree.module.split(".")[0], guarded
    if isinstance(tree, ast.Try) and _catches_import_error(tree):
        for child in tree.body:
            yield from _imports(child, True)
        for child in [*tree.handlers, *tree.orelse, *tree.finalbody]:
            yield from _imports(child, guarded)
        return
    for child in ast.iter_child_nodes(tree):
        yield from _imports(child, guarded)


def _third_party(paths) -> dict[str, bool]:
    """import name -> True when every import of it is guarded (an optional dependency)."""
    local = {p.stem for p in ROOT.glob("*.py")} | {p.stem for p in ROOT.glob("scripts/*.py")} | \
            {p.stem for p in ROOT.glob("tests/*.py")} | {"genflow", "scripts", "tests"} | REFERENCE_EXTRACTS
    found: dict[str, bool] = {}
    for path in paths:
        for name, guarded in _imports(ast.parse(path.read_text(), str(path))):
            if name in sys.stdlib_module_names or name in local:
                continue
            found[name] = found.get(name, True) and guarded
    return found


def _files(*entries):
    for entry in entries:
        path = ROOT / entry
        yield from sorted(path.rglob("*.py")) if path.is_dir() else [path]


@functools.cache
def _import_names(dist: str) -> frozenset[str]:
    """Top-level modules a distribution installs (its top_level.txt, else the first parts of its RECORD)."""
    if dist in NOT_INSTALLED:
        return frozenset({NOT_INSTALLED[dist]})
    meta = distribution(dist)
    top = meta.read_text("top_level.txt")
    if top:
        return frozenset(top.split())
    first = {f.parts[0] if len(f.parts) > 1 else f.name.split(".")[0] for f in meta.files or []}
    return frozenset(n for n in first if not n.endswith((".dist-info", ".data")) and n not in ("..", "__pycache__"))


def _providers(import_name: str, declared: set[str]) -> set[str]:
    return {dist for dist in declared if import_name in _import_names(dist)}


def test_declared_dependencies_equal_imported_ones():
    project = _pyproject()
    required = {_requirement_name(r) for r in project["dependencies"]}
    extras = {extra: {_requirement_name(r) for r in reqs}
              for extra, reqs in project["optional-dependencies"].items()}
    optional = set().union(*(reqs for extra, reqs in extras.items() if extra != "dev"))
    imported = _third_party(_files(*SOURCES))

    used: set[str] = set()
    for name, guarded in sorted(imported.items()):
        dists = _providers(name, required | optional if guarded else required)
        used |= dists
        assert dists, (f"`import {name}` comes from no distribution declared in pyproject.toml "
                       f"{'[project.optional-dependencies]' if guarded else '[project] dependencies'}")
    code = "".join(p.read_text() for p in [*_files(*SOURCES), *sorted((ROOT / "configs").rglob("*.yaml"))])
    for dist, needed_by in RUN_TIME_ONLY.items():
        assert dist in required and needed_by in code, f"{dist} is declared for {needed_by}, which the code no longer uses"
    unused = (required | optional) - used - set(RUN_TIME_ONLY)
    assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"


def test_test_dependencies_are_declared_in_dev():
    project = _pyproject()
    required = {_requirement_name(r) for r in project["dependencies"]}
    dev = {_requirement_name(r) for r in project["optional-dependencies"]["dev"]}
    imported = _third_party(_files("tests"))
    used = set()
    for name in sorted(imported):
        dists = _providers(name, required | dev)
        used |= dists
        assert dists, f"tests import {name}, which no distribution of the dependencies or the dev extra provides"
    assert dev <= used, f"dev extra declares {sorted(dev - used)}, which no test imports"


def test_save_grid_draws_without_pyplot_or_a_backend_switch(tmp_path, monkeypatch):
    """2-D samples are drawn on an Agg canvas of their own: pyplot is never imported and the global
    backend is never switched (so a caller's interactive matplotlib session is left alone)."""
    import matplotlib

    from genflow.sampling import save_grid  # imported first: torchmetrics, if it comes along, loads pyplot itself

    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # any `import matplotlib.pyplot` raises
    monkeypatch.setattr(matplotlib, "use", lambda *a, **k: pytest.fail("matplotlib.use was called"))
    path = save_grid(torch.randn(200, 2, generator=torch.Generator().manual_seed(0)), tmp_path / "points.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
