"""Every command-line program answers --help in one grammar: its own description and its config (key=value)."""
from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT

APPS = {  # module -> the start of its description, a key of its config
    "genflow.apps.train": ("genflow: train continuous-time generative models", "max_steps"),
    "genflow.apps.sample": ("sample.py: sample a trained genflow checkpoint", "guidance"),
    "genflow.apps.evaluate": ("python -m genflow.apps.evaluate: FID", "seed_sets"),
    "genflow.apps.leaderboard": ("python -m genflow.apps.leaderboard: train or load each entry", "precision"),
    "genflow.apps.convert": ("Import NVlabs EDM / PFGM++ network pickles", "overwrite"),
    "genflow.apps.bench": ("Throughput benchmarks", "matmul_precision"),
    "genflow.apps.plot_spd": ("Plot SPD's per-frequency schedules", "source"),
    "genflow.apps.plot_kinetic": ("Plot lambda-hat(s)", "queries"),
    "genflow.apps.dataset": ("Write a data set in EDM's archive format", "max_images"),
    "genflow.apps.posthoc": ("python -m genflow.apps.posthoc RUN sigma_rel=", "sigma_rel"),
}


@pytest.mark.parametrize("module", sorted(APPS))
def test_help_prints_the_description_and_the_config(module, cli):
    start, key = APPS[module]
    code, out, err = cli(module, "--help")
    assert code == 0, err
    assert out.startswith(start) and "== Config ==" in out and f"{key}:" in out.split("== Config ==")[1]


@pytest.mark.parametrize("module", ["genflow.apps.bench", "genflow.apps.plot_kinetic", "genflow.apps.plot_spd",
                                    "genflow.apps.dataset"])
def test_a_flag_style_argument_is_refused_with_the_grammar(module, cli):
    code, _, err = cli(module, "--out", "x")
    assert code == 2 and "is not key=value" in err and "fix:" in err and "Traceback" not in err


def test_bench_stopped_by_ctrl_c_says_so_in_one_line(cli, tmp_path, monkeypatch):
    import json

    lines = tmp_path / "suite.jsonl"
    lines.write_text('{"what": "train-step"}\n')

    def interrupted(*args, **kwargs):  # Ctrl-C while the lines are read
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "loads", interrupted)
    code, _, err = cli("genflow.apps.bench", "what=table", f"table={lines}")
    err = [line for line in err.strip().splitlines() if "RuntimeWarning" not in line]  # runpy's, in-process
    assert code == 130 and err == ["stopped by SIGINT while benchmarking: the lines above are what was measured; run "
                                   "the same command again for the rest"], err


def test_every_console_script_is_an_apps_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"genflow-train", "genflow-sample", "genflow-evaluate", "genflow-leaderboard", "genflow-convert",
            "genflow-bench"} <= set(scripts)
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert module in APPS and function == "cli" and callable(getattr(importlib.import_module(module), "cli"))


def test_evaluate_says_what_to_use_for_a_model_without_an_image_fid(cli, tmp_path):
    """A model of 2-D points has no image FID: evaluate names the likelihood and the sliced Wasserstein distance
    instead, before it loads the model."""
    code, out, err = cli("train.py", "model=flow", "data=toy2d", "net=mlp_small", "data.batch_size=16",
                         "trainer.max_steps=2", "trainer.val_check_interval=2", "optim.warmup_steps=1", "sample.num=4",
                         "sample.steps=2", "logger=none", "~callbacks.lr_monitor", "trainer.enable_progress_bar=false",
                         f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, err[-2000:]
    ckpt = tmp_path / "run" / "checkpoints" / "final.ckpt"
    code, _, err = cli("genflow.apps.evaluate", f"ckpt={ckpt}", "device=cpu")
    assert code == 2 and "no image FID" in err and "nll=true" in err and "sliced_wasserstein" in err


@pytest.mark.parametrize("module, args, written", [
    ("genflow.apps.plot_spd", ["source=constants"], ["spd_schedules.png", "spd_schedules.json"]),
    ("genflow.apps.plot_kinetic", ["data=checkerboard", "n=256", "queries=1"],
     ["lambda_checkerboard.png", "ko_path_checkerboard.png"])])
def test_plot_apps_write_whole_files_and_refuse_an_unwritable_folder(module, args, written, cli, tmp_path,
                                                                     monkeypatch):
    import json

    from PIL import Image

    monkeypatch.setenv("GENFLOW_METRICS_HOME", str(tmp_path / "metrics"))
    code, _, err = cli(module, *args, f"out={tmp_path / 'plots'}")
    assert code == 0, err[-2000:]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(written)  # no temporary file left
    for name in written:
        if name.endswith(".png"):
            with Image.open(tmp_path / "plots" / name) as image:
                assert image.format == "PNG" and image.size[0] > 100
        else:
            json.loads((tmp_path / "plots" / name).read_text())
    import os

    locked = tmp_path / "locked"  # refused by os.access, as a folder of another user is (tests may run as root)
    locked.mkdir()
    real_access = os.access
    with monkeypatch.context() as m:
        m.setattr(os, "access", lambda path, mode, *a, **k: False if mode & os.W_OK and
                  Path(path).resolve() == locked.resolve() else real_access(path, mode, *a, **k))
        code, _, err = cli(module, *args, f"out={locked / 'plots'}")
    assert code == 2 and "cannot be written" in err and "fix:" in err and "Traceback" not in err
    assert not any(locked.iterdir())
