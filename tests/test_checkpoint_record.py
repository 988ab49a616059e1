"""A checkpoint is self-sufficient: it records what sampling needs of its data (genflow.data.record), so
sample.py and evaluate (with a statistics file) run on a machine without the data set, and the data is read
only by the jobs that need images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from genflow.errors import CheckpointError, ConfigError


CIFAR = ["data=cifar10", "model=edm", "net=unet_tiny", "+net.attn_resolutions=[16]"]


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    """No data set anywhere: GENFLOW_DATA is an empty folder, HOME and the caches are fresh."""
    empty = tmp_path / "empty-data"
    empty.mkdir()
    monkeypatch.setenv("GENFLOW_DATA", str(empty))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))
    for var in ("GENFLOW_METRICS_HOME", "GENFLOW_INCEPTION", "TORCH_HOME"):
        monkeypatch.delenv(var, raising=False)
    return empty


@pytest.mark.parametrize("num_classes", [0, 10])
def test_sample_and_evaluate_a_cifar10_checkpoint_without_the_data(tmp_path, checkpoint_writer, no_data,
                                                                   standin_inception, num_classes):
    from genflow.apps.evaluate import main as evaluate
    from genflow.apps.sample import main as sample

    ckpt = checkpoint_writer(tmp_path / "edm-cifar10.ckpt", [*CIFAR, f"data.conditional={num_classes > 0}"],
                            (3, 32, 32), num_classes)
    stored = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert stored["data_record"] == {"name": "cifar10", "data_shape": [3, 32, 32], "num_classes": num_classes,
                                     "conditional": num_classes > 0, "feature_extractor": "inception",
                                     "levels": 256}
    extra = ["class=3"] if num_classes else []
    result = sample([f"ckpt={ckpt}", "seeds=0-2", "steps=2", f"out={tmp_path / 's'}", "progress=false", *extra])
    images = np.load(result["npz"])["images"]
    assert images.shape == (3, 3, 32, 32) and images.dtype == np.uint8
    # EDM's reference statistics file layout: mu, sigma
    ref = tmp_path / "cifar10-32x32.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    line = evaluate([f"ckpt={ckpt}", "fid.num=4", "fid.batch_size=4", "fid.steps=2", f"fid.ref={ref}",
                     f"fid.inception_path={standin_inception[0]}", "fid.mode=legacy_tensorflow", "progress=false"])
    assert line["data"] == "cifar10" and line["fid_images"] == 4 and np.isfinite(line["fid"])
    assert line["fid_ref"] == str(ref)
    assert list(no_data.iterdir()) == []  # nothing looked for or downloaded the data


def test_a_job_that_needs_the_images_says_so(tmp_path, checkpoint_writer, no_data, standin_inception, capsys):
    """fid.ref=train reads the training set: with none there, the data's own error before the model is loaded."""
    from genflow.apps.evaluate import main as evaluate

    ckpt = checkpoint_writer(tmp_path / "c.ckpt", CIFAR, (3, 32, 32))
    for job in (["fid.num=4", "fid.steps=2", "fid.ref=train"], ["fid.num=0", "nll=true"]):
        with pytest.raises(ConfigError, match="CIFAR-10 not found under"):
            evaluate([f"ckpt={ckpt}", f"fid.inception_path={standin_inception[0]}", *job])
    assert "generating" not in capsys.readouterr().err


def test_training_writes_the_record_and_old_checkpoints_still_load(trained_ckpt, tmp_path):
    """train.py's checkpoints hold the record of their datamodule; one written before records (none stored)
    is loaded with its datamodule built from the config, as before."""
    from genflow.config import build_data, config_from_checkpoint, module_from_checkpoint
    from genflow.data.record import RecordedData, data_record
    from genflow.apps.sample import main as sample

    ckpt = torch.load(trained_ckpt, weights_only=True)
    record = ckpt["hyper_parameters"]["data_record"]
    assert record == data_record(build_data(config_from_checkpoint(ckpt)))
    module, dm, _ = module_from_checkpoint(trained_ckpt)
    assert isinstance(dm, RecordedData) and dm.data_shape == tuple(record["data_shape"]) and dm._datamodule is None
    assert dm.train_tensor().shape[1:] == dm.data_shape  # the data is built when a job reads it
    del ckpt["hyper_parameters"]["data_record"]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    _, dm_old, _ = module_from_checkpoint(old)
    assert not isinstance(dm_old, RecordedData) and tuple(dm_old.data_shape) == dm.data_shape
    new = sample([f"ckpt={trained_ckpt}", "seeds=0-1", "steps=2", f"out={tmp_path / 'n'}", "progress=false"])
    before = sample([f"ckpt={old}", "seeds=0-1", "steps=2", f"out={tmp_path / 'o'}", "progress=false"])
    assert np.array_equal(np.load(new["npz"])["images"], np.load(before["npz"])["images"])


@pytest.mark.parametrize("change", [{"data_shape": [3, -2, 32]}, {"num_classes": "ten"}, {"levels": 1},
                                    {"name": None}])
def test_a_malformed_record_is_refused(tmp_path, checkpoint_writer, change):
    from genflow.config import module_from_checkpoint

    path = checkpoint_writer(tmp_path / "c.ckpt", CIFAR, (3, 32, 32))
    ckpt = torch.load(path, weights_only=True)
    ckpt["hyper_parameters"]["data_record"].update(change)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="malformed data record"):
        module_from_checkpoint(path)


def test_json_lines_record_the_sampler(tmp_path, checkpoint_writer, no_data, standin_inception, capsys):
    from genflow.apps.evaluate import main as evaluate
    from genflow.apps.sample import main as sample

    ckpt = checkpoint_writer(tmp_path / "c.ckpt", CIFAR, (3, 32, 32))
    sample([f"ckpt={ckpt}", "seeds=0", "steps=2", "solver=stochastic", "S_churn=40", "S_tmin=0.05", "S_tmax=50",
            "S_noise=1.003", f"out={tmp_path / 's'}", "progress=false"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: line[k] for k in ("solver", "S_churn", "S_tmin", "S_tmax", "S_noise")} == {
        "solver": "stochastic", "S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003}
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    line = evaluate([f"ckpt={ckpt}", "fid.num=2", "fid.steps=2", "fid.solver=stochastic", "fid.S_churn=40",
                     "fid.S_noise=1.003", f"fid.ref={ref}", f"fid.inception_path={standin_inception[0]}",
                     "fid.mode=legacy_tensorflow", "progress=false"])
    assert (line["solver"], line["S_churn"], line["S_noise"], line["nfe"]) == ("stochastic", 40.0, 1.003, 3)
    assert "S_tmin" not in line  # not given: the model's own (0), not reported as a choice
