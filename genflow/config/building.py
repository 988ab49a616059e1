"""The single path from a composed configuration to objects: ``build(cfg)`` instantiates the datamodule, the
network (its ``data_shape`` and ``num_classes`` taken from the data) and the method, wrapped in a
GenerativeModule; ``module_from_checkpoint`` does the same for a trained checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from genflow.config.checkpoints import config_from_checkpoint, load_weights, read_checkpoint
from genflow.config.schema import target_class
from genflow.data.record import RecordedData, data_record, read_record
from genflow.errors import GenflowError


def to_container(cfg: DictConfig) -> dict:
    """Resolved plain containers (no OmegaConf objects) for checkpoints loadable with weights_only=True."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return container


def instantiate(node, **kwargs):
    """Hydra's instantiate, but our own errors surface as themselves instead of wrapped in
    Hydra's InstantiationException, so the user reads what/why/fix first."""
    try:
        return hydra_instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, GenflowError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def build_data(cfg: DictConfig):
    return instantiate(cfg.data, seed=cfg.get("seed", 0))


def build_net(cfg: DictConfig, datamodule):
    return instantiate(cfg.net, data_shape=tuple(datamodule.data_shape), num_classes=datamodule.num_classes)


def build_method(cfg: DictConfig):
    return instantiate(cfg.model)


def build(cfg: DictConfig, *, prepare: bool = True, datamodule=None):
    """(GenerativeModule, GenerativeDataModule) for a composed config.

    ``prepare=False`` skips data-dependent estimation in the method (spectra, separation functions):
    a checkpoint restores those buffers. ``datamodule``: one already at hand (a checkpoint's ``RecordedData``).
    """
    # imported here: Lightning takes seconds to import, which `--help` and the checks before a run never need
    from genflow.training import GenerativeModule

    dm = build_data(cfg) if datamodule is None else datamodule
    net = build_net(cfg, dm)
    method = build_method(cfg)
    if prepare:
        method.prepare(dm)
    optim = OmegaConf.masked_copy(cfg.optim, [k for k in cfg.optim if k != "warmup_steps"])
    # checkpoints written before the optimizer became a _partial_ target hold {name, lr, ...}: Adam(lr)
    optimizer = instantiate(optim) if "_target_" in optim else None
    module = GenerativeModule(net, method, config=to_container(cfg), optimizer=optimizer,
                              lr=cfg.optim.get("lr", 1e-3), warmup_steps=cfg.optim.get("warmup_steps", 0),
                              data_record=data_record(dm))
    if cfg.get("init_from"):
        load_weights(module, cfg.init_from, strict=False)
    return module, dm


def module_from_checkpoint(path: str | Path, overrides: Sequence[str] = (), device="cpu"):
    """(GenerativeModule with EMA weights, datamodule, config) from a checkpoint, without unpickling code.
    The datamodule is the checkpoint's record of its data (``genflow.data.record``), which builds the data only
    when a job reads it; a checkpoint written before records has its datamodule built as before."""
    ckpt = read_checkpoint(path)
    cfg = config_from_checkpoint(ckpt, overrides)
    cfg.init_from = None
    record = read_record(ckpt, path)
    recorded = None if record is None else RecordedData(record, target_class(cfg.data), lambda: build_data(cfg))
    module, dm = build(cfg, prepare=False, datamodule=recorded)
    load_weights(module, ckpt, path=path)
    return module.to(device).eval(), dm, cfg
