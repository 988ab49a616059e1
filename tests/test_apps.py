"""Every command-line program answers --help in one grammar: its own description and its config (key=value)."""
from __future__ import annotations

import importlib
import tomllib

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
}


@pytest.mark.parametrize("module", sorted(APPS))
def test_help_prints_the_description_and_the_config(module, cli):
    start, key = APPS[module]
    code, out, err = cli(module, "--help")
    assert code == 0, err
    assert out.startswith(start) and "== Config ==" in out and f"{key}:" in out.split("== Config ==")[1]


@pytest.mark.parametrize("module", ["genflow.apps.bench", "genflow.apps.plot_kinetic", "genflow.apps.plot_spd"])
def test_a_flag_style_argument_is_refused_with_the_grammar(module, cli):
    code, _, err = cli(module, "--out", "x")
    assert code == 2 and "is not key=value" in err and "fix:" in err and "Traceback" not in err


def test_every_console_script_is_an_apps_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"genflow-train", "genflow-sample", "genflow-evaluate", "genflow-leaderboard", "genflow-convert",
            "genflow-bench"} <= set(scripts)
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert module in APPS and function == "cli" and callable(getattr(importlib.import_module(module), "cli"))
