"""One error path for every entry point: each bad input below ends in `error: what / why / fix` and exit 2,
never a traceback, before anything is written (the files the command could touch are unchanged)."""
import os
from pathlib import Path

import pytest
import torch

NO_GPU = not torch.cuda.is_available()
gpu_absent = pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")

T, S, E, L = "train.py", "sample.py", "genflow.apps.evaluate", "genflow.apps.leaderboard"
# (entry, args, a substring of the `error:` line that names the check the case is meant to reach)
CASES = [
    # train.py: types and ranges when the config is composed
    (T, "D=abc", "D='abc'"), (T, "trainer.max_steps=abc", "trainer.max_steps='abc'"),
    (T, "trainer.max_steps=-1", "trainer.max_steps=-1 trains forever"), (T, "trainer.max_steps=0", "max_steps=0"),
    (T, "optim.lr=-1", "optim.lr=-1"), (T, "optim.lr=abc", "optim.lr='abc'"), (T, "seed=abc", "seed='abc'"),
    (T, "seed=-3", "seed=-3"), (T, "+optim.lrr=1e-4", "unknown key optim.lrr"),
    (T, "optim.lrr=1e-4", "Could not override 'optim.lrr'"), (T, "optim=3", "optim=3"),
    (T, "data.foo=1", "Could not override 'data.foo'"), (T, "+data.foo=1", "unknown key data.foo"),
    (T, "data.batch_size=abc", "data.batch_size='abc'"), (T, "+trainer.foo=1", "unknown key trainer.foo"),
    (T, "model=nope", "unknown model 'nope'"), (T, "data=nope", "unknown data 'nope'"),
    (T, "ema.halflife_kimg=-1", "ema.halflife_kimg=-1"), (T, "checkpoint.keep=-5", "checkpoint.keep=-5"),
    (T, "fid.num=abc", "fid.num='abc'"), (T, "fid.mode=foo", "fid.mode='foo'"),
    (T, "fid.batch=3", "Could not override 'fid.batch'"),  # a near miss of fid.batch_size
    (T, "D=1", "D=1 has a perturbation kernel with infinite second moment"),
    (T, "model=pfgmpp D=1e300", "D=1e+300 is beyond 1e+12"),
    (T, "stage=3 data=multiview", "stage=3"), (T, "foo=1", "Could not override 'foo'"),
    (T, "-m D=64,abc", "D='abc'"), (T, "trainer.compile=bogus", "trainer.compile='bogus'"),
    (T, "data.instance_noise_mode=bogus", "data.instance_noise_mode='bogus'"),
    (T, "model=isotropic3d data.encoder.name=openclip", "OpenCLIP weights file"),
    (T, "ckpt_path=last hydra.run.dir={out}", "holds no checkpoint to resume"),
    # train.py: knobs that do not apply to the chosen model
    (T, "model=edm D=64", "D=64 does not apply to the chosen model (EDM)"),
    (T, "path=ko", "path=ko does not apply to the chosen model"),
    (T, "stage=2", "stage=2 does not apply to the chosen model"),
    (T, "model=flow D=64", "D=64 does not apply to the chosen model (FlowMatching)"),
    # train.py: what the run needs later, checked before it starts
    (T, "sample.steps=0", "sample.steps=0"), (T, "sample.num=0", "sample.num=0"),
    (T, "sample.solver=foo", "sample.solver='foo' is not a sampler of"),
    (T, "sample.solver=ancestral", "sample.solver='ancestral' is not a sampler of"),
    (T, "sample.guidance=2", "sample.guidance=2 for an unconditional model"),
    (T, "sample.precision=fp16", "sample.precision='fp16'"),
    (T, "ckpt_path={empty}", "cannot read checkpoint ckpt_path="),
    (T, "ckpt_path={truncated}", "cannot read checkpoint ckpt_path="),
    (T, "ckpt_path={text}", "cannot read checkpoint ckpt_path="),
    (T, "ckpt_path={weights}", "holds weights only"), (T, "ckpt_path={missing}", "missing.ckpt does not exist"),
    (T, "init_from={empty}", "cannot read checkpoint init_from="),
    (T, "model=edm ckpt_path={resumable}", "was trained with other settings"),
    (T, "hydra.run.dir={afile}", "afile is a file"), (T, "+run_dir={afile}", "afile is a file"),
    (T, "data=imagefolder data.root={images}", "cannot decode image"),
    (T, "data=imagefolder data.root={missing}", "is not a folder"),
    pytest.param(T, "trainer=gpu", "trainer.accelerator=gpu but no CUDA GPU is visible", marks=gpu_absent),
    # sample.py
    (S, "ckpt={weights} steps=abc", "steps='abc'"), (S, "ckpt={weights} steps=0", "steps=0"),
    (S, "ckpt={weights} seeds=5-1", "seeds=5-1"), (S, "ckpt={weights} seeds=abc", "seeds=abc"),
    (S, "ckpt={weights} num=0", "num=0"), (S, "ckpt={weights} batch=0", "batch=0"),
    (S, "ckpt={conditional} class=11", "class=11 is out of range"), (S, "ckpt={conditional} class=-1", "class=-1"),
    (S, "ckpt={weights} class=0", "class=0 for a model without class labels"),
    (S, "ckpt={weights} solver=ancestral", "solver='ancestral' is not a sampler of"),
    (S, "ckpt={weights} solver=foo", "solver='foo' is not a sampler of"),
    (S, "ckpt={weights} reference={png} out={out}", "ref.png for a model trained on"),
    (S, "ckpt={weights} guidance=2", "guidance=2 for an unconditional model"),
    (S, "ckpt={weights} num=3 seeds=0-1", "num=3 but seeds=0-1 holds 2 seeds"),
    (S, "ckpt={weights} out={afile}", "afile is a file"), (S, "ckpt={weights} precision=fp16", "precision='fp16'"),
    (S, "ckpt={weights} foo=1", "Could not override 'foo'"), (S, "ckpt={weights} +foo=1", "unknown key foo"),
    (S, "ckpt={missing}", "missing.ckpt does not exist"), (S, "ckpt={empty}", "cannot read checkpoint ckpt="),
    (S, "ckpt={truncated}", "cannot read checkpoint ckpt="), (S, "ckpt={text}", "cannot read checkpoint ckpt="),
    (S, "ckpt={adir}", "does not exist (it is a folder)"), (S, "num=4", "no checkpoint given"),
    (S, "ckpt={weights} steps", "Error parsing override 'steps'"),
    (S, "ckpt={weights} seeds=1,5", "Ambiguous value for argument 'seeds=1,5'"),
    (S, "-m ckpt={weights} out={out} guidance=1,2", "guidance=1 for an unconditional model"),
    (S, "-m ckpt={weights} out={out} steps=2,abc", "steps='abc'"),
    pytest.param(S, "ckpt={weights} device=cuda", "device=cuda but no CUDA GPU is visible", marks=gpu_absent),
    # python -m genflow.apps.evaluate
    (E, "ckpt={weights} fid.num=abc", "fid.num='abc'"), (E, "ckpt={weights} fid.num=1", "fid.num=1"),
    (E, "ckpt={weights} out={adir}", "adir is a folder"),
    # sample.py: seeds
    (S, "ckpt={weights} seeds=[3,3,3]", "more than once"), (S, "ckpt={weights} seeds=1.5", "seeds=1.5"),
    (S, "ckpt={weights} seeds=18446744073709551616", "above 2^64 - 1"),
    (S, "ckpt={weights} seeds=[1,2.5]", "seeds=[1, 2.5]"),
    # outputs never replace another command's: a run's folder and result.json, a folder of other samples
    (S, "ckpt={weights} out={run}", "holds a training run"),
    (S, "ckpt={weights} out={others}", "already holds 3 images from another command"),
    (E, "ckpt={weights} out={run_result}", "already exists and is not a record of this checkpoint"),
    (E, "ckpt={weights} data.foo=1", "Could not override 'data.foo'"),
    (E, "ckpt={weights} +data.foo=1", "unknown key data.foo"),
    (E, "ckpt={weights} +data.batch_size=abc", "data.batch_size='abc'"),
    (E, "ckpt={weights} fid.solver=ancestral", "fid.solver='ancestral' is not a sampler of"),
    (E, "ckpt={weights} fid.mode=foo", "fid.mode='foo'"),
    (E, "ckpt={weights} fid.batch=3", "Could not override 'fid.batch'"),  # a near miss of fid.batch_size
    (E, "ckpt={weights} nll_bits=abc", "nll_bits='abc'"),
    (E, "ckpt={weights} fid.num=0", "nothing to evaluate (fid.num=0 and nll=false)"),
    (E, "ckpt={weights} sigma0=-1", "sigma0=-1"), (E, "ckpt={weights} precision=fp16", "precision='fp16'"),
    (E, "ckpt={missing}", "missing.ckpt does not exist"), (E, "ckpt={truncated}", "cannot read checkpoint ckpt="),
    (E, "fid.num=10", "no checkpoint given"),
    pytest.param(E, "ckpt={weights} device=cuda", "device=cuda but no CUDA GPU is visible", marks=gpu_absent),
    # python -m genflow.apps.leaderboard
    (L, "suite=nope", "Could not find 'suite/nope'"), (L, "bogus=1", "Could not override 'bogus'"),
    (L, "out={afile}", "afile is a file"), (L, "num=abc", "num='abc'"), (L, "num=1", "num=1"),
    (L, "precision=fp16", "precision='fp16'"), (L, "+suite.fid.foo=1", "unknown key suite.fid.foo"),
    (L, "suite.fid.batch=3", "Could not override 'suite.fid.batch'"),  # a near miss of suite.fid.batch_size
    (L, "only=nope out={out}", "only=nope matches no entry"),
    pytest.param(L, "device=cuda", "device=cuda but no CUDA GPU is visible", marks=gpu_absent),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs the bad commands point at: an untrained tiny model's checkpoint (weights only, like final.ckpt),
    the same for a class-conditional model, a resumable-looking one of another model, broken files, an image
    folder with a truncated PNG."""
    import numpy as np
    from PIL import Image

    from genflow.config import build, compose, to_container

    root = tmp_path_factory.mktemp("bad_inputs")
    cfg = compose(["model=pfgmpp", "net=unet_tiny"])
    module, _ = build(cfg, prepare=False)
    weights = {"state_dict": module.state_dict(), "hyper_parameters": {"config": to_container(cfg)}}
    torch.save(weights, root / "final.ckpt")
    torch.save({**weights, "optimizer_states": [], "loops": {}}, root / "last.ckpt")
    cfg = compose(["model=pfgmpp", "net=unet_tiny", "data.conditional=true"])
    module, _ = build(cfg, prepare=False)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": to_container(cfg)}},
               root / "conditional.ckpt")
    data = (root / "final.ckpt").read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (root / "empty.ckpt").write_bytes(b"")
    (root / "text.ckpt").write_text("not a checkpoint\n")
    (root / "afile").write_text("a file where a folder is expected\n")
    (root / "adir").mkdir()
    (root / "images" / "a").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(root / "images" / "a" / f"{i}.png")
    png = (root / "images" / "a" / "1.png").read_bytes()
    (root / "images" / "a" / "1.png").write_bytes(png[: len(png) // 2])
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "ref.png")
    (root / "run" / "checkpoints").mkdir(parents=True)             # a finished training run's folder
    (root / "run" / "checkpoints" / "final.ckpt").write_bytes(data)
    (root / "run" / "result.json").write_text('{"run_dir": "run", "checkpoint": "run/checkpoints/final.ckpt"}\n')
    (root / "run" / "grid.png").write_bytes(png)
    (root / "others").mkdir()                                        # samples of another checkpoint, no record
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 9 * i, dtype=np.uint8)).save(root / "others" / f"{i:06d}.png")
    np.savez(root / "others" / "samples.npz", images=np.zeros((3, 3, 8, 8), dtype=np.uint8))
    return {"run": root / "run", "run_result": root / "run" / "result.json", "others": root / "others",
            "weights": root / "final.ckpt", "conditional": root / "conditional.ckpt", "resumable": root / "last.ckpt", "truncated": root / "truncated.ckpt",
            "empty": root / "empty.ckpt", "text": root / "text.ckpt", "afile": root / "afile", "adir": root / "adir",
            "images": root / "images", "png": root / "ref.png", "missing": root / "missing.ckpt",
            "out": root / "out", "root": root}


def snapshot(*folders: Path) -> dict:
    seen = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            seen[dirpath] = "dir"
            for name in filenames:
                stat = os.stat(os.path.join(dirpath, name))
                seen[os.path.join(dirpath, name)] = (stat.st_size, stat.st_mtime_ns)
    return seen


def _values(case) -> tuple:
    return tuple(case.values) if hasattr(case, "values") else case


@pytest.mark.parametrize("entry,args,expected", CASES, ids=[":".join(_values(c)[:2]) for c in CASES])
def test_bad_input_is_one_clear_error(entry, args, expected, files, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GENFLOW_DEBUG", raising=False)
    argv = args.format(**{k: str(v) for k, v in files.items()}).split()
    before = snapshot(files["root"], tmp_path)
    code, out, err = cli(entry, *argv)
    if os.environ.get("GENFLOW_SHOW_ERRORS"):
        with open(os.environ["GENFLOW_SHOW_ERRORS"], "a") as log:
            print(f"\n$ {entry} {args}\n{err}", file=log)
    text = out + err
    assert code == 2, text
    assert "Traceback" not in text, text
    lines = err.splitlines()
    what = [line for line in lines if line.startswith("error: ")]
    assert len(what) == 1, err
    assert expected.lower() in what[0].lower(), f"expected {expected!r} in the error line, got:\n{err}"
    assert any(line.startswith("  why: ") for line in lines) and any(line.startswith("  fix: ") for line in lines), err
    assert snapshot(files["root"], tmp_path) == before


def test_debug_shows_the_traceback(files, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("GENFLOW_DEBUG", "HYDRA_FULL_ERROR"):  # --debug sets both: monkeypatch restores them afterwards
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    from genflow.errors import ConfigError

    with pytest.raises(ConfigError, match="steps"):
        cli("sample.py", f"ckpt={files['weights']}", "steps=abc", "--debug")


def test_sample_multirun_writes_one_folder_per_value(files, cli, tmp_path, monkeypatch):
    """The Hydra surface of sample.py: `-m steps=1,2` runs two jobs, each into its own folder under out=,
    each ending with one JSON line that records the precision."""
    import json

    monkeypatch.chdir(tmp_path)
    code, out, err = cli("sample.py", "-m", f"ckpt={files['weights']}", "num=2", "steps=1,2", "progress=false",
                         f"out={tmp_path / 'sweep'}")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [line["steps"] for line in lines] == [1, 2] and {line["precision"] for line in lines} == {"fp32"}
    assert [Path(line["out"]).name for line in lines] == ["num=2,steps=1", "num=2,steps=2"]
    assert all((Path(line["out"]) / "000001.png").is_file() for line in lines)


def test_non_ascii_path_gets_a_quoting_hint(files, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("sample.py", f"ckpt={files['weights']}", f"out={tmp_path}/gr\u00fcn")
    assert code == 2 and f"""fix: quote the value inside the argument: 'out="{tmp_path}/gr\u00fcn"'""" in err, err

