"""End-to-end training on tiny configurations: fast runs, exact resume, DDP on CPU, sample.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genflow.config import compose, read_checkpoint
from genflow.errors import CheckpointError, ConfigError
from genflow.apps.train import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["trainer.max_steps=6", "trainer.val_check_interval=3", "checkpoint.every_n_steps=3", "sample.num=4",
        "sample.steps=2", "optim.warmup_steps=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false"]


def run(overrides, tmp_path, name="run"):
    cfg = compose(overrides + TINY + [f"+run_dir={tmp_path / name}"])
    return train(cfg)


@pytest.mark.parametrize("model,data,extra", [
    ("pfgmpp", "digits", ["net=unet_tiny", "data.batch_size=16"]),
    ("edm", "digits", ["net=unet_tiny", "data.batch_size=16"]),
    ("pfgmpp", "toy2d", ["data.n=512", "data.batch_size=64"]),
    ("edm", "toy2d", ["data.n=512", "data.batch_size=64"]),
])
def test_fast_training_runs(model, data, extra, tmp_path):
    result = run([f"model={model}", f"data={data}"] + extra, tmp_path)
    assert result["steps"] == 6
    for key in ("checkpoint", "grid", "ema_safetensors"):
        assert Path(result[key]).is_file(), key
    assert torch.isfinite(torch.tensor(result["train/loss"]))
    ckpt = read_checkpoint(result["checkpoint"])  # weights_only=True
    assert ckpt["hyper_parameters"]["config"]["model"]["_target_"].endswith(model.upper() if model == "edm" else "PFGMPP")


def _weights(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["current_model_state"] if "current_model_state" in ckpt else ckpt["state_dict"]


def test_resume_matches_uninterrupted_run(tmp_path):
    base = ["model=pfgmpp", "data=digits", "net=unet_tiny", "data.batch_size=16", "trainer.deterministic=true"]
    straight = run(base, tmp_path, "straight")
    # the interrupted run: same config, stopped at step 3, then resumed from that checkpoint
    first = run(base + ["trainer.max_steps=3"], tmp_path, "interrupted")
    mid = Path(first["run_dir"]) / "checkpoints" / "last.ckpt"
    assert mid.is_file()
    resumed = run(base + [f"ckpt_path={mid}"], tmp_path, "interrupted")
    assert resumed["steps"] == straight["steps"] == 6
    a = _weights(Path(straight["run_dir"]) / "checkpoints" / "last.ckpt")
    b = _weights(Path(resumed["run_dir"]) / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_corrupt_and_foreign_checkpoints(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(bad)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a genflow checkpoint"):
        read_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")


@pytest.fixture
def tiny_ckpt(trained_ckpt):
    return trained_ckpt  # the session's shared tiny model (conditional PFGM++ on digits, tests/conftest.py)


def test_sample_cli_is_batch_invariant(tiny_ckpt, tmp_path, one_thread):
    """Bitwise across batch sizes where the net is (one thread: see the ``one_thread`` fixture)."""
    from genflow.apps.sample import main

    a = main([f"ckpt={tiny_ckpt}", "seeds=0-5", "steps=3", f"out={tmp_path / 'a'}", "batch=6", "progress=false"])
    b = main([f"ckpt={tiny_ckpt}", "seeds=0-5", "steps=3", f"out={tmp_path / 'b'}", "batch=4", "progress=false"])
    c = main([f"ckpt={tiny_ckpt}", "seeds=3-5", "steps=3", f"out={tmp_path / 'c'}", "batch=1", "progress=false"])
    assert a["num"] == 6 and a["nfe"] == 5
    import numpy as np

    ia = np.load(Path(a["out"]) / "samples.npz")["images"]
    ib = np.load(Path(b["out"]) / "samples.npz")["images"]
    ic = np.load(Path(c["out"]) / "samples.npz")["images"]
    assert (ia == ib).all() and (ia[3:] == ic).all()
    assert (Path(a["out"]) / "000005.png").is_file() and (Path(a["out"]) / "grid.png").is_file()
    # the same command may write into its own folder again; other settings may not mix into it
    from genflow.errors import ConfigError

    main([f"ckpt={tiny_ckpt}", "seeds=0-5", "steps=3", f"out={tmp_path / 'a'}", "batch=3", "progress=false"])
    before = {p.name: p.read_bytes() for p in Path(a["out"]).iterdir()}
    with pytest.raises(ConfigError, match=r"already holds 6 images from another command \(other settings \(steps\)\)"):
        main([f"ckpt={tiny_ckpt}", "seeds=0-5", "steps=2", f"out={tmp_path / 'a'}", "progress=false"])
    assert {p.name: p.read_bytes() for p in Path(a["out"]).iterdir()} == before


def test_sample_cli_guidance_and_json_line(tiny_ckpt, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever the CLI writes relative to the working directory stays here
    code, stdout, stderr = cli("sample.py", f"ckpt={tiny_ckpt}", "num=2", "steps=2", f"out={tmp_path / 'g'}",
                               "guidance=2.0", "progress=false")
    assert code == 0, stderr
    line = json.loads(stdout.strip().splitlines()[-1])
    assert line["num"] == 2 and line["nfe"] == 3 and Path(line["out"]).is_dir()


@pytest.mark.parametrize("guidance", [None, 2.0])
def test_sample_cli_measures_an_adaptive_solvers_nfe(tiny_ckpt, tmp_path, guidance):
    """dopri5's NFE is not known in advance: sample.py reports the network evaluations per image it ran (a batch
    steps until its slowest image is done), the solver's own count of batch evaluations (guidance's two
    branches counting once)."""
    from genflow.config import module_from_checkpoint
    from genflow.apps.sample import main
    from genflow.sampling import draw_labels

    extra = [] if guidance is None else [f"guidance={guidance}"]
    result = main([f"ckpt={tiny_ckpt}", "seeds=0-3", "solver=dopri5", f"out={tmp_path / 'd'}", "progress=false",
                   *extra])
    module, dm, _ = module_from_checkpoint(tiny_ckpt)
    seeds = range(4)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    noise = module.method.prior_sample((4, *dm.data_shape), generator=gens)
    with torch.no_grad():
        solution = module.method.solve(module.net, noise, steps=18, solver="dopri5", generator=gens,
                                       cond=draw_labels(gens, dm.num_classes) if dm.num_classes else None,
                                       guidance=guidance)
    assert result["nfe"] == solution.nfe > float(solution.nfe_per_sample.float().mean()) > 6


def test_sample_cli_errors(tiny_ckpt, tmp_path):
    from genflow.apps.sample import main

    with pytest.raises(ConfigError, match="solver"):
        main([f"ckpt={tiny_ckpt}", "solver=rk77"])
    with pytest.raises(ConfigError, match="stepz"):
        main([f"ckpt={tiny_ckpt}", "stepz=3"])
    with pytest.raises(CheckpointError, match="does not exist"):
        main([f"ckpt={tmp_path}/nope.ckpt"])


def test_checkpoint_config_mismatch_is_a_clear_error(tiny_ckpt):
    from genflow.config import build, config_from_checkpoint, load_weights

    ckpt = read_checkpoint(tiny_ckpt)
    cfg = config_from_checkpoint(ckpt, ["net.model_channels=24"])
    module, _ = build(cfg, prepare=False)
    with pytest.raises(CheckpointError, match="does not match"):
        load_weights(module, tiny_ckpt)


DDP_SCRIPT = r"""
import sys, torch
import pytorch_lightning as pl
from genflow.config import compose, build
from genflow.apps.train import make_trainer
from pathlib import Path
out = Path(sys.argv[1])
cfg = compose(["model=pfgmpp", "data=toy2d", "data.n=256", "data.batch_size=32", "trainer.max_steps=4",
               "trainer.val_check_interval=4", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
               "sample.num=4", "sample.steps=2", "checkpoint.every_n_steps=100"])
pl.seed_everything(0)
module, dm = build(cfg)
trainer = make_trainer(cfg, out, accelerator="cpu", devices=2, strategy="ddp", num_nodes=1)
trainer.fit(module, datamodule=dm)
flat = torch.cat([p.detach().flatten() for p in module.net.parameters()])
torch.save(flat, out / f"rank{trainer.global_rank}.pt")
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_weights_identical(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    torch.testing.assert_close(w0, w1, rtol=0, atol=0)


def test_isotropic3d_two_stages_and_reference_sampling(tmp_path):
    """stage 1 -> stage 2 (init_from, reference frame) -> sample.py reference=IMAGE.png, end to end."""
    import torchvision

    from genflow.apps.sample import main

    small = ["model=isotropic3d", "data.num_objects=24", "data.batch_size=4", "data.resolution=8",
             "net.attn_resolutions=[4]", "sample.num=2", "sample.steps=2"]
    first = run(small + ["stage=1"], tmp_path, "stage1")
    second = run(small + ["stage=2", f"init_from={first['checkpoint']}"], tmp_path, "stage2")
    assert read_checkpoint(second["checkpoint"])["hyper_parameters"]["config"]["stage"] == 2
    ref = tmp_path / "ref.png"
    torchvision.io.write_png((torch.rand(3, 8, 8) * 255).to(torch.uint8), str(ref))
    out = main([f"ckpt={second['checkpoint']}", "seeds=0-1", "steps=2", f"reference={ref}", "guidance=2",
                f"out={tmp_path / 'views'}", "progress=false"])
    assert out["num"] == 2 and Path(out["grid"]).is_file()
    row = torchvision.io.read_image(str(tmp_path / "views" / "000000.png"))
    assert row.shape[-1] == 4 * 8 and row.shape[-2] == 8  # the V views side by side


def test_cli_sweep_and_clear_cli_errors(tmp_path, cli, monkeypatch):
    """`train.py -m model=pfgmpp D=...` runs one job per value; a bad name exits with the valid ones listed."""
    monkeypatch.chdir(tmp_path)
    common = ["net=unet_tiny", "trainer.max_steps=2", "sample.num=2", "sample.steps=2",
              "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    code, stdout, stderr = cli("train.py", "-m", "model=pfgmpp", "D=64,2048", *common,
                               f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert code == 0, stderr[-2000:]
    lines = [json.loads(l) for l in stdout.splitlines() if l.startswith("{")]
    names = [Path(l["run_dir"]).name for l in lines]  # hydra.sweep.subdir: <num>_<overrides>
    assert names[0].startswith("0_") and "D=64" in names[0] and names[1].startswith("1_") and "D=2048" in names[1]
    assert [l["D"] for l in lines] == [64, 2048] and all(l["model"] == "pfgmpp" for l in lines)
    summary = (tmp_path / "sweep" / "summary.md").read_text()  # the multirun's table of all runs
    assert "| 0_D=64" in summary and "| 1_D=2048" in summary and "sweep of 2 runs" in stdout
    stored = [read_checkpoint(l["checkpoint"])["hyper_parameters"]["config"]["model"]["D"] for l in lines]
    assert stored == [64, 2048]
    code, _, stderr = cli("train.py", "model=pfgmppp")
    assert code != 0 and "pfgmppp" in stderr and "edm" in stderr and "Traceback" not in stderr
    code, _, stderr = cli("sample.py", "ckpt=/nonexistent.ckpt")
    assert code != 0 and "does not exist" in stderr and "Traceback" not in stderr
