"""One schema for genflow's JSON lines: config names recovered from stored configs, absolute paths, plain keys."""
import pytest
from omegaconf import OmegaConf

from genflow.config import CONFIG_DIR, compose
from genflow.results.records import absolute, check_record, config_name, config_names


@pytest.mark.parametrize("group", ["model", "net", "data"])
def test_every_config_file_is_named_back_from_its_stored_section(group):
    """A checkpoint stores the resolved section; the file it came from is found again, for every file of the
    group (several U-Net presets share one class, so the class alone could not say)."""
    import yaml

    for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
        cfg = compose([f"{group}={path.stem}"], validator=False)
        # the file's own values (interpolations into other sections stay unresolved: they match no literal key)
        section = {k: v for k, v in OmegaConf.to_container(cfg[group]).items() if not str(v).startswith("${")}
        if "_target_" not in (yaml.safe_load(path.read_text()) or {}):
            # a file that only composes others (model=isotropic3d: EDM with the multi-view net and data)
            assert config_name(group, section) != path.stem
            continue
        assert config_name(group, section) == path.stem
        # an override of one value keeps the name
        key = next(k for k, v in section.items() if k != "_target_" and isinstance(v, (int, float))
                   and not isinstance(v, bool)) if any(
            k != "_target_" and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in section.items()) else None
        if key is not None:
            assert config_name(group, {**section, key: section[key] + 1}) == path.stem


def test_sections_name_themselves_and_unknown_classes_keep_their_class_name():
    cfg = compose(["model=pfgmpp", "net=unet_tiny", "data=digits"], validator=False)
    assert config_names(cfg) == {"model": "pfgmpp", "net": "unet_tiny", "data": "digits"}
    # the section decides, whatever the Hydra choice said; a choice names only a class genflow has no file for
    assert config_names(cfg, {"model": "mine"})["model"] == "pfgmpp"
    assert config_names({"model": {"_target_": "somewhere.Else"}}, {"model": "mine"}) == {"model": "mine"}
    assert config_names({"model": {"_target_": "somewhere.Else"}}) == {"model": "Else"}


def test_paths_are_absolute_and_keys_plain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute("runs/x") == str(tmp_path / "runs" / "x") and absolute(None) is None
    assert check_record({"fid": 1.0, "val/loss": 2.0, "nested": {"ok_1": 1}})
    for bad in ({"bpd_sigma0=0.05": 1.0}, {"nested": {"a b": 1}}, {"D/path": {"x-y": 1}}):
        with pytest.raises(ValueError):
            check_record(bad)
