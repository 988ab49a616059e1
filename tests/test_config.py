"""Config composition: every option of every group composes; bad names and values fail early and clearly."""
import pytest
from omegaconf import OmegaConf

from genflow.config import compose, options
from genflow.errors import ConfigError


@pytest.mark.parametrize("group", ["model", "data", "net", "trainer", "experiment"])
def test_every_option_composes(group):
    names = options(group)
    if group != "experiment":
        assert names, f"configs/{group}/ is empty"
    for name in names:
        cfg = compose([f"{group}={name}"])
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
