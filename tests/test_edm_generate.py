"""sample.py gives the images of EDM's generate.py for the same seeds: deterministic Heun on any rho-grid,
the stochastic sampler (Algorithm 2) with its churn given on the command line, class-conditional networks
with class=K (--class=K) or with labels drawn from the seeds.

``generate_py`` below is written for these tests from the paper (Karras et al. 2022, Algorithm 2 and
Eq. 5, Table 1's preconditioning) and the protocol of generate.py: one torch.Generator per seed drawing, in
order, the latents (``randn`` of one image), for a conditional network the label (``randint``), then the
churn noise of every step in float64 (``randn_like`` of the float64 state); the denoiser evaluated in float32
on the float64 state cast down; the last step without a second-order correction. With EDM_DIR set, the
same comparison runs against generate.py's own sampler (tests/test_edm_reference.py).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genflow.errors import ConfigError

SIGMA_DATA = 0.5


def generate_py(net, seeds, shape, *, label_dim=0, class_idx=None, steps=18, sigma_min=0.002, sigma_max=80.0,
                rho=7.0, S_churn=0.0, S_min=0.0, S_max=math.inf, S_noise=1.0):
    """(latents, labels, images) as generate.py makes them, for genflow's net contract net(x, c_noise, cond)."""
    gens = [torch.Generator().manual_seed(int(s) % (1 << 32)) for s in seeds]
    latents = torch.stack([torch.randn(shape, generator=g) for g in gens])
    labels = None
    if label_dim:
        drawn = torch.stack([torch.randint(label_dim, size=(), generator=g) for g in gens])
        labels = torch.eye(label_dim)[drawn]
        if class_idx is not None:
            labels[:] = 0
            labels[:, class_idx] = 1

    def denoiser(x64, sigma64):
        x = x64.to(torch.float32)
        sigma = torch.as_tensor(sigma64).to(torch.float32).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        c_skip = SIGMA_DATA ** 2 / (sigma ** 2 + SIGMA_DATA ** 2)
        c_out = sigma * SIGMA_DATA / (sigma ** 2 + SIGMA_DATA ** 2).sqrt()
        c_in = 1 / (SIGMA_DATA ** 2 + sigma ** 2).sqrt()
        F = net(c_in * x, (sigma.log() / 4).flatten(), None if labels is None else {"class": labels})
        return (c_skip * x + c_out * F.to(torch.float32)).to(torch.float64)

    i = torch.arange(steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    x = latents.to(torch.float64) * t[0]
    for n in range(steps):
        gamma = min(S_churn / steps, math.sqrt(2) - 1) if S_min <= t[n] <= S_max else 0.0
        t_hat = t[n] + gamma * t[n]
        eps = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float64) for g in gens])
        x_hat = x + (t_hat ** 2 - t[n] ** 2).sqrt() * S_noise * eps
        d = (x_hat - denoiser(x_hat, t_hat)) / t_hat
        x = x_hat + (t[n + 1] - t_hat) * d
        if n < steps - 1:
            d2 = (x - denoiser(x, t[n + 1])) / t[n + 1]
            x = x_hat + (t[n + 1] - t_hat) * (0.5 * d + 0.5 * d2)
    return latents, labels, x


def uint8(images):
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


DIGITS = ["data=digits", "model=edm", "net=unet_tiny"]
CHURN = {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003}
GRID = {"steps": 7, "rho": 5.0, "sigma_min": 0.01, "sigma_max": 40.0}
CASES = {  # name: (classes, class=, solver, sampler settings, grid)
    "heun": (0, None, "heun", {}, {}),
    "heun-grid": (0, None, "heun", {}, GRID),
    "stochastic": (0, None, "stochastic", CHURN, {"steps": 10}),
    "stochastic-grid": (0, None, "stochastic", {**CHURN, "S_churn": 5.0}, GRID),
    "cond-heun": (10, None, "heun", {}, {"steps": 9}),
    "cond-stochastic": (10, None, "stochastic", CHURN, {"steps": 10}),
    "cond-stochastic-class": (10, 3, "stochastic", CHURN, {"steps": 10}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sample_py_gives_generate_py_images(case, checkpoint_writer, tmp_path):
    from genflow.config import module_from_checkpoint
    from genflow.apps.sample import main as sample
    from genflow.sampling import generate

    classes, class_idx, solver, churn, grid = CASES[case]
    steps = grid.get("steps", 18)
    model = [f"model.{k}={v}" for k, v in grid.items() if k != "steps"]
    on_command_line = case == "heun-grid"  # sample.py's sigma_min= sigma_max= rho=; else the model's own
    ckpt = checkpoint_writer(tmp_path / "edm.ckpt", [*DIGITS, f"data.conditional={classes > 0}",
                                                     *([] if on_command_line else model)], (1, 8, 8), classes, seed=1)
    seeds = list(range(8))
    args = [f"ckpt={ckpt}", "seeds=0-7", f"steps={steps}", f"solver={solver}", f"out={tmp_path / 's'}",
            "progress=false", "batch=3", *(f"{k}={v}" for k, v in churn.items())]
    args += [f"{k}={v}" for k, v in grid.items() if k != "steps"] if on_command_line else []
    result = sample(args + ([f"class={class_idx}"] if class_idx is not None else []))
    module, _, _ = module_from_checkpoint(ckpt, model if on_command_line else ())
    if on_command_line:
        assert {k: result[k] for k in ("rho", "sigma_min", "sigma_max")} == {k: grid[k] for k in ("rho", "sigma_min",
                                                                                                  "sigma_max")}
    with torch.no_grad():
        latents, labels, want = generate_py(module.net, seeds, (1, 8, 8), label_dim=classes, class_idx=class_idx,
                                            steps=steps, S_min=churn.get("S_tmin", 0.0),
                                            S_max=churn.get("S_tmax", math.inf),
                                            **{k: v for k, v in {**grid, **churn}.items()
                                               if k not in ("steps", "S_tmin", "S_tmax")})
    # the same per-seed streams: genflow's prior draw is generate.py's latents times sigma_max, bit for bit
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    prior = module.method.prior_sample((8, 1, 8, 8), generator=gens)
    assert torch.equal(prior, latents * module.method.sigma_max)
    got = generate(module.method, module.net, seeds, (1, 8, 8), steps=steps, solver=solver, batch_size=3,
                   solver_options=churn or None, num_classes=classes, class_label=class_idx)
    err = float((got.double() - want).abs().max())
    print(f"{case}: max |genflow - transcription| = {err:.3g}")
    assert err <= 2e-5, err  # float32 denoiser, float64 state on both sides: rounding only
    images = torch.from_numpy(np.load(result["npz"])["images"])
    assert torch.equal(images, uint8(got))  # sample.py writes what generate() makes
    diff = (images.int() - uint8(want).int()).abs()
    assert int(diff.max()) <= 1 and float((diff == 0).float().mean()) >= 0.99
    if churn:  # the churn changes the images (it is not silently dropped)
        plain = generate(module.method, module.net, seeds, (1, 8, 8), steps=steps, solver="heun",
                         num_classes=classes, class_label=class_idx)
        assert float((plain - got).abs().max()) > 1e-2


def test_labels_follow_generate_py_and_class_k_keeps_the_noise_stream(checkpoint_writer, tmp_path):
    """Without class=, image i's class is generate.py's draw from seed i; class=K changes only the label."""
    from genflow.config import module_from_checkpoint
    from genflow.sampling import draw_labels

    ckpt = checkpoint_writer(tmp_path / "c.ckpt", [*DIGITS, "data.conditional=true"], (1, 8, 8), 10, seed=2)
    module, dm, _ = module_from_checkpoint(ckpt)
    gens = [torch.Generator().manual_seed(s) for s in range(16)]
    module.method.prior_sample((16, 1, 8, 8), generator=gens)
    drawn = draw_labels(gens, dm.num_classes)["class"].argmax(1)
    _, labels, _ = generate_py(lambda x, c, cond: x, range(16), (1, 8, 8), label_dim=10, steps=1)
    assert torch.equal(drawn, labels.argmax(1)) and len(set(drawn.tolist())) > 3


def test_sampler_settings_a_solver_does_not_use_are_errors(checkpoint_writer, tmp_path, cli):
    from genflow.apps.evaluate import main as evaluate
    from genflow.methods import EDM, PFGMPP
    from genflow.apps.sample import main as sample

    ckpt = checkpoint_writer(tmp_path / "c.ckpt", DIGITS, (1, 8, 8))
    with pytest.raises(ConfigError, match="S_churn given for solver=heun") as err:
        sample([f"ckpt={ckpt}", "solver=heun", "S_churn=40", f"out={tmp_path / 's'}"])
    assert "use solver=stochastic" in str(err.value)
    with pytest.raises(ConfigError, match="S_noise, S_tmin given for fid.solver=dopri5"):
        evaluate([f"ckpt={ckpt}", "fid.solver=dopri5", "fid.S_tmin=0.05", "fid.S_noise=1.003", "fid.ref=x.npz"])
    with pytest.raises(ConfigError, match="S_tmin=60.0 exceeds S_tmax=50.0"):
        sample([f"ckpt={ckpt}", "solver=stochastic", "S_churn=40", "S_tmin=60", "S_tmax=50", f"out={tmp_path / 's'}"])
    with pytest.raises(ConfigError, match="sigma_min=90.0 is not below sigma_max=80"):
        sample([f"ckpt={ckpt}", "sigma_min=90", f"out={tmp_path / 's'}"])
    flow = checkpoint_writer(tmp_path / "f.ckpt", ["data=digits", "model=flow", "net=unet_tiny"], (1, 8, 8))
    with pytest.raises(ConfigError, match="unknown key model.rho"):
        sample([f"ckpt={flow}", "rho=5", f"out={tmp_path / 's'}"])
    code, _, stderr = cli("sample.py", f"ckpt={ckpt}", "solver=euler", "S_noise=1.003", f"out={tmp_path / 's'}")
    assert code == 2 and "error: S_noise given for solver=euler" in stderr and "Traceback" not in stderr
    # a model's own churn (a training config's model.S_churn) is no longer silently dropped by another solver
    with pytest.raises(ConfigError, match="model.S_churn=40 with solver=heun"):
        EDM(S_churn=40).check_solver("heun")
    assert EDM(S_churn=40).check_solver("stochastic") == "stochastic"
    with pytest.raises(ConfigError, match="not a sampler of PFGMPP"):  # the churn is Gaussian: D = inf only
        PFGMPP(D=128).check_solver("stochastic", options={"S_churn": 40})


def test_leaderboard_rows_take_and_record_the_sampler(checkpoint_writer, tmp_path):
    import json

    from genflow.apps.leaderboard import run

    ckpt = checkpoint_writer(tmp_path / "c.ckpt", DIGITS, (1, 8, 8), seed=3)
    suite = tmp_path / "configs" / "suite" / "mine.yaml"
    suite.parent.mkdir(parents=True)
    entry = (f"{{name: churn, ckpt: '{ckpt}', steps: 4, solver: stochastic, S_churn: 40, S_tmin: 0.05, "
             "S_tmax: 50, S_noise: 1.003}")
    suite.write_text("name: mine\nfid: {num: 16, batch_size: 16, extractor: digits, ref: train}\n"
                     f"entries:\n  - {entry}\n")
    result = run([f"hydra.searchpath=[file://{tmp_path / 'configs'}]", "suite=mine", f"out={tmp_path / 'lb'}",
                  f"history={tmp_path / 'history.jsonl'}"])
    row = json.loads(open(result["json"]).read())["rows"][0]
    sampler = {"solver": "stochastic", "S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003}
    assert {k: row[k] for k in (*sampler, "nfe")} == {**sampler, "nfe": 7}
    from genflow.results.history import read_history

    assert {k: read_history(tmp_path / "history.jsonl")[0][k] for k in sampler} == sampler  # part of the record
    suite.write_text(suite.read_text().replace("solver: stochastic, ", ""))
    with pytest.raises(ConfigError, match="S_churn, S_noise, S_tmax, S_tmin given for fid.solver=heun"):
        run([f"hydra.searchpath=[file://{tmp_path / 'configs'}]", "suite=mine", f"out={tmp_path / 'lb2'}",
             f"history={tmp_path / 'history.jsonl'}"])
