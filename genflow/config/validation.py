"""Checks that need a whole configuration, run when it is composed and before anything is built; ``compose``
composes an app's configuration and runs them."""
from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from genflow.config.building import build_data, build_method
from genflow.config.checkpoints import newest_valid, read_checkpoint, read_resumable
from genflow.config.composing import (CONFIG_DIR, GROUPS, app_defaults, compose_config, declared_knobs, knob_owners,
                                      searchpath_dirs)
from genflow.config.resume import check_resume, explicit_sections
from genflow.config.schema import (GENFLOW_TRAINER_KEYS, MATMUL_PRECISIONS, OPEN, OPTIM_SCHEMA, TRAIN_SCHEMA, check_schema,
                                   check_target, sampler_options, target_class)
from genflow.cache import cache_dir
from genflow.errors import ConfigError, config_error
from genflow.methods.base import Method
from genflow.metrics.features import METRICS_HOME_ENV, metrics_home


def compose(overrides: Sequence[str] = (), config_name: str = "train", *, return_hydra_config: bool = False,
            validator=None, environment: bool = True) -> DictConfig:
    """Compose a configuration like ``python train.py <overrides>`` would (``config_name`` picks the app:
    train, sample, evaluate, leaderboard), and validate it (``validator``: the app's checks; the training
    config's ``validate`` by default, ``False`` for none). ``environment=False`` skips the training config's
    checks of this machine and its files (GPU present, checkpoints readable), e.g. to compose a GPU recipe
    on a CPU machine."""
    overrides = knob_overrides(overrides, config_name)
    cfg = compose_config(overrides, config_name, return_hydra_config=return_hydra_config)
    if validator is None and config_name == "train":
        validator = functools.partial(validate, environment=environment)
    if validator:
        validator(cfg)
    return cfg


def bare_items(overrides: Sequence[str], config_name: str) -> list[str]:
    """The overrides that set a bare key the app's config does not have (``D=2048``): knobs, if the chosen
    model declares them."""
    root = app_defaults(config_name)
    return [o for o in overrides if "=" in o and not o.startswith(("+", "~")) and "." not in o.split("=", 1)[0]
            and o.split("=", 1)[0] not in root and o.split("=", 1)[0] not in GROUPS]


def knob_overrides(overrides: Sequence[str], config_name: str = "train") -> list[str]:
    """``overrides`` with every bare knob the chosen model, net or data declares written ``++D=2048`` (the key is
    added to the config); a bare key that none of them declares is refused with the knobs that exist."""
    overrides = list(overrides)
    bare = bare_items(overrides, config_name) if config_name == "train" else []
    if not bare:
        return overrides
    cfg = compose_config([o for o in overrides if o not in bare], config_name)
    declared, owners = declared_knobs(cfg), knob_owners(searchpath_dirs(overrides))
    for item in bare:
        key = item.split("=", 1)[0]
        if key not in declared and key in owners:
            model = str((cfg.get("model") or {}).get("_target_", "?")).rsplit(".", 1)[-1]
            known = ", ".join(k.help() for k in declared.values()) or "none"
            raise config_error(f"{item} does not apply to the chosen model ({model})",
                               f"{key} is a knob of {owners[key]}; {model} would silently ignore it (the chosen "
                               f"model, net and data declare: {known})", f"drop {key}=, or choose {owners[key]}")
    # a bare key that no class declares is left to Hydra, which says the config has no such key
    return [f"++{o}" if o in bare and o.split("=", 1)[0] in declared else o for o in overrides]


def check_knobs(cfg: DictConfig) -> None:
    """The bare knobs set (command line, experiment): declared by the chosen model, net or data, and of the
    declared type and range."""
    declared = declared_knobs(cfg)
    for name, knob in declared.items():
        value = OmegaConf.select(cfg, name, default=None)
        problem = knob.problem(value)
        if problem:
            raise config_error(f"{name}={value!r}", f"{name}: {problem} ({knob.meaning})",
                               f"pass a valid value, e.g. {name}={knob.default}")


def check_trainer(trainer, environment: bool = True) -> None:
    if trainer is None:
        return
    import pytorch_lightning as pl

    params = inspect.signature(pl.Trainer.__init__).parameters
    for key in trainer.keys():
        if key not in params and key not in GENFLOW_TRAINER_KEYS:
            raise config_error(f"unknown key trainer.{key}", "it is not an argument of Lightning's Trainer and would "
                               "fail after the data and model are built", "check the spelling (see "
                               "https://lightning.ai/docs/pytorch/stable/common/trainer.html#trainer-flags)")
    matmul = trainer.get("matmul_precision", "highest")
    if matmul not in MATMUL_PRECISIONS:
        raise config_error(f"trainer.matmul_precision={matmul}",
                           "it is torch.set_float32_matmul_precision: highest (full fp32, TF32 off), high (TF32) "
                           "or medium (bf16 passes)", "use trainer.matmul_precision=highest, high or medium")
    max_steps = trainer.get("max_steps")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or (max_steps < 1 and max_steps != -1):
        raise config_error(f"trainer.max_steps={max_steps!r}", "training runs a positive whole number of optimizer "
                           "steps", "pass e.g. trainer.max_steps=3000")
    if max_steps == -1 and trainer.get("max_time") is None and trainer.get("max_epochs") in (None, -1):
        raise config_error("trainer.max_steps=-1 trains forever", "no step, epoch or time limit is set",
                           "pass trainer.max_steps=N, or bound the run explicitly with "
                           "+trainer.max_time='{minutes: 60}' or trainer.max_epochs=N")
    accelerator = str(trainer.get("accelerator", "auto"))
    if environment and accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise config_error(f"trainer.accelerator={accelerator} but no CUDA GPU is visible",
                           "torch.cuda.is_available() is False on this machine",
                           "use trainer=cpu, or run on a machine with a GPU (check CUDA_VISIBLE_DEVICES)")
    check_compile(trainer.get("compile", False), accelerator, environment)


def check_compile(value, accelerator: str, environment: bool = True) -> None:
    """``trainer.compile``: false, true (inductor) or a torch.compile backend name. Where this machine is to run
    it, inductor needs Triton (GPU) or a C++ compiler (CPU): without them the first training step would fail,
    after the data and the model were built."""
    if value is False or value is None:
        return
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if value is not True and value not in backends:
        raise config_error(f"trainer.compile={value!r}",
                           "it is true (inductor), false or a torch.compile backend: "
                           f"{', '.join(torch._dynamo.list_backends())} (eager, aot_eager for debugging)",
                           "use trainer.compile=true, or trainer.compile=false for the eager network")
    if not environment or value not in (True, "inductor"):
        return
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        from torch.utils._triton import has_triton

        if not has_triton():
            raise config_error("trainer.compile=true but Triton is not installed",
                               "inductor writes the compiled step's GPU kernels in Triton",
                               "install the triton package that matches torch, or set trainer.compile=false")
        return
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as err:  # inductor's own search: $CXX, g++, clang++
        raise config_error("trainer.compile=true but no C++ compiler was found",
                           "on the CPU, inductor compiles the step with a C++ compiler (g++ or clang++, or $CXX)",
                           "install g++, point CXX at a compiler, or set trainer.compile=false") from err


def check_device(device) -> None:
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise config_error(f"device={device} but no CUDA GPU is visible", "torch.cuda.is_available() is False",
                           "use device=cpu, or leave device unset to pick the GPU when there is one")


def data_conditions(data_node) -> bool:
    """Whether the data gives the model a condition (class labels, or a datamodule's own, e.g. multi-view)."""
    cls = target_class(data_node)
    return bool(data_node.get("conditional")) or (cls is not None and hasattr(cls, "sample_cond"))


def check_output_dir(path, key: str) -> None:
    """An output folder may exist (as a folder) or not yet; a file there is refused."""
    if path is None:
        return
    p = Path(str(path)).expanduser()
    for parent in (p, *p.parents):
        if parent.exists():
            if not parent.is_dir():
                raise config_error(f"{key}={path}: {parent} is a file", f"{key} is a folder that outputs go into",
                                   f"choose another {key}= (a folder, new or existing)")
            return


def validate(cfg: DictConfig, environment: bool = True) -> dict:
    """Checks that need the whole training configuration, run when it is composed and before anything is
    built: types and ranges, unknown keys, knobs that do not apply, the trainer, the sampler settings
    against the model, and (``environment``) the GPU, the checkpoints it will read and the run folder.
    Returns the checkpoints it read (``check_files``), empty without ``environment``."""
    # the chosen classes' knobs, and a knob of another model left null (an experiment that cancels an inherited D)
    unset = [k for k in cfg if cfg.get(k) is None and k not in TRAIN_SCHEMA]
    unset = [k for k in unset if k in knob_owners()] if unset else []
    check_schema(cfg, TRAIN_SCHEMA, open_keys=(*OPEN, *declared_knobs(cfg), *unset))
    check_knobs(cfg)
    for group in ("data", "model", "net", "optim", "trainer"):
        if cfg.get(group) is not None and not isinstance(cfg[group], DictConfig):
            raise config_error(f"{group}={cfg[group]!r}", f"{group} is a config group (configs/{group}/) or a "
                               "section of options, not a value", f"pick a file: {group}=<name>, or set "
                               f"{group}.<key>=value" if (CONFIG_DIR / group).is_dir() else f"set {group}.<key>=value")
    for group in ("data", "model", "net", "optim"):
        if cfg.get(group) is not None:
            check_target(cfg[group], group, provided=("data_shape", "num_classes", "seed", "params", "warmup_steps"))
    for group in ("callbacks", "logger"):
        for name, node in (cfg.get(group) or {}).items():
            if node is not None:
                check_target(node, f"{group}.{name}")
    for key, spec in OPTIM_SCHEMA.items():
        value = OmegaConf.select(cfg, f"optim.{key}", default=None)
        problem = None if value is None else spec.problem(value)
        if problem:
            raise config_error(f"optim.{key}={value!r}", f"optim.{key}: {problem}",
                               f"pass a valid value, e.g. optim.{key}={spec.example or 0}")
    check_trainer(cfg.get("trainer"), environment)
    ema = cfg.get("ema") or {}
    if ema.get("sigma_rel") is not None:  # ema=posthoc: the callback checks its widths (cheap, nothing allocated)
        from genflow.training.posthoc import PowerEma

        PowerEma(sigma_rel=list(ema.sigma_rel) if not isinstance(ema.sigma_rel, (int, float)) else ema.sigma_rel,
                 snapshot_kimg=ema.get("snapshot_kimg", 64))
    # the method checks its own settings (e.g. PFGM++'s D <= 2 opt-in) and names its samplers; building it is cheap
    method = build_method(cfg) if cfg.get("model") is not None else None
    sample = cfg.get("sample") or {}
    if method is not None and sample:
        method.check_solver(sample.solver, "sample.solver")
    fid = cfg.get("fid") or {}
    if method is not None and fid.get("num") and fid.get("solver"):
        method.check_solver(fid.solver, "fid.solver", sampler_options(fid))
    if sample.get("guidance") is not None and cfg.get("data") is not None and not data_conditions(cfg.data) \
            and sample.get("guide_ckpt") is None:
        raise config_error(f"sample.guidance={sample.guidance} for an unconditional model",
                           "classifier-free guidance mixes conditional and unconditional predictions; the data "
                           "gives this model no condition", "drop sample.guidance, or train with data.conditional=true")
    if sample.get("guide_ckpt") is not None and sample.get("guidance") is None:  # read by genflow.apps.train
        raise config_error(f"sample.guide_ckpt={sample.guide_ckpt} without sample.guidance",
                           "autoguidance needs its weight w (D = D_guide + w (D - D_guide); w = 1 is the model alone)",
                           "set sample.guidance=W, e.g. sample.guidance=2")
    return check_files(cfg) if environment else {}


def check_files(cfg: DictConfig) -> dict:
    """The checkpoints a training run reads (readable, of the right kind and model) and its run folder.
    Returns what it read, tensors memory-mapped: ``{"init_from": ckpt, "ckpt_path": (path, ckpt)}``."""
    read = {}
    for key in ("ckpt_path", "init_from"):
        value = cfg.get(key)
        if value not in (None, "last") and not Path(str(value)).expanduser().is_file():
            raise config_error(f"{key}={value} does not exist", f"{key} must name a checkpoint file",
                               f"check the path, or use {key}=null" + (" / ckpt_path=last" if key == "ckpt_path" else ""))
    if cfg.get("init_from"):
        read["init_from"] = read_checkpoint(cfg.init_from, key="init_from", mmap=True)
    if cfg.get("ckpt_path") is not None:
        overrides = OmegaConf.select(cfg, "hydra.overrides.task", default=None)
        # ckpt_path=last up front only where the folder is named: a sweep's jobs resume their own folders
        named = any(str(o).startswith("hydra.run.dir=") for o in OmegaConf.select(cfg, "hydra.overrides.hydra",
                                                                                    default=None) or [])
        run_dir = cfg.get("run_dir") or (OmegaConf.select(cfg, "hydra.run.dir") if named else None)
        if str(cfg.ckpt_path) == "last":
            path, ckpt = (newest_valid(Path(str(run_dir)), mmap=True)[:2]) if run_dir else (None, None)
        else:
            path, ckpt = cfg.ckpt_path, read_resumable(cfg.ckpt_path, mmap=True)
        if ckpt is not None:
            read["ckpt_path"] = (path, ckpt)
            check_resume(cfg, ckpt["hyper_parameters"]["config"], path,
                         explicit_sections(overrides, declared_knobs(cfg)) if overrides is not None else None)
    check_output_dir(cfg.get("run_dir"), "run_dir")
    from genflow.outputs import check_folder_before_start, check_writable
    folder = None if cfg.get("run_dir") else OmegaConf.select(cfg, "hydra.run.dir")
    if folder is not None:  # before Hydra writes .hydra/ there (a library run_dir: prepare_run checks it)
        check_folder_before_start(Path(str(folder)), resuming=cfg.get("ckpt_path") is not None)
    for key in ("run_dir", "hydra.run.dir"):  # checkpoints and exports must be writable before the first step
        if OmegaConf.select(cfg, key, default=None) is not None:
            check_writable(OmegaConf.select(cfg, key), key)
    # the caches a run writes into, checked now rather than after the estimate or the training they follow
    if cfg.get("model") is not None and type(build_method(cfg)).prepare is not Method.prepare:
        check_writable(cache_dir(), "GENFLOW_CACHE", "set GENFLOW_CACHE to a folder you can write (data-derived "
                       "estimates such as SPD's spectrum are cached there; the default is ~/.cache/genflow)")
    if (cfg.get("fid") or {}).get("num"):
        check_writable(metrics_home(), METRICS_HOME_ENV, f"set {METRICS_HOME_ENV} to a folder you can write "
                       "(FID reference statistics are cached there; the default is ~/.cache/genflow)")
    data_cls = target_class(cfg.data) if cfg.get("data") is not None else None
    if hasattr(data_cls, "verify"):
        data = build_data(cfg)
        data.verify()  # data files decodable (a bad image is named) before the run starts
        data.check_batch_size(loaded=False)  # a batch larger than the data, known from its files
    elif data_cls is not None and hasattr(data_cls, "check_batch_size"):
        try:  # the data set's size from its settings (a data set that is not there: the run says so when built)
            data = build_data(cfg)
        except ConfigError:
            data = None
        if data is not None:
            data.check_batch_size(loaded=False)
    if cfg.get("hydra") is not None:
        check_output_dir(OmegaConf.select(cfg, "hydra.run.dir"), "hydra.run.dir")
    return read
