"""Config composition: every option of every group composes; bad names and values fail early and clearly."""
import pytest
from omegaconf import OmegaConf

from genflow.config import compose, options
from genflow.errors import ConfigError


@pytest.mark.parametrize("group", ["model", "data", "net", "trainer", "callbacks", "logger", "experiment"])
def test_every_option_composes(group):
    names = options(group)
    if group != "experiment":
        assert names, f"configs/{group}/ is empty"
    for name in names:
        # environment=False: GPU recipes compose on a CPU machine (train.py itself refuses them there)
        cfg = compose([f"{group}={name}"], environment=False)
        if group != "experiment":
            assert cfg[group] is not None
        OmegaConf.to_container(cfg, resolve=False)


def test_top_level_D_reaches_the_model():
    cfg = compose(["model=pfgmpp", "D=2048"])
    assert cfg.model.D == 2048


def test_unknown_group_option_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        compose(["model=nope"])
    msg = str(err.value)
    assert "nope" in msg and "pfgmpp" in msg and "edm" in msg


def test_unknown_key_is_a_config_error():
    with pytest.raises(ConfigError):
        compose(["not_a_key=3"])


@pytest.mark.parametrize("D", [1, 2])
def test_small_D_needs_opt_in(D):
    with pytest.raises(ConfigError, match="second moment"):
        compose(["model=pfgmpp", f"D={D}"])
    cfg = compose(["model=pfgmpp", f"D={D}", "allow_heavy_tails=true"])
    assert cfg.model.D == D


def test_missing_checkpoint_paths_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        compose([f"ckpt_path={tmp_path}/missing.ckpt"])
    with pytest.raises(ConfigError, match="does not exist"):
        compose([f"init_from={tmp_path}/missing.ckpt"])


def test_cifar10_without_root_is_a_clear_error(monkeypatch):
    from genflow.config import build_data

    monkeypatch.delenv("GENFLOW_DATA", raising=False)
    with pytest.raises(ConfigError, match="data.root"):
        build_data(compose(["data=cifar10"]))


def test_imagefolder_without_root_is_a_clear_error():
    from genflow.config import build_data

    with pytest.raises(ConfigError, match="not a folder"):
        build_data(compose(["data=imagefolder"]))


# --- knobs: never silently ignored ------------------------------------------------------------------
@pytest.mark.parametrize("overrides,owner", [
    (["model=edm", "D=64"], "model=pfgmpp"), (["model=flow", "D=64"], "model=pfgmpp"),
    (["path=ko"], "model=flow"), (["model=edm", "path=vp"], "model=flow"),
    (["stage=2"], "net=multiview"), (["model=flow", "stage=1"], "net=multiview"),
])
def test_a_knob_for_another_model_names_its_model(overrides, owner):
    with pytest.raises(ConfigError, match="does not apply") as err:
        compose(overrides)
    assert owner in str(err.value)


def test_knobs_reach_their_model_and_default_there():
    assert compose([]).model.D == 128 and compose(["D=2048"]).model.D == 2048
    assert compose(["model=flow"]).model.path == "condot" and compose(["model=flow", "path=ko"]).model.path == "ko"
    iso = compose(["model=isotropic3d", "stage=2"])
    assert iso.net.stage == 2 and compose(["model=isotropic3d"]).net.stage == 1
    assert iso.data._target_.endswith("MultiView") and iso.model._target_ == "genflow.methods.EDM"
    # the EDM recipe inherits the PFGM++ recipe without its D
    assert compose(["experiment=edm_cifar10_uncond"], environment=False).D is None


# --- the template's shape: every experiment instantiates without training -------------------------------
@pytest.fixture
def fake_data(tmp_path, monkeypatch):
    """Folders the GPU recipes point at: a CIFAR-10 folder (its loader returns four black images: CIFAR-10 is
    not on CI machines) and a one-image FFHQ folder."""
    import numpy as np
    import torch
    from PIL import Image

    from genflow.data import CIFAR10

    monkeypatch.setattr(CIFAR10, "_load", lambda self: (torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)))
    (tmp_path / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "ffhq").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "ffhq" / "0.png")
    monkeypatch.setenv("GENFLOW_DATA", str(tmp_path / "cifar"))
    monkeypatch.setenv("GENFLOW_FFHQ64", str(tmp_path / "ffhq"))
    return tmp_path


@pytest.mark.parametrize("experiment", [None] + options("experiment"))
def test_experiment_instantiates_every_part(experiment, fake_data, tmp_path):
    """data, model, net (on the meta device: no memory), optimizer, trainer, callbacks and loggers of every
    experiment= config, as lightning-hydra-template's config tests do; nothing is trained."""
    import pytorch_lightning as pl
    import torch

    from genflow.config import build_data, build_method, build_net, instantiate
    from genflow.methods.base import Method
    from genflow.apps.train import instantiate_group, make_trainer

    cfg = compose([f"experiment={experiment}"] if experiment else [], environment=False)
    dm = build_data(cfg)
    try:
        with torch.device("meta"):  # the paper-size UNets without allocating their weights
            net = build_net(cfg, dm)
    except RuntimeError:  # a net that computes with tensors while it is built (multi-view): a real, small one
        net = build_net(cfg, dm)
    assert isinstance(dm, pl.LightningDataModule) and isinstance(net, torch.nn.Module)
    assert isinstance(build_method(cfg), Method)
    optim = {k: v for k, v in cfg.optim.items() if k != "warmup_steps"}
    assert isinstance(instantiate(optim)([torch.nn.Parameter(torch.zeros(1))]), torch.optim.Optimizer)
    callbacks = instantiate_group(cfg.callbacks, tmp_path / "run")
    loggers = instantiate_group(cfg.logger, tmp_path / "run")
    assert {type(c).__name__ for c in callbacks} >= {"SampleGrid", "LearningRateMonitor"}
    assert {type(lg).__name__ for lg in loggers} == {"TensorBoardLogger", "HistoryCSVLogger"}
    assert all(str(c.dirpath).startswith(str(tmp_path / "run")) for c in callbacks if hasattr(c, "dirpath"))
    cpu = {} if torch.cuda.is_available() else {"accelerator": "cpu", "devices": 1, "strategy": "auto",
                                                "precision": "32-true"}
    cfg.trainer = {k: v for k, v in cfg.trainer.items() if k not in ("sync_batchnorm", "num_nodes") or not cpu}
    trainer = make_trainer(cfg, tmp_path / "run", **cpu)
    assert trainer.max_steps == cfg.trainer.max_steps and len(trainer.loggers) == 2
    # the run's own parts, whatever the callbacks group holds
    assert {"EDMEma", "RunCheckpoint"} <= {type(c).__name__ for c in trainer.callbacks}


def test_fid_callback_and_logger_choices_compose():
    cfg = compose(["callbacks=fid", "fid.batch_size=64", "logger=wandb"])
    assert {"sample_grid", "lr_monitor", "fid", "best_fid"} <= set(cfg.callbacks)
    assert cfg.callbacks.fid.batch_size == 64 and cfg.callbacks.fid.mode == cfg.fid.mode  # one FID schema
    assert set(cfg.logger) == {"tensorboard", "csv", "wandb"}
    assert compose(["logger=none"]).logger is None or not compose(["logger=none"]).logger


def test_no_forwarding_configs():
    from genflow.config import CONFIG_DIR

    assert not list((CONFIG_DIR / "net").glob("*_default.yaml"))
    assert "@package _global_" not in (CONFIG_DIR / "model" / "isotropic3d.yaml").read_text()
    assert set(compose(["trainer=gpu"], environment=False).trainer) > set(compose([]).trainer) - {"accelerator"}


def test_imagefolder_scales_16_bit_and_composites_alpha_on_white(tmp_path):
    """A 16-bit greyscale PNG is scaled to 8 bits (not clipped to white); transparency is composited on white."""
    import numpy as np
    from PIL import Image

    from genflow.data.images import ImageFolder

    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(tmp_path / "a_grey16.png")
    rgba = np.zeros((4, 4, 4), np.uint8)          # black, transparent except an opaque and a half-covered pixel
    rgba[0, 0, 3], rgba[0, 1, 3] = 255, 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "b_alpha.png")
    x, _ = ImageFolder(root=str(tmp_path), resolution=4, channels=3)._load()
    levels = ((x + 1) * 127.5).round()
    assert (levels[0] == 128).all()                                   # 32768 / 65535 * 255 = 127.5 -> 128
    assert levels[1, :, 0, 0].tolist() == [0] * 3 and levels[1, :, 0, 1].tolist() == [127] * 3
    assert (levels[1, :, 1:] == 255).all()                            # transparent: the white background
