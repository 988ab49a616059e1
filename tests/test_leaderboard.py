"""The FID leaderboard: the smoke suite end to end, suite validation, and the GPU workflow file."""
import importlib
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from genflow.errors import ConfigError
from genflow.apps.leaderboard import COLUMNS, entry_overrides, load_suite, resolve_steps, run, suites

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "fid-leaderboard.yml"


@pytest.mark.slow
def test_smoke_suite_writes_a_well_formed_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GENFLOW_METRICS_HOME", str(tmp_path / "metrics"))
    monkeypatch.chdir(tmp_path)
    result = run(["suite=smoke", f"out={tmp_path / 'lb'}"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == result
    table = json.loads((tmp_path / "lb" / "leaderboard.json").read_text())
    suite = load_suite("smoke")
    assert table["suite"] == "smoke" and len(table["rows"]) == len(suite["entries"])
    for row, entry in zip(table["rows"], suite["entries"]):
        assert set(COLUMNS) <= set(row)
        assert row["name"] == entry["name"] and row["dataset"] == "digits" and row["images"] == 200
        assert row["NFE"] == 15 and row["train_steps"] == entry["budget"]["steps"]
        # a briefly trained model: finite, positive, and far from noise-level digits-FID (~110)
        assert math.isfinite(row["FID"]) and 0 < row["FID"] < 100
        assert row["img/s"] > 0 and row["wall_s"] > 0 and row["revision"] and row["device"]
    assert [r["settings"] for r in table["rows"]] == ["inf", 128]
    md = (tmp_path / "lb" / "leaderboard.md").read_text().splitlines()
    header = next(i for i, line in enumerate(md) if line.startswith("| name"))
    assert md[header] == "| " + " | ".join(COLUMNS) + " |"
    body = [line for line in md[header + 2:] if line.startswith("|")]
    assert len(body) == len(suite["entries"])
    assert all(line.count("|") == len(COLUMNS) + 1 for line in body)
    # the header names the suite's file and the FID settings the rows used (num and precision as given)
    assert "configs/leaderboard/suite/smoke.yaml`" in md[2] and '"precision": "fp32"' in md[2]
    assert json.loads(md[2].split("FID settings: `")[1].rstrip("`.")) == {**suite["fid"], "precision": "fp32"}


def test_the_table_header_states_the_settings_given():
    from genflow.apps.leaderboard import markdown

    suite = load_suite("smoke")
    header = markdown(suite, [], num=100, precision="bf16").splitlines()[2]
    assert json.loads(header.split("FID settings: `")[1].rstrip("`.")) == {**suite["fid"], "num": 100,
                                                                           "precision": "bf16"}


@pytest.mark.parametrize("name", suites())
def test_every_suite_entry_composes(name, tmp_path):
    from genflow.config import build_method, compose

    suite = load_suite(name)
    for entry in suite["entries"]:
        if entry.get("ckpt") or "pickle" in entry:  # loaded, not trained (pickle: tests/test_convert.py)
            continue
        cfg = compose(entry_overrides(entry, suite, tmp_path / entry["name"]), environment=False)
        assert cfg.trainer.max_steps == entry["budget"]["steps"]
        method = build_method(cfg)
        steps = resolve_steps(method, entry, "heun")
        if entry.get("nfe"):
            assert method.nfe(steps, "heun") == entry["nfe"]
    if name == "cifar10":  # the paper protocol: 35 NFE = 18 Heun steps, 3 x 50k seeds, TF-Inception
        assert resolve_steps(build_method(cfg), suite["entries"][0], "heun") == 18
        assert suite["fid"]["mode"] == "legacy_tensorflow" and suite["fid"]["seed_sets"] == 3


def test_bad_suites_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="smoke"):
        load_suite("no-such-suite")
    bad = tmp_path / "bad.yaml"
    bad.write_text("entries:\n  - {method: edm, dataset: digits, learning_rate: 1}\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_suite(str(bad))
    from genflow.methods import EDM

    with pytest.raises(ConfigError, match="NFE 36"):
        resolve_steps(EDM(), {"name": "x", "nfe": 36}, "heun")
    with pytest.raises(ConfigError, match="bogus"):
        run(["suite=smoke", "bogus=1"])


def test_workflow_parses_and_calls_existing_commands():
    wf = yaml.safe_load(WORKFLOW.read_text())
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads the bare key `on` as a boolean
    assert "workflow_dispatch" in triggers
    job = wf["jobs"]["leaderboard"]
    assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
    default_suite = triggers["workflow_dispatch"]["inputs"]["suite"]["default"]
    assert default_suite in suites()
    runs = "\n".join(step.get("run", "") for step in job["steps"])
    # every `python -m module` exists, every make target exists, imported names exist
    modules = re.findall(r"python -m ([\w.]+)", runs)
    assert "genflow.apps.leaderboard" in modules
    for mod in modules:
        assert importlib.util.find_spec(mod) is not None, mod
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"\bmake (\w+)", runs):
        assert re.search(rf"^{target}:", makefile, re.M), target
    for mod, name in re.findall(r"from ([\w.]+) import (\w+)", runs):
        assert hasattr(importlib.import_module(mod), name)
    uploads = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert "leaderboard/${{ env.SUITE }}/leaderboard.md" in uploads["with"]["path"]
    assert "out=leaderboard/$SUITE" in runs


@pytest.mark.slow
def test_leaderboard_hydra_app_trains_into_its_out_folder(tmp_path, monkeypatch, cli):
    """Through the command line (a Hydra app): a 2-step entry trains under out=, not in the working folder,
    and the last line is the leaderboard's JSON line with the precision."""
    monkeypatch.setenv("GENFLOW_METRICS_HOME", str(tmp_path / "metrics"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = cli("genflow.apps.leaderboard", "suite=smoke", "only=edm", "num=20",
                         "suite.entries.0.budget.steps=2", f"out={tmp_path / 'lb'}")
    assert code == 0, err[-2000:]
    last = json.loads(out.strip().splitlines()[-1])
    assert last["entries"] == 1 and last["precision"] == "fp32" and math.isfinite(last["fid"]["edm"])
    assert (tmp_path / "lb" / "runs" / "edm" / "checkpoints" / "final.ckpt").is_file()
    assert not list(work.iterdir())
