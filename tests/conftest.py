import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest
import torch

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def run_cli(entry: str, *args: str):
    """Run a command-line entry point in this process, as a user would from the repository root.

    ``entry`` is a script of the repository (``"train.py"``, ``"sample.py"``) or a module
    (``"genflow.evaluate"``). Returns ``(exit_code, stdout, stderr)``. In-process calls skip the
    interpreter start and the Lightning import that a subprocess pays each time.
    """
    import contextlib
    import io
    import runpy
    import sys

    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    code = 0
    try:
        sys.argv = [entry, *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if entry.endswith(".py"):
                runpy.run_path(str(ROOT / entry), run_name="__main__")
            else:
                runpy.run_module(entry, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def cli():
    """``cli("sample.py", "ckpt=...", ...) -> (exit_code, stdout, stderr)``, in-process."""
    return run_cli
