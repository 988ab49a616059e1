"""The single path from configuration to objects, shared by train.py, sample.py, evaluation and tests.

``compose(overrides)`` reads ``configs/train.yaml`` with Hydra's override grammar (``model=pfgmpp``,
``D=128``, ``trainer.max_steps=100``) and ``build(cfg)`` instantiates the datamodule, the network (its
``data_shape`` and ``num_classes`` taken from the data) and the method, wrapped in a GenerativeModule.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from genflow.errors import CheckpointError, ConfigError, GenflowError, config_error

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("model", "net", "data", "trainer", "callbacks", "experiment")


def options(group: str) -> list[str]:
    """The names a config group accepts (the yaml files in configs/<group>/)."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def check_choices(overrides: Sequence[str]) -> None:
    """Unknown group options get a list of the valid ones, before Hydra's own, terser error."""
    for item in overrides:
        key, sep, value = item.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or value in ("null", ""):
            continue
        for choice in value.split(","):
            if choice not in options(key):
                raise config_error(f"unknown {key} {choice!r}", f"there is no configs/{key}/{choice}.yaml",
                                   f"use {key}=one of: {', '.join(options(key))}")


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose the training configuration like ``python train.py <overrides>`` would."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    overrides = list(overrides)
    check_choices(overrides)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
    except HydraException as err:
        raise ConfigError(f"{err}\n  fix: see `python train.py --help` and the README's configuration table") from err
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks that need the whole configuration, run before anything is built."""
    if cfg.get("model") is not None:
        method = build_method(cfg)  # the method checks its own settings (e.g. PFGM++'s D <= 2 opt-in); cheap
        solver = (cfg.get("sample") or {}).get("solver")
        if solver is not None:
            method.check_solver(str(solver))  # before training, not at the first sample grid
    for key in ("ckpt_path", "init_from"):
        value = cfg.get(key)
        if value not in (None, "last") and not Path(str(value)).expanduser().is_file():
            raise config_error(f"{key}={value} does not exist", f"{key} must name a checkpoint file",
                               f"check the path, or use {key}=null" + (" / ckpt_path=last" if key == "ckpt_path" else ""))


def to_container(cfg: DictConfig) -> dict:
    """Resolved plain containers (no OmegaConf objects) for checkpoints loadable with weights_only=True."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return container


def instantiate(node, **kwargs):
    """Hydra's instantiate, but our own errors surface as themselves instead of wrapped in
    Hydra's InstantiationException, so the user reads what/why/fix first."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

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


def build(cfg: DictConfig, *, prepare: bool = True):
    """(GenerativeModule, GenerativeDataModule) for a composed config.

    ``prepare=False`` skips data-dependent estimation in the method (spectra, separation functions):
    a checkpoint restores those buffers.
    """
    from genflow.training import GenerativeModule

    dm = build_data(cfg)
    net = build_net(cfg, dm)
    method = build_method(cfg)
    if prepare:
        method.prepare(dm)
    optim = cfg.get("optim", {})
    module = GenerativeModule(net, method, config=to_container(cfg), optimizer=optim.get("name", "adam"),
                              lr=optim.get("lr", 1e-3), betas=tuple(optim.get("betas", (0.9, 0.999))),
                              eps=optim.get("eps", 1e-8), weight_decay=optim.get("weight_decay", 0.0),
                              warmup_steps=optim.get("warmup_steps", 0))
    if cfg.get("init_from"):
        load_weights(module, cfg.init_from, strict=False)
    return module, dm


# --- checkpoints ---------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> dict:
    """Load a Lightning checkpoint with ``weights_only=True`` (never unpickles code)."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist\n  fix: pass ckpt=PATH to a .ckpt written by "
                              "train.py (runs put them in <run_dir>/checkpoints/)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt or pickling foreign classes
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {str(err)[:300]}\n"
                              "  why: the file is corrupt, truncated, or holds objects other than tensors and "
                              "plain containers (genflow never unpickles code)\n"
                              "  fix: use a checkpoint written by genflow's train.py") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt.get("hyper_parameters", {}):
        raise CheckpointError(f"{path} is not a genflow checkpoint (no state_dict / stored config)\n"
                              "  fix: use a checkpoint written by genflow's train.py")
    return ckpt


def config_from_checkpoint(ckpt: dict, overrides: Sequence[str] = ()) -> DictConfig:
    """The training config stored in a checkpoint, with optional overrides (dotlist)."""
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["config"])
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg


def load_weights(module, checkpoint: str | Path | dict, *, strict: bool = True, path: str | Path = "") -> None:
    """Load a checkpoint's (EMA) weights into ``module``, with a clear error on a config mismatch."""
    if not isinstance(checkpoint, dict):
        checkpoint, path = read_checkpoint(checkpoint), checkpoint
    try:
        missing, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=strict)
    except RuntimeError as err:
        stored = checkpoint["hyper_parameters"]["config"].get("net", {})
        raise CheckpointError(f"checkpoint {path} does not match the requested network\n"
                              f"  stored net config: {stored}\n"
                              f"  why: {str(err).splitlines()[0]}\n"
                              "  fix: use the checkpoint's own net (do not override net=...), or "
                              "pick the checkpoint trained with this net") from err
    if not strict:  # init_from: say what was loaded and what was not
        total = len(module.state_dict())
        note = f"init_from={path}: loaded {total - len(missing)} of {total} tensors"
        if missing:
            note += f"; {len(missing)} not in the checkpoint keep their initialisation (e.g. {', '.join(missing[:3])})"
        if unexpected:
            note += f"; {len(unexpected)} of the checkpoint are not in this model, skipped (e.g. {', '.join(unexpected[:3])})"
        print(note, flush=True)


def module_from_checkpoint(path: str | Path, overrides: Sequence[str] = (), device="cpu"):
    """(GenerativeModule with EMA weights, datamodule, config) from a checkpoint, without unpickling code."""
    ckpt = read_checkpoint(path)
    cfg = config_from_checkpoint(ckpt, overrides)
    cfg.init_from = None
    module, dm = build(cfg, prepare=False)
    load_weights(module, ckpt, path=path)
    return module.to(device).eval(), dm, cfg
