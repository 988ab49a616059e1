"""Autoguidance's second checkpoint: read, checked against the good model, loaded.

Autoguidance (``genflow.methods.base.Autoguided``) mixes the predictions of two networks of the *same* method
on the *same* data: a different method, noise schedule, PFGM++ D or flow path predicts another quantity, and
other data another shape or condition. ``check_guide`` refuses such a pair before anything is sampled; the
networks themselves may differ (a smaller ``net`` of the same config, or an earlier checkpoint of the run).
"""
from __future__ import annotations

from pathlib import Path

from genflow.errors import config_error

#: data settings that change how data is loaded, not what a model of it predicts
LOADER_KEYS = ("batch_size", "num_workers", "root", "instance_noise", "instance_noise_mode", "val_fraction")


def _differences(good: dict, guide: dict, section: str, ignore=()) -> list[str]:
    keys = sorted(set(good) | set(guide))
    return [f"{section}.{k}: {good.get(k)!r} vs {guide.get(k)!r}" for k in keys
            if k not in ignore and good.get(k) != guide.get(k)]


def check_guide(good_config, guide_ckpt, *, key: str = "guide_ckpt", good_key: str = "ckpt") -> dict:
    """The guide checkpoint's stored config, after checking that it models the same method and data as
    ``good_config`` (a checkpoint's stored config); reads the checkpoint (weights only)."""
    from omegaconf import OmegaConf

    from genflow.config.checkpoints import config_from_checkpoint, read_checkpoint

    guide = config_from_checkpoint(read_checkpoint(guide_ckpt, key=key, mmap=True))  # the config only: tensors mapped
    plain = lambda node: OmegaConf.to_container(node, resolve=True) if node is not None else {}  # noqa: E731
    problems = _differences(plain(good_config.get("model")), plain(guide.get("model")), "model")
    problems += _differences(plain(good_config.get("data")), plain(guide.get("data")), "data", LOADER_KEYS)
    if problems:
        raise config_error(f"{key}={guide_ckpt} is not a model of the same method and data as {good_key} "
                           f"({good_key} vs guide: {'; '.join(problems[:4])})",
                           "autoguidance mixes two predictions of one method on one data set; another method, "
                           "schedule or data predicts something else",
                           "guide with a checkpoint trained with the same model and data settings: an earlier "
                           "checkpoint of the same run, or a run of the same config with a smaller net=")
    return guide


def load_guide(guide_ckpt, device) -> "object":
    """The guide's network (EMA weights, eval mode, on ``device``), its weights checked finite."""
    from genflow.config.building import module_from_checkpoint
    from genflow.training.module import check_finite_weights

    module, _, _ = module_from_checkpoint(Path(str(guide_ckpt)), device=device)
    check_finite_weights(module, f"guide_ckpt {guide_ckpt}")
    return module.net.eval()


def sampling_net(net, guidance: float | None, guide_ckpt, device):
    """(network, classifier-free guidance weight) to sample with: ``net`` and ``guidance`` unchanged without a
    guide; with ``guide_ckpt``, ``net`` autoguided by it with weight ``guidance`` and no classifier-free
    guidance (the checkpoint read once per process)."""
    from genflow.methods.base import autoguided

    if guide_ckpt is None:
        return net, guidance
    key = (str(guide_ckpt), str(device))
    if key not in _GUIDES:
        _GUIDES.clear()
        _GUIDES[key] = load_guide(guide_ckpt, device)
    return autoguided(net, _GUIDES[key], guidance), None


_GUIDES: dict = {}

