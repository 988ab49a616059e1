"""Post-hoc EMA (EDM2, Karras et al. 2024, Section 3) against mathematics and against directly tracked EMAs.

* σ_rel <-> γ: the profile's relative standard deviation integrated numerically (scipy.integrate.quad) and
  solved for γ with a root finder, against ``gamma_of``'s cubic; EDM2's published pair (0.05 -> 16.97,
  0.10 -> 6.94).
* The inner product of two profiles in closed form against numerical integration.
* The reconstruction's weights applied to the *discrete* EMA profiles (computed by running the β recursion on
  a basis, independently of the closed forms) match the target EMA's discrete profile; the fit's residual is
  reported.
* A tiny training run that also tracks the target width directly: the reconstruction from the other two
  widths equals the direct EMA up to exactly the profile mismatch applied to the recorded raw weights, and
  within the bound ‖w_rec - w_target‖₁ · max_τ ‖θ_τ - θ_T‖_∞ (the snapshot-spacing error).
* Kill and resume: snapshots and averages bit-identical to an uninterrupted run; the app's errors.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from genflow.training.posthoc import (gamma_of, power_beta, profile_dot, reconstruct, run_snapshots,
                                      sigma_rel_of, solve_weights)


def _sigma_rel_numeric(gamma: float) -> float:
    """σ_rel of p(τ) = (γ+1) τ^γ on [0, 1] by quadrature (t = 1: σ_rel is scale-free), written in s = -ln τ
    (p(τ) dτ = (γ+1) e^{-(γ+1)s} ds on [0, ∞)) so that a large γ's spike at τ = 1 is a smooth exponential."""
    from scipy.integrate import quad

    moment = lambda k: quad(lambda s: math.exp(-k * s) * (gamma + 1) * math.exp(-(gamma + 1) * s),  # noqa: E731
                            0, math.inf, epsabs=0, epsrel=1e-12)[0]
    mass, first, second = moment(0), moment(1), moment(2)
    return math.sqrt(second / mass - (first / mass) ** 2)


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.08, 0.10, 0.15, 0.25])
def test_gamma_of_solves_the_defining_equation(sigma_rel):
    from scipy.optimize import brentq

    expected = brentq(lambda g: _sigma_rel_numeric(g) - sigma_rel, 1e-6, 1e4, xtol=1e-12, rtol=1e-13)
    assert gamma_of(sigma_rel) == pytest.approx(expected, rel=1e-7)
    assert sigma_rel_of(gamma_of(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)


def test_edm2_published_exponents():
    # EDM2 Section 3: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94
    assert round(gamma_of(0.05), 2) == 16.97 and round(gamma_of(0.10), 2) == 6.94


def test_widths_outside_the_power_family_are_refused():
    from genflow.errors import ConfigError

    for bad in (0.0, -0.1, 0.29, 1.0):
        with pytest.raises(ConfigError, match="0 < σ_rel"):
            gamma_of(bad)


@pytest.mark.parametrize("t_a,g_a,t_b,g_b", [(100, 16.97, 100, 6.94), (40, 6.94, 100, 16.97), (100, 3.0, 30, 9.5)])
def test_profile_inner_product_against_quadrature(t_a, g_a, t_b, g_b):
    from scipy.integrate import quad

    p = lambda tau, t, g: (g + 1) * tau ** g / t ** (g + 1) if tau <= t else 0.0  # noqa: E731
    m = min(t_a, t_b)
    numeric = quad(lambda tau: p(tau, t_a, g_a) * p(tau, t_b, g_b), 0, m, epsabs=0, epsrel=1e-12)[0]
    assert float(profile_dot(t_a, g_a, t_b, g_b)) == pytest.approx(numeric, rel=1e-9)


def _discrete_profile(t: int, gamma: float, length: int) -> np.ndarray:
    """Weights of θ_1..θ_length in the power EMA after step t, by running the update on a basis."""
    w = np.zeros(length)
    for step in range(1, t + 1):
        beta = (1.0 - 1.0 / step) ** (gamma + 1.0)
        w *= beta
        w[step - 1] += 1.0 - beta
    return w


def test_reconstructed_profile_matches_the_target_profile():
    T, every, target = 400, 20, 0.08
    steps = list(range(every, T + 1, every))
    pairs = [(t, s) for t in steps for s in (0.05, 0.10)]
    fit = solve_weights([t for t, _ in pairs], [gamma_of(s) for _, s in pairs], T, gamma_of(target))
    assert fit.weights.sum() == pytest.approx(1.0, abs=1e-12)
    combined = sum(x * _discrete_profile(t, gamma_of(s), T) for x, (t, s) in zip(fit.weights, pairs))
    wanted = _discrete_profile(T, gamma_of(target), T)
    discrete = np.linalg.norm(combined - wanted) / np.linalg.norm(wanted)
    print(f"continuous L2 residual {fit.residual:.3e}, discrete profile residual {discrete:.3e}, "
          f"L1 mismatch {np.abs(combined - wanted).sum():.3e}")
    # the fit is good in the continuous norm and carries over to the actual (discrete) EMA weights
    assert fit.residual < 5e-3
    assert discrete < 1.5 * fit.residual
    assert np.abs(combined - wanted).sum() < 5e-3
    # a width that was tracked is reproduced exactly
    exact = solve_weights([t for t, _ in pairs], [gamma_of(s) for _, s in pairs], T, gamma_of(0.05))
    assert exact.residual < 1e-6


def test_power_beta_matches_the_unrolled_profile():
    # step tau's weight after t steps is (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1)
    g, t = 6.94, 50
    tau = np.arange(1, t + 1)
    closed = (tau ** (g + 1) - (tau - 1) ** (g + 1)) / t ** (g + 1)
    np.testing.assert_allclose(_discrete_profile(t, g, t), closed, rtol=1e-10, atol=1e-15)
    assert power_beta(1, g) == 0.0


# --- a tiny run ------------------------------------------------------------------------------------
BASE = ["model=edm", "data=digits", "net=unet_tiny", "data.batch_size=16", "ema=posthoc",
        "ema.snapshot_kimg=0.08", "optim.warmup_steps=2", "checkpoint.every_n_steps=0", "sample.num=4",
        "sample.steps=2", "logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


class _Recorder:
    """Lightning callback recording the raw floating-point weights after every optimizer step."""

    def __new__(cls):
        import pytorch_lightning as pl

        class Recorder(pl.Callback):
            def __init__(self):
                self.weights = []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.weights.append(torch.cat([p.detach().double().flatten() for p in pl_module.net.parameters()]))

        return Recorder()


def test_reconstruction_equals_the_directly_tracked_ema(tmp_path):
    from genflow.config import build, compose
    from genflow.apps.train import make_trainer

    T, target = 40, 0.08
    cfg = compose([*BASE, "ema.sigma_rel=[0.05,0.1,0.08]", f"trainer.max_steps={T}", f"+run_dir={tmp_path}"])
    module, dm = build(cfg)
    trainer = make_trainer(cfg, tmp_path, enable_model_summary=False)
    recorder = _Recorder()
    trainer.callbacks.append(recorder)
    trainer.fit(module, datamodule=dm)
    snaps = run_snapshots(tmp_path)
    assert [s["step"] for s in snaps] == list(range(5, T + 1, 5))  # 80 images / 16 per step
    # the snapshots of 0.05 and 0.10 only; the directly tracked 0.08 is what they must reproduce
    two = [{**s, "sigma_rel": s["sigma_rel"][:2], "state_dicts": s["state_dicts"][:2]} for s in snaps]
    rebuilt, fit = reconstruct(two, target)
    direct = snaps[-1]["state_dicts"][2]
    names = [f"net.{n}" for n, _ in module.net.named_parameters()]
    flat = lambda sd: torch.cat([sd[n].double().flatten() for n in names])  # noqa: E731
    error = flat(rebuilt) - flat(direct)
    # the profile mismatch, applied to the recorded trajectory, predicts the error exactly
    pairs = [(int(s["step"]), g) for s in two for g in (0.05, 0.10)]
    w_rec = sum(x * _discrete_profile(t, gamma_of(s), T) for x, (t, s) in zip(fit.weights, pairs))
    w_tgt = _discrete_profile(T, gamma_of(target), T)
    theta = torch.stack(recorder.weights)  # (T, params)
    predicted = torch.as_tensor(w_rec - w_tgt) @ theta
    scale = theta.abs().max().item()
    assert (error - predicted).abs().max().item() < 64 * T * 2 ** -24 * scale  # float32 EMA arithmetic
    # and the bound: L1 profile mismatch times the spread of the trajectory
    spread = (theta - theta[-1]).abs().max().item()
    bound = np.abs(w_rec - w_tgt).sum() * spread
    print(f"fit residual {fit.residual:.3e}; max |rebuilt - direct| {error.abs().max().item():.3e} <= bound "
          f"{bound:.3e}")
    assert error.abs().max().item() <= bound + 64 * T * 2 ** -24 * scale


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 20-step run with ema=posthoc, and the same run stopped at step 10 and resumed to 20."""
    from genflow.config import compose
    from genflow.apps.train import train

    root = tmp_path_factory.mktemp("posthoc")
    whole, parts = root / "whole", root / "parts"
    train(compose([*BASE, "trainer.max_steps=20", f"+run_dir={whole}"]))
    train(compose([*BASE, "trainer.max_steps=10", f"+run_dir={parts}"]))
    train(compose([*BASE, "trainer.max_steps=20", "ckpt_path=last", f"+run_dir={parts}"]))
    return whole, parts


def test_snapshots_and_averages_survive_kill_and_resume_bit_exactly(runs):
    from genflow.config import read_checkpoint

    whole, parts = runs
    a, b = run_snapshots(whole), run_snapshots(parts)
    assert [s["step"] for s in a] == [s["step"] for s in b] == [5, 10, 15, 20]
    for sa, sb in zip(a, b):
        for da, db in zip(sa["state_dicts"], sb["state_dicts"]):
            assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)
    la, lb = (read_checkpoint(p / "checkpoints" / "last.ckpt") for p in (whole, parts))
    for xa, xb in zip(la["posthoc_ema"]["averages"], lb["posthoc_ema"]["averages"]):
        assert all(torch.equal(xa[k], xb[k]) for k in xa)
    assert all(torch.equal(la["state_dict"][k], lb["state_dict"][k]) for k in la["state_dict"])


def test_a_snapshot_with_an_altered_config_record_is_refused(runs, tmp_path):
    """The tensors' sha256 does not cover the pickled records (step, σ_rel, config): their CRC-32s do."""
    import shutil

    from genflow.errors import CheckpointError
    from genflow.training.posthoc import list_snapshots, read_snapshot

    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    path = list_snapshots(run / "posthoc")[0][1]
    data = path.read_bytes()
    assert data.count(b"digits") >= 1  # the data set's name, in the stored config's strings
    path.write_bytes(data.replace(b"digits", b"digitz", 1))  # same length: the archive still opens
    with pytest.raises(CheckpointError, match="is corrupt"):
        read_snapshot(path)


def test_leaderboard_remakes_a_damaged_reconstruction(runs, tmp_path, capsys):
    import shutil

    from genflow.apps.leaderboard import posthoc_ckpt

    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    path = Path(posthoc_ckpt(str(run / "checkpoints" / "final.ckpt"), 0.12, "e"))
    made = torch.load(path, weights_only=True)["state_dict"]
    stamp = path.stat().st_mtime_ns
    assert posthoc_ckpt(str(run / "checkpoints" / "final.ckpt"), 0.12, "e") == str(path)
    assert path.stat().st_mtime_ns == stamp and capsys.readouterr().err == ""     # reused while intact
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = bytes(4096)
    path.write_bytes(bytes(data))
    posthoc_ckpt(str(run / "checkpoints" / "final.ckpt"), 0.12, "e")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "reconstructing it" in lines[0]
    again = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(again[k], made[k]) for k in made)


def test_posthoc_app_writes_checkpoints_that_sample(runs, tmp_path, cli):
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    code, out, err = cli("genflow.apps.posthoc", str(run), "sigma_rel=0.05,0.12")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    ckpts = {c["sigma_rel"]: c for c in result["checkpoints"]}
    assert ckpts[0.05]["residual"] < 1e-6 and 0 < ckpts[0.12]["residual"] < 0.2
    # a tracked width comes back as the tracked average (final.ckpt holds the first width)
    final_ckpt = torch.load(run / "checkpoints" / "final.ckpt", weights_only=True)
    rebuilt_ckpt = torch.load(ckpts[0.05]["ckpt"], weights_only=True)
    assert rebuilt_ckpt["hyper_parameters"] == final_ckpt["hyper_parameters"]  # config and data record
    final, rebuilt = final_ckpt["state_dict"], rebuilt_ckpt["state_dict"]
    for k, v in final.items():
        if v.is_floating_point():
            torch.testing.assert_close(rebuilt[k], v, rtol=1e-6, atol=1e-7)
    code, out, err = cli("sample.py", f"ckpt={ckpts[0.12]['ckpt']}", "num=2", "steps=2", f"out={tmp_path / 's'}",
                         "progress=false")
    assert code == 0, err
    # never overwrites; a bad width, step or folder is refused before any work
    for args, message in [((str(run), "sigma_rel=0.05"), "already exist"), ((str(run), "sigma_rel=0.3"), "0 < σ_rel"),
                          ((str(run), "sigma_rel=0.07", "step=1"), "snapshots cover steps 5..20"),
                          ((str(tmp_path), "sigma_rel=0.07"), "no post-hoc EMA snapshots")]:
        code, out, err = cli("genflow.apps.posthoc", *args)
        assert code == 2 and message in err, err


def test_posthoc_stops_with_one_line_and_refuses_an_unwritable_folder(runs, tmp_path, cli, monkeypatch):
    """Ctrl-C while the second checkpoint is written: one line saying one is kept, exit 130, no temporary file. An
    out= folder that cannot be written: exit 2 before any snapshot is combined."""
    import os
    from pathlib import Path

    import genflow.training.posthoc as posthoc

    out, real_save, saved = tmp_path / "out", torch.save, []

    def interrupted_second(obj, f, *args, **kwargs):
        if saved:
            raise KeyboardInterrupt
        saved.append(f)
        return real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", interrupted_second)
        code, _, err = cli("genflow.apps.posthoc", str(runs[0]), "sigma_rel=0.05,0.12", f"out={out}")
    assert code == 130 and err.strip().splitlines() == [
        "stopped by SIGINT while reconstructing sigma_rel=0.12: 1 of 2 checkpoints were written (each whole or not "
        "at all); run it again with sigma_rel= the widths not written yet"], err
    assert sorted(p.name for p in out.iterdir()) == ["posthoc_sigma0.050.ckpt"]

    real_access = os.access
    with monkeypatch.context() as m:
        m.setattr(os, "access", lambda path, mode, *a, **k: False if mode & os.W_OK and
                  Path(path).resolve() == out.resolve() else real_access(path, mode))
        m.setattr(posthoc, "posthoc_checkpoint", lambda *a, **k: pytest.fail("combined before the check"))
        code, _, err = cli("genflow.apps.posthoc", str(runs[0]), "sigma_rel=0.08", f"out={out}")
    assert code == 2 and err.startswith(f"error: out={out} cannot be written"), err
    import shutil

    with monkeypatch.context() as m:
        m.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 12, 10 ** 12 - 10 ** 5, 10 ** 5))
        m.setattr(posthoc, "posthoc_checkpoint", lambda *a, **k: pytest.fail("combined before the check"))
        code, _, err = cli("genflow.apps.posthoc", str(runs[0]), "sigma_rel=0.08", f"out={out}")
    assert code == 2 and "MiB free, the job needs about" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["posthoc_sigma0.050.ckpt"]


def test_resuming_with_other_widths_is_refused(runs, tmp_path):
    import shutil

    from genflow.config import compose
    from genflow.errors import ConfigError
    from genflow.apps.train import train

    shutil.copytree(runs[0], tmp_path / "run")
    with pytest.raises(ConfigError, match="resume with ema.sigma_rel"):
        train(compose([*BASE, "ema.sigma_rel=[0.05,0.2]", "trainer.max_steps=30", "ckpt_path=last",
                       f"+run_dir={tmp_path / 'run'}"]))


EDM2_DIR = __import__("os").environ.get("EDM2_DIR")


@pytest.mark.skipif(not EDM2_DIR, reason="EDM2_DIR (an extract of NVlabs/edm2) is not set")
def test_equations_agree_with_edm2s_own_phema():
    """σ_rel ↔ γ, the per-step β, the profiles' inner products and the reconstruction weights against EDM2's own
    training/phema.py (loaded from the extract by file, never copied), in float64."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("edm2_phema", Path(EDM2_DIR) / "training" / "phema.py")
    phema = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(phema)
    stds = np.array([0.01, 0.05, 0.08, 0.10, 0.2])
    gammas = np.array([gamma_of(s) for s in stds])
    np.testing.assert_allclose(gammas, phema.std_to_exp(stds), rtol=1e-12)
    np.testing.assert_allclose([sigma_rel_of(g) for g in gammas], phema.exp_to_std(gammas), rtol=1e-12)
    for step in (1, 2, 10, 4096):
        np.testing.assert_allclose(power_beta(step, gamma_of(0.05)), phema.power_function_beta(0.05, step, 1),
                                   rtol=1e-12, atol=1e-300)
    # snapshots of the 0.05 and 0.10 EMAs every 512 steps up to 8192, a target 0.08 at step 8192
    ofs = np.arange(512, 8193, 512, dtype=np.float64)
    in_ofs, in_std = np.concatenate([ofs, ofs]), np.repeat([0.05, 0.10], ofs.size)
    in_gamma = np.array([gamma_of(s) for s in in_std])
    ours = profile_dot(in_ofs[:, None], in_gamma[:, None], in_ofs[None, :], in_gamma[None, :])
    np.testing.assert_allclose(ours, phema.power_function_correlation(in_ofs[:, None], in_std[:, None],
                                                                      in_ofs[None, :], in_std[None, :]), rtol=1e-10)
    weights = solve_weights(in_ofs, in_gamma, 8192.0, gamma_of(0.08)).weights
    theirs = phema.solve_posthoc_coefficients(in_ofs, in_std, 8192.0, 0.08)[:, 0]
    # a least-squares solve against EDM2's direct solve of the same (ill-conditioned) normal equations
    np.testing.assert_allclose(weights, theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())
