"""One error path for every entry point: each bad input below ends in `error: what / why / fix` and exit 2,
never a traceback, before anything is written (the files the command could touch are unchanged)."""
import os
from pathlib import Path

import pytest
import torch

NO_GPU = not torch.cuda.is_available()
gpu_absent = pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")

T, S, E, L = "train.py", "sample.py", "genflow.evaluate", "genflow.leaderboard"
CASES = [
    # train.py: types and ranges when the config is composed
    (T, "D=abc"), (T, "trainer.max_steps=abc"), (T, "trainer.max_steps=-1"), (T, "trainer.max_steps=0"),
    (T, "optim.lr=-1"), (T, "optim.lr=abc"), (T, "seed=abc"), (T, "seed=-3"), (T, "+optim.lrr=1e-4"),
    (T, "optim.lrr=1e-4"), (T, "optim=3"), (T, "data.foo=1"), (T, "+data.foo=1"), (T, "data.batch_size=abc"),
    (T, "+trainer.foo=1"), (T, "model=nope"), (T, "data=nope"), (T, "ema.halflife_kimg=-1"),
    (T, "checkpoint.keep=-5"), (T, "fid.num=abc"), (T, "fid.mode=foo"), (T, "fid.batch=3"), (T, "D=1"),
    (T, "stage=3 data=multiview"), (T, "foo=1"), (T, "-m D=64,abc"), (T, "trainer.compile=bogus"),
    (T, "data.instance_noise_mode=bogus"), (T, "model=isotropic3d data.encoder.name=openclip"),
    (T, "ckpt_path=last hydra.run.dir={out}"),
    # train.py: knobs that do not apply to the chosen model
    (T, "model=edm D=64"), (T, "path=ko"), (T, "stage=2"), (T, "model=flow D=64"),
    # train.py: what the run needs later, checked before it starts
    (T, "sample.steps=0"), (T, "sample.num=0"), (T, "sample.solver=foo"), (T, "sample.solver=ancestral"),
    (T, "sample.guidance=2"), (T, "sample.precision=fp16"), (T, "ckpt_path={empty}"), (T, "ckpt_path={truncated}"),
    (T, "ckpt_path={text}"), (T, "ckpt_path={weights}"), (T, "ckpt_path={missing}"), (T, "init_from={empty}"),
    (T, "model=edm ckpt_path={resumable}"), (T, "hydra.run.dir={afile}"), (T, "+run_dir={afile}"),
    (T, "data=imagefolder data.root={images}"), (T, "data=imagefolder data.root={missing}"),
    pytest.param(T, "trainer=gpu", marks=gpu_absent),
    # sample.py
    (S, "ckpt={weights} steps=abc"), (S, "ckpt={weights} steps=0"), (S, "ckpt={weights} seeds=5-1"),
    (S, "ckpt={weights} seeds=abc"), (S, "ckpt={weights} num=0"), (S, "ckpt={weights} batch=0"),
    (S, "ckpt={weights} class=11"), (S, "ckpt={weights} class=-1"), (S, "ckpt={weights} solver=ancestral"),
    (S, "ckpt={weights} solver=foo"), (S, "ckpt={weights} reference={png} out={out}"),
    (S, "ckpt={weights} guidance=2"), (S, "ckpt={weights} num=3 seeds=0-1"), (S, "ckpt={weights} out={afile}"),
    (S, "ckpt={weights} precision=fp16"), (S, "ckpt={weights} foo=1"), (S, "ckpt={weights} +foo=1"),
    (S, "ckpt={missing}"), (S, "ckpt={empty}"), (S, "ckpt={truncated}"), (S, "ckpt={text}"), (S, "ckpt={adir}"),
    (S, "num=4"), (S, "ckpt={weights} steps"), (S, "ckpt={weights} seeds=1,5"), (S, "-m ckpt={weights} out={out} guidance=1,2"), (S, "-m ckpt={weights} out={out} steps=2,abc"),
    pytest.param(S, "ckpt={weights} device=cuda", marks=gpu_absent),
    # python -m genflow.evaluate
    (E, "ckpt={weights} fid.num=abc"), (E, "ckpt={weights} fid.num=1"), (E, "ckpt={weights} out={adir}"),
    (E, "ckpt={weights} data.foo=1"), (E, "ckpt={weights} +data.foo=1"), (E, "ckpt={weights} +data.batch_size=abc"),
    (E, "ckpt={weights} fid.solver=ancestral"), (E, "ckpt={weights} fid.mode=foo"), (E, "ckpt={weights} fid.batch=3"),
    (E, "ckpt={weights} nll_bits=abc"), (E, "ckpt={weights} fid.num=0"), (E, "ckpt={weights} sigma0=-1"),
    (E, "ckpt={weights} precision=fp16"), (E, "ckpt={missing}"), (E, "ckpt={truncated}"), (E, "fid.num=10"),
    pytest.param(E, "ckpt={weights} device=cuda", marks=gpu_absent),
    # python -m genflow.leaderboard
    (L, "suite=nope"), (L, "bogus=1"), (L, "out={afile}"), (L, "num=abc"), (L, "num=1"), (L, "precision=fp16"),
    (L, "+suite.fid.foo=1"), (L, "suite.fid.batch=3"), (L, "only=nope out={out}"),
    pytest.param(L, "device=cuda", marks=gpu_absent),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs the bad commands point at: an untrained tiny model's checkpoint (weights only, like final.ckpt),
    a resumable-looking one of another model, broken files, an image folder with a truncated PNG."""
    import numpy as np
    from PIL import Image

    from genflow.config import build, compose, to_container

    root = tmp_path_factory.mktemp("bad_inputs")
    cfg = compose(["model=pfgmpp", "net=unet_tiny"])
    module, _ = build(cfg, prepare=False)
    weights = {"state_dict": module.state_dict(), "hyper_parameters": {"config": to_container(cfg)}}
    torch.save(weights, root / "final.ckpt")
    torch.save({**weights, "optimizer_states": [], "loops": {}}, root / "last.ckpt")
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
    return {"weights": root / "final.ckpt", "resumable": root / "last.ckpt", "truncated": root / "truncated.ckpt",
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


@pytest.mark.parametrize("entry,args", CASES, ids=[":".join(_values(c)) for c in CASES])
def test_bad_input_is_one_clear_error(entry, args, files, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GENFLOW_DEBUG", raising=False)
    argv = args.format(**{k: str(v) for k, v in files.items()}).split()
    before = snapshot(files["root"], tmp_path)
    code, out, err = cli(entry, *argv)
    text = out + err
    assert code == 2, text
    assert "Traceback" not in text, text
    lines = err.splitlines()
    assert any(line.startswith("error: ") for line in lines), err
    assert any(line.startswith("  why: ") for line in lines) and any(line.startswith("  fix: ") for line in lines), err
    assert snapshot(files["root"], tmp_path) == before
    if os.environ.get("GENFLOW_SHOW_ERRORS"):
        print(f"\n$ {entry} {args}\n{err}", file=open(os.environ["GENFLOW_SHOW_ERRORS"], "a"))


def test_debug_shows_the_traceback(files, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GENFLOW_DEBUG", raising=False)
    from genflow.errors import ConfigError

    with pytest.raises(ConfigError, match="steps"):
        cli("sample.py", f"ckpt={files['weights']}", "steps=abc", "--debug")
    os.environ.pop("GENFLOW_DEBUG", None)
    os.environ.pop("HYDRA_FULL_ERROR", None)


def test_table_is_large_enough():
    assert len(CASES) >= 60
    assert {_values(c)[0] for c in CASES} == {T, S, E, L}


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
