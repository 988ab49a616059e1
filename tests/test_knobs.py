"""A method that is not part of genflow, with a knob of its own: one Python file and one yaml (found through
``hydra.searchpath``) are all it takes to train, sample and evaluate it from the command line. This is the worked
example of docs/adding.md."""
from __future__ import annotations

import json
import textwrap

import pytest

from genflow.knobs import Knob

METHOD = '''
"""EDM whose time-step exponent rho (Karras et al. 2022, Eq. 5) is a bare command-line knob."""
from genflow.knobs import Knob
from genflow.methods.edm import EDM


class SteppedEDM(EDM):
    knobs = (Knob("spacing", float, 7.0, "the exponent rho of EDM's time steps", lo=0, lo_open=True),)

    def __init__(self, spacing: float = 7.0, **kwargs):
        super().__init__(rho=spacing, **kwargs)
        self.spacing = spacing

    def describe(self) -> dict:
        return {"method": "SteppedEDM", "spacing": self.spacing}
'''

CONFIG = '''
_target_: my_methods.SteppedEDM
spacing: ${knob:spacing}
sigma_min: 0.002
sigma_max: 80.0
'''


@pytest.fixture
def own_method(tmp_path, monkeypatch):
    (tmp_path / "my_methods.py").write_text(textwrap.dedent(METHOD))
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "stepped.yaml").write_text(textwrap.dedent(CONFIG))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_method_of_ones_own_trains_samples_and_evaluates(own_method, cli, monkeypatch):
    root = own_method
    monkeypatch.setenv("GENFLOW_METRICS_HOME", str(root / "metrics"))
    search = f"hydra.searchpath=[file://{root / 'conf'}]"
    code, out, err = cli("train.py", search, "model=stepped", "spacing=5", "data=digits", "net=unet_tiny",
                         "data.batch_size=8", "trainer.max_steps=2", "trainer.val_check_interval=2",
                         "sample.num=4", "sample.steps=2", "optim.warmup_steps=1", "logger=csv",
                         "trainer.enable_progress_bar=false", f"hydra.run.dir={root / 'run'}")
    assert code == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["model"] == "stepped" and result["spacing"] == 5.0  # the knob in the run's JSON line
    ckpt = result["checkpoint"]

    code, out, err = cli("sample.py", f"ckpt={ckpt}", "num=2", "steps=2", f"out={root / 'samples'}", "device=cpu")
    assert code == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1])["num"] == 2

    code, out, err = cli("genflow.apps.evaluate", f"ckpt={ckpt}", "fid.num=8", "fid.steps=2", "fid.batch_size=8",
                         "device=cpu")
    assert code == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1])["fid"] >= 0

    # the declaration is what the checks read: a value out of its range, and the knob on another model
    code, _, err = cli("train.py", search, "model=stepped", "spacing=0", f"hydra.run.dir={root / 'bad'}")
    assert code == 2 and "spacing" in err and "> 0" in err
    code, _, err = cli("train.py", search, "model=edm", "spacing=5", f"hydra.run.dir={root / 'bad'}")
    assert code == 2 and "does not apply to the chosen model" in err


def test_knob_problems():
    knob = Knob("D", float, 128, "augmented dimensions", lo=0, lo_open=True)
    assert knob.problem(64) is None and knob.problem(float("inf")) is None and knob.problem(None) is None
    assert knob.problem(0) == "it must be > 0" and knob.problem("x") == "it must be a number"
    assert Knob("stage", int, 1, "", choices=(1, 2)).problem(3) == "it must be one of 1, 2"
    assert Knob("stage", int, 1, "").problem(True) == "it must be an integer"
