"""The single path from configuration to objects, shared by train.py, sample.py, evaluation and tests.

``compose(overrides)`` reads ``configs/train.yaml`` with Hydra's override grammar (``model=pfgmpp``,
``D=128``, ``trainer.max_steps=100``) and ``build(cfg)`` instantiates the datamodule, the network (its
``data_shape`` and ``num_classes`` taken from the data) and the method, wrapped in a GenerativeModule.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from genflow import registry
from genflow.errors import CheckpointError, ConfigError, GenflowError, checkpoint_error, config_error

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("model", "net", "data", "trainer", "callbacks", "logger", "experiment")
APP_DIRS = {"leaderboard": CONFIG_DIR / "leaderboard"}  # an app's config folder, where not configs/
APP_FILES = {"leaderboard": "configs/leaderboard/leaderboard.yaml"}
APPS = {"train": "train.py", "sample": "sample.py", "evaluate": "python -m genflow.evaluate",
        "leaderboard": "python -m genflow.leaderboard"}


def _knob(name: str, default, *, _root_):
    """``${knob:D,128}``: the bare top-level knob ``D`` when the user set it, else the model's default."""
    value = _root_.get(name)
    return default if value is None else value


def _groups() -> str:
    """``${train_groups:}`` in train.py's --help: its own groups and their options (not the other apps')."""
    return "\n".join(f"{group}: {', '.join(options(group))}" for group in sorted(GROUPS))


if not OmegaConf.has_resolver("knob"):
    OmegaConf.register_new_resolver("knob", _knob)
if not OmegaConf.has_resolver("train_groups"):
    OmegaConf.register_new_resolver("train_groups", _groups)


def options(group: str, app: str = "train") -> list[str]:
    """The names a config group of an app accepts (the yaml files in its folder, e.g. configs/<group>/)."""
    return sorted(p.stem for p in (APP_DIRS.get(app, CONFIG_DIR) / group).glob("*.yaml"))


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


def hydra_error(err: Exception, app: str = "train") -> ConfigError:
    """A Hydra / OmegaConf composition error, worded as what / why / fix."""
    text = str(err).strip()
    what = text.splitlines()[0] if text else type(err).__name__
    if err.__cause__ is not None:
        text += "\n" + str(err.__cause__)
        if "not in struct" in text:
            key = text.split("Key '", 1)[1].split("'", 1)[0] if "Key '" in text else ""
            what += f" (no key {key!r} there)" if key else ""
    if "not in struct" in text or "Could not append to config" in text or "Key '" in text:
        why = (f"the key does not exist in {APP_FILES.get(app, f'configs/{app}.yaml')} or its groups; an unknown "
               "key would otherwise be silently ignored")
    elif "could not be converted" in text or "Value '" in text:
        why = "the value has the wrong type for this key"
    elif "Ambiguous value" in text:
        return config_error(what, "a comma separates the values of a multirun sweep", "quote a value that holds "
                            "commas (e.g. 'seeds=\"1,5,9\"'), or add -m to run one job per value")
    elif quoting_hint(text):
        return config_error(what, "Hydra's override grammar does not take non-ASCII letters, some symbols or "
                            "(in places) spaces in an unquoted value", quoting_hint(text))
    elif "Error parsing override" in text:
        return config_error(what, "arguments are key=value (Hydra's override grammar)",
                            f"write key=value; see `{APPS.get(app, app)} --help` for the keys")
    elif "Could not find '" in text:
        group = text.split("Could not find '", 1)[1].split("'", 1)[0].rpartition("/")[0]
        root = APP_DIRS.get(app, CONFIG_DIR)
        if group and (root / group).is_dir():
            return config_error(what, f"there is no such file in {root / group}", f"use {group}=one of: "
                                f"{', '.join(options(group, app))}")
        why = "a config file named in the defaults or on the command line does not exist"
    else:
        why = "Hydra could not compose the configuration from these overrides"
    return config_error(what, why, f"see `{APPS.get(app, app)} --help` (or --cfg job) for the keys and their values")


def quoting_hint(text: str) -> str | None:
    """For an override whose value needs Hydra's quotes (a path with spaces or non-ASCII letters): the fix."""
    if "Error parsing override '" in text:
        override = text.split("Error parsing override '", 1)[1].split("'\n", 1)[0].rstrip("'")
    elif text.startswith("LexerNoViableAltException: "):
        override = text.splitlines()[0].split(": ", 1)[1]
    else:
        return None
    key, sep, value = override.partition("=")
    if not sep or not (any(c.isspace() for c in value) or not value.isascii()
                       or ("/" in value and any(c in value for c in "()[]{}:"))):
        return None
    return f"quote the value inside the argument: '{key}=\"{value}\"' (the outer quotes are for the shell)"


def compose(overrides: Sequence[str] = (), config_name: str = "train", *, return_hydra_config: bool = False,
            validator=None, environment: bool = True) -> DictConfig:
    """Compose a configuration like ``python train.py <overrides>`` would (``config_name`` picks the app:
    train, sample, evaluate, leaderboard), and validate it (``validator``: the app's checks; the training
    config's ``validate`` by default, ``False`` for none). ``environment=False`` skips the training config's
    checks of this machine and its files (GPU present, checkpoints readable), e.g. to compose a GPU recipe
    on a CPU machine."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    check_choices(overrides)
    registry.trust_command_line(overrides)  # what the user's command line names is the user's choice
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(APP_DIRS.get(config_name, CONFIG_DIR)), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides,
                                return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException) as err:
        raise hydra_error(err, config_name) from err
    finally:
        GlobalHydra.instance().clear()
    if validator is None and config_name == "train":
        validator = functools.partial(validate, environment=environment)
    if validator:
        validator(cfg)
    return cfg


# --- the schema: types and ranges of every value, checked when a config is composed ------------------
class Spec:
    """One value's type (int, float, str, bool), whether null is allowed, and its range or choices."""

    def __init__(self, kind, *, null: bool = False, lo=None, lo_open: bool = False, choices=(), rule: str = "",
                 example=None):
        self.kind, self.null, self.lo, self.lo_open, self.choices, self.rule = kind, null, lo, lo_open, choices, rule
        self.example = example

    def problem(self, value) -> str | None:
        if value is None:
            return None if self.null else "it cannot be null"
        names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        if self.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, self.kind)
        if not ok:
            return f"it must be {names[self.kind]}" + (" or null" if self.null else "")
        if self.choices and value not in self.choices:
            return f"it must be one of {', '.join(map(str, self.choices))}"
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return self.rule or f"it must be {'>' if self.lo_open else '>='} {self.lo}"
        return None


def Int(lo=None, **kw):
    return Spec(int, lo=lo, **kw)


def Float(lo=None, **kw):
    return Spec(float, lo=lo, **kw)


Str, Bool = (lambda **kw: Spec(str, **kw)), (lambda **kw: Spec(bool, **kw))
PRECISION = Str(choices=("fp32", "bf16"))

# a user's settings of a sampler (Method.check_solver refuses those its solver does not take): EDM's churn
SAMPLER_SCHEMA = {"S_churn": Float(0, null=True, example=40), "S_tmin": Float(0, null=True, example=0.05),
                  "S_tmax": Float(0, null=True, example=50), "S_noise": Float(0, null=True, example=1.003)}


def sampler_options(node) -> dict:
    """The sampler settings (SAMPLER_SCHEMA keys) a config section sets (non-null), as plain floats."""
    return {k: float(node[k]) for k in SAMPLER_SCHEMA if node is not None and node.get(k) is not None}


# FID options, spelled once: the `fid` section of train.yaml (final FID), callbacks/fid.yaml, evaluate and
# the leaderboard suites all use these keys (genflow.metrics.evaluate_fid's keyword names)
FID_SCHEMA = {
    "num": Int(0), "seed_start": Int(0), "seed_sets": Int(1), "batch_size": Int(1),
    "steps": Int(1, null=True), "solver": Str(null=True), "guidance": Float(0, null=True),
    "extractor": Str(null=True), "mode": Str(choices=("clean", "legacy_tensorflow")),
    "inception_path": Str(null=True), "download": Bool(), "ref": Str(), "cache_dir": Str(null=True),
    "kid": Bool(), "time_limit": Float(0, null=True), "progress": Bool(null=True), "precision": PRECISION,
    "pr": Bool(), "pr_num": Int(4), "dinov2_path": Str(null=True),
    **SAMPLER_SCHEMA,
}

TRAIN_SCHEMA = {
    "seed": Int(0), "D": Float(0, lo_open=True, null=True, example=128), "path": Str(null=True, example="condot"),
    "stage": Int(choices=(1, 2), null=True, example=1), "ckpt_path": Str(null=True), "init_from": Str(null=True),
    "allow_heavy_tails": Bool(), "run_dir": Str(null=True),
    "ema": {"halflife_kimg": Float(0), "rampup": Float(0, null=True)},
    "sample": {"num": Int(1), "steps": Int(1), "solver": Str(), "guidance": Float(0, null=True),
               "every_n_steps": Int(0), "precision": PRECISION},
    "checkpoint": {"every_n_steps": Int(0), "keep": Int(-1), "every_minutes": Float(0, lo_open=True, null=True)},
    "progress": {"every_seconds": Float(0)},
    "fid": FID_SCHEMA,
}


def fid_options(fid, sample=None, **given) -> dict:
    """``genflow.metrics.evaluate_fid`` keywords from an `fid` section (FID_SCHEMA); steps, solver and guidance
    default to the `sample` section's. ``given`` (e.g. device) is passed on."""
    options = {k: v for k, v in OmegaConf.to_container(OmegaConf.create(dict(fid)), resolve=True).items()
               if k in FID_SCHEMA and k not in SAMPLER_SCHEMA}
    options["solver_options"] = sampler_options(fid)
    sample = sample or {}
    for key, default in (("steps", 18), ("solver", "heun"), ("guidance", None)):
        if options.get(key) is None:
            options[key] = sample.get(key, default)
    return {**options, **given}


# ranges of the optimizer arguments every torch optimizer shares (the keys themselves are checked against the
# optimizer's signature)
OPTIM_SCHEMA = {"lr": Float(0, lo_open=True, example=2e-3), "weight_decay": Float(0), "eps": Float(0, lo_open=True),
                "warmup_steps": Int(0)}
OPEN = ("data", "model", "net", "optim", "trainer", "callbacks", "logger", "hydra", "experiment")
#: trainer.* keys that genflow applies itself (genflow.training.module.speed_settings), not Lightning Trainer arguments
GENFLOW_TRAINER_KEYS = ("matmul_precision", "compile", "channels_last")
MATMUL_PRECISIONS = ("highest", "high", "medium")


def check_schema(cfg: DictConfig, schema: dict, *, prefix: str = "", app: str = "train", open_keys=OPEN) -> None:
    """Every key of ``cfg`` is in ``schema`` (or an open section checked elsewhere) and its value fits."""
    for key in cfg.keys():
        full = f"{prefix}{key}"
        if key in open_keys and not prefix:
            continue
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise config_error(f"unknown key {full}", f"{prefix.rstrip('.') or 'the config'} has no key {key!r}; "
                               "it would be silently ignored", f"use one of: {known} (see `{APPS[app]} --cfg job`)")
        spec = schema[key]
        if isinstance(spec, dict):
            node = cfg[key]
            if node is None:
                continue
            if not isinstance(node, DictConfig):
                raise config_error(f"{full}={node!r}", f"{full} is a group of options ({', '.join(spec)})",
                                   f"set them one by one, e.g. {full}.{next(iter(spec))}=...")
            check_schema(node, spec, prefix=f"{full}.", app=app, open_keys=())
            continue
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        problem = spec.problem(value)
        if problem:
            example = spec.example if spec.example is not None else OmegaConf.select(_defaults(app), full, default=None)
            raise config_error(f"{full}={value!r}", f"{full}: {problem}",
                               f"pass a valid value, e.g. {full}={'...' if example is None else example}")


@functools.lru_cache(maxsize=None)
def _defaults(app: str) -> DictConfig:
    return compose([], app, validator=False)


def target_class(node):
    """The class or function a ``_target_`` names (imported, not instantiated)."""
    from hydra.utils import get_object

    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not target:
        return None
    try:
        return get_object(str(target))
    except Exception as err:
        raise config_error(f"_target_={target} cannot be imported", f"{type(err).__name__}: {err}",
                           "fix the _target_ in the config file") from err


def accepted_params(target) -> tuple[dict, bool]:
    """(parameter name -> inspect.Parameter, takes arbitrary keywords) of a class's constructor chain."""
    import inspect

    params: dict = {}
    classes = target.__mro__ if isinstance(target, type) else (target,)
    for cls in classes:
        init = cls.__init__ if isinstance(target, type) else cls
        if isinstance(target, type) and "__init__" not in vars(cls):
            continue
        try:
            sig = inspect.signature(init)
        except (TypeError, ValueError):
            return params, True
        for name, p in sig.parameters.items():
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                params.setdefault(name, p)
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            return params, False
    return params, True


def check_target(node, where: str, *, provided: Sequence[str] = ()) -> None:
    """Keys of a ``_target_`` node are parameters of the target, and plain values fit their annotations."""
    cls = target_class(node)
    if cls is None:
        return
    params, open_kwargs = accepted_params(cls)
    for key in node.keys():
        if str(key).startswith("_") or key in provided:
            continue
        if key not in params:
            if open_kwargs:
                continue
            raise config_error(f"unknown key {where}.{key}", f"{cls.__name__} takes no argument {key!r}; it would "
                               "fail or be silently ignored", f"use one of: {', '.join(sorted(params))}")
        value = OmegaConf.select(node, str(key), throw_on_resolution_failure=False)
        choices = _literal_choices(params[key])
        if choices and value is not None and value not in choices:
            raise config_error(f"{where}.{key}={value!r}", f"{cls.__name__}'s {key} is one of "
                               f"{', '.join(map(str, choices))}", f"use e.g. {where}.{key}={choices[0]}")
        kind = _simple_annotation(params[key])
        if kind is not None and value is not None and not isinstance(value, (DictConfig, ListConfig)):
            number = kind is float and isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number and not (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
                names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
                raise config_error(f"{where}.{key}={value!r}", f"{cls.__name__}'s {key} must be {names[kind]}",
                                   f"pass e.g. {where}.{key}={params[key].default!r}"
                                   if params[key].default is not params[key].empty else f"fix {where}.{key}")


def _literal_choices(param) -> tuple:
    """The values of a ``Literal[...]`` annotation (as written, under ``from __future__ import annotations``)."""
    import ast
    import typing

    ann = param.annotation
    if isinstance(ann, str):
        ann = ann.replace(" ", "")
        if ann.startswith("Literal[") and ann.endswith("]"):
            return tuple(ast.literal_eval("(" + ann[len("Literal["):-1] + ",)"))
        return ()
    return typing.get_args(ann) if typing.get_origin(ann) is typing.Literal else ()


def _simple_annotation(param):
    """int, float, str or bool when the annotation is exactly that type (optionally `| None`), else None."""
    ann = param.annotation
    if isinstance(ann, str):
        ann = ann.replace(" ", "").removesuffix("|None")
        return {"int": int, "float": float, "str": str, "bool": bool}.get(ann)
    return ann if ann in (int, float, str, bool) else None


# bare top-level knobs and the model they belong to; a model uses one by interpolating ${knob:NAME,default}
KNOBS = {"D": "model=pfgmpp", "path": "model=flow", "stage": "model=isotropic3d (data=multiview)"}


def check_knobs(cfg: DictConfig) -> None:
    """A bare knob set for a model that does not read it is an error, never silently ignored."""
    used = str(OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in ("model", "net", "data")
                                                                   if k in cfg]), resolve=False))
    for knob, owner in KNOBS.items():
        if cfg.get(knob) is not None and f"knob:{knob}," not in used:
            model = str((cfg.get("model") or {}).get("_target_", "?")).rsplit(".", 1)[-1]
            raise config_error(f"{knob}={cfg.get(knob)} does not apply to the chosen model ({model})",
                               f"{knob} is a knob of {owner}; {model} would silently ignore it",
                               f"drop {knob}=, or choose {owner}")


def check_trainer(trainer, environment: bool = True) -> None:
    import inspect

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


def validate(cfg: DictConfig, environment: bool = True) -> None:
    """Checks that need the whole training configuration, run when it is composed and before anything is
    built: types and ranges, unknown keys, knobs that do not apply, the trainer, the sampler settings
    against the model, and (``environment``) the GPU, the checkpoints it will read and the run folder."""
    check_schema(cfg, TRAIN_SCHEMA)
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
    # the method checks its own settings (e.g. PFGM++'s D <= 2 opt-in) and names its samplers; building it is cheap
    method = build_method(cfg) if cfg.get("model") is not None else None
    sample = cfg.get("sample") or {}
    if method is not None and sample:
        method.check_solver(sample.solver, "sample.solver")
    fid = cfg.get("fid") or {}
    if method is not None and fid.get("num") and fid.get("solver"):
        method.check_solver(fid.solver, "fid.solver", sampler_options(fid))
    if sample.get("guidance") is not None and cfg.get("data") is not None and not data_conditions(cfg.data):
        raise config_error(f"sample.guidance={sample.guidance} for an unconditional model",
                           "classifier-free guidance mixes conditional and unconditional predictions; the data "
                           "gives this model no condition", "drop sample.guidance, or train with data.conditional=true")
    if environment:
        check_files(cfg)


def check_files(cfg: DictConfig) -> None:
    """The checkpoints a training run reads (readable, of the right kind and model) and its run folder."""
    for key in ("ckpt_path", "init_from"):
        value = cfg.get(key)
        if value not in (None, "last") and not Path(str(value)).expanduser().is_file():
            raise config_error(f"{key}={value} does not exist", f"{key} must name a checkpoint file",
                               f"check the path, or use {key}=null" + (" / ckpt_path=last" if key == "ckpt_path" else ""))
    if cfg.get("init_from"):
        read_checkpoint(cfg.init_from, key="init_from")
    if cfg.get("ckpt_path") is not None:
        overrides = OmegaConf.select(cfg, "hydra.overrides.task", default=None)
        # ckpt_path=last up front only where the folder is named: a sweep's jobs resume their own folders
        named = any(str(o).startswith("hydra.run.dir=") for o in OmegaConf.select(cfg, "hydra.overrides.hydra",
                                                                                    default=None) or [])
        run_dir = cfg.get("run_dir") or (OmegaConf.select(cfg, "hydra.run.dir") if named else None)
        if str(cfg.ckpt_path) == "last":
            path, ckpt = (newest_valid(Path(str(run_dir)))[:2]) if run_dir else (None, None)
        else:
            path, ckpt = cfg.ckpt_path, read_resumable(cfg.ckpt_path)
        if ckpt is not None:
            check_resume(cfg, ckpt["hyper_parameters"]["config"], path,
                         explicit_sections(overrides) if overrides is not None else None)
    check_output_dir(cfg.get("run_dir"), "run_dir")
    folder = None if cfg.get("run_dir") else OmegaConf.select(cfg, "hydra.run.dir")
    if folder is not None:  # before Hydra writes .hydra/ there (a library run_dir: prepare_run checks it)
        from genflow.outputs import check_folder_before_start
        check_folder_before_start(Path(str(folder)), resuming=cfg.get("ckpt_path") is not None)
    if cfg.get("data") is not None and hasattr(target_class(cfg.data), "verify"):
        build_data(cfg).verify()  # data files decodable (a bad image is named) before the run starts
    if cfg.get("hydra") is not None:
        check_output_dir(OmegaConf.select(cfg, "hydra.run.dir"), "hydra.run.dir")


# --- what a resume keeps -----------------------------------------------------------------------------
# recorded settings a resume must keep, and data keys that may change between machines or sessions
RECORDED = ("model", "net", "data")
MACHINE_KEYS = {"num_workers", "root", "path", "download", "cache_dir", "pin_memory", "persistent_workers"}
# top-level override keys and the recorded section they change
OVERRIDE_SECTIONS = {"model": "model", "D": "model", "path": "model", "stage": "net", "allow_heavy_tails": "model",
                     "net": "net", "data": "data", "experiment": "model net data"}


def explicit_sections(overrides: Sequence[str]) -> set[str]:
    """The recorded sections a command line's overrides change (``model=edm``, ``D=64``, ``net.x=...``)."""
    sections = set()
    for item in overrides:
        key = str(item).lstrip("+~").split("=", 1)[0]
        sections.update(OVERRIDE_SECTIONS.get(key.split(".", 1)[0], "").split())
    return sections


def _comparable(section: str, node) -> dict:
    value = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    if section == "data":
        value = {k: v for k, v in value.items() if k not in MACHINE_KEYS}
    return value


def _differences(a: dict, b: dict, prefix: str) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _differences(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k, "<absent>") != b.get(k, "<absent>"):
            out.append(f"{prefix}{k}: recorded {b.get(k, '<absent>')!r}, requested {a.get(k, '<absent>')!r}")
    return out


def check_resume(cfg: DictConfig, recorded: dict, path, explicit: set[str] | None) -> list[str]:
    """The one rule for resuming (``ckpt_path=FILE`` or ``last``, checked before the job starts and again when
    the run starts):
    a model/net/data setting the command line changes (``explicit``; None = unknown, every section counts as
    changed) must equal the recorded one, else CheckpointError naming the keys. Returns the sections that
    differ only by default, which the run adopts from the record."""
    refused, adopted = [], []
    for section in RECORDED:
        if section not in recorded:
            continue
        diff = _differences(_comparable(section, cfg.get(section)), _comparable(section, recorded[section]),
                            f"{section}.")
        if diff and (explicit is None or section in explicit):
            refused += diff
        elif diff:
            adopted.append(section)
    if refused:
        raise CheckpointError(
            f"the resumed run {path} was trained with other settings:\n    " + "\n    ".join(refused[:12]) +
            "\n  why: continuing a run with another model, net or data would mix two experiments in one folder "
            "and overwrite its results\n"
            "  fix: drop these overrides to resume the run as recorded, or start a new run in another folder "
            "(init_from=CKPT to start from its weights)")
    return adopted


# --- entry points ----------------------------------------------------------------------------------
HYDRA_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve", "--package", "-p",
               "--shell-completion", "-sc", "--version")


def sweep_variants(overrides: list[str]) -> list[list[str]]:
    """For a multirun: every value of every sweep (the other sweeps at their first value)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    base = [o.input_line if not o.is_sweep_override() else f"{o.get_key_element()}={next(o.sweep_string_iterator())}"
            for o in parsed]
    variants = [base]
    for i, o in enumerate(parsed):
        if o.is_sweep_override():
            for value in list(o.sweep_string_iterator())[1:]:
                variants.append(base[:i] + [f"{o.get_key_element()}={value}"] + base[i + 1:])
    return variants


def preflight(config_name: str, validator=None, argv: Sequence[str] | None = None) -> None:
    """Before Hydra runs an app: compose the command line's overrides and validate them, so a bad input is
    reported as what / why / fix with exit 2 before anything is built or written."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a.split("=")[0] in HYDRA_FLAGS for a in args):
        return  # --help / --cfg job / --info: Hydra answers, nothing runs
    overrides = [a for a in args if not a.startswith("-")]
    try:
        variants = sweep_variants(overrides) if ("-m" in args or "--multirun" in args) else [overrides]
    except (HydraException, OmegaConfBaseException) as err:
        raise hydra_error(err, config_name) from err
    for variant in variants:
        compose(variant, config_name, return_hydra_config=True, validator=validator)


def run_app(hydra_main, config_name: str, validator=None) -> None:
    """The one way every entry point starts: ``--debug`` handled, the command line validated (exit 2 with
    what / why / fix on a bad input), then the Hydra app runs (its task wrapped in ``errors.reported``)."""
    from genflow.errors import exit_on_error, strip_debug_flag

    strip_debug_flag()
    exit_on_error(preflight, config_name, validator)
    hydra_main()


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


def build(cfg: DictConfig, *, prepare: bool = True, datamodule=None):
    """(GenerativeModule, GenerativeDataModule) for a composed config.

    ``prepare=False`` skips data-dependent estimation in the method (spectra, separation functions):
    a checkpoint restores those buffers. ``datamodule``: one already at hand (a checkpoint's ``RecordedData``).
    """
    from genflow.data.record import data_record
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


# --- checkpoints ---------------------------------------------------------------------------------
_CHECKPOINTS: dict = {}


def read_checkpoint(path: str | Path, *, key: str = "ckpt") -> dict:
    """Load a Lightning checkpoint with ``weights_only=True`` (never unpickles code). The last one read is
    kept, so a checkpoint validated before a run starts is not read twice."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise checkpoint_error(f"{key}={path} does not exist" + (" (it is a folder)" if path.is_dir() else ""),
                               "a checkpoint is a .ckpt file written by train.py",
                               f"pass {key}=PATH to a .ckpt (runs put them in <run_dir>/checkpoints/)")
    stamp = (str(path.resolve()), path.stat().st_mtime_ns, path.stat().st_size)
    if stamp in _CHECKPOINTS:
        return _CHECKPOINTS[stamp]
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # empty, truncated, corrupt or pickling foreign classes
        reason = str(err).split(". ")[0].splitlines()[0][:160] if str(err) else "empty file"
        raise checkpoint_error(f"cannot read checkpoint {key}={path} ({type(err).__name__}: {reason})",
                               "the file is empty, truncated, corrupt, or holds objects other than tensors and "
                               "plain containers (genflow never unpickles code)",
                               "use a checkpoint written by genflow's train.py") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt.get("hyper_parameters", {}):
        raise checkpoint_error(f"{key}={path} is not a genflow checkpoint",
                               "it has no state_dict and no stored training config",
                               "use a checkpoint written by genflow's train.py")
    registry.check_stored(ckpt["hyper_parameters"]["config"], f"{key}={path}")  # before anything reads it
    _CHECKPOINTS.clear()
    _CHECKPOINTS[stamp] = ckpt
    return ckpt


def forget_checkpoints() -> None:
    """Drop the checkpoint ``read_checkpoint`` keeps (a training state can hold gigabytes of optimizer
    moments; once a run has started from it, Lightning holds its own copy)."""
    _CHECKPOINTS.clear()


def read_resumable(path: str | Path, *, key: str = "ckpt_path") -> dict:
    """A full training checkpoint (weights, optimizer and loop state); a weights-only export is refused."""
    ckpt = read_checkpoint(path, key=key)
    if "optimizer_states" not in ckpt or "loops" not in ckpt:
        raise checkpoint_error(f"{key}={path} holds weights only (an export such as final.ckpt), not a training "
                               "state", "resuming needs the optimizer, the EMA and the data position, which only "
                               "full checkpoints keep", "resume from <run>/checkpoints/last.ckpt (ckpt_path=last), "
                               f"or start a new run from these weights with init_from={path}")
    return ckpt


def newest_valid(run_dir: Path) -> tuple[Path, dict, list[str]]:
    """The newest readable full checkpoint in ``run_dir/checkpoints`` (by modification time), and notes on
    the ones skipped."""
    folder = run_dir / "checkpoints"
    found = sorted((p for p in folder.glob("*.ckpt") if p.name != "final.ckpt"),
                   key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"), reverse=True) if folder.is_dir() else []
    if not found:
        raise config_error(f"ckpt_path=last but {run_dir} holds no checkpoint to resume",
                           "resuming continues a run that was started in this folder; there is none",
                           "start a new run without ckpt_path, or point hydra.run.dir at the run to resume")
    skipped = []
    for path in found:
        try:
            return path, read_resumable(path), skipped
        except CheckpointError as err:
            skipped.append(f"skipped {path.name}: {str(err).splitlines()[0]}")
    raise CheckpointError(f"no readable checkpoint in {folder}\n  why: " + "; ".join(skipped) +
                          "\n  fix: start a new run in another folder (this one keeps the broken files for "
                          "inspection)")


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
        raise CheckpointError(f"checkpoint {path} does not match the requested network "
                              f"(stored net config: {stored})\n"
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
    """(GenerativeModule with EMA weights, datamodule, config) from a checkpoint, without unpickling code.
    The datamodule is the checkpoint's record of its data (``genflow.data.record``), which builds the data only
    when a job reads it; a checkpoint written before records has its datamodule built as before."""
    from genflow.data.record import RecordedData, read_record

    ckpt = read_checkpoint(path)
    cfg = config_from_checkpoint(ckpt, overrides)
    cfg.init_from = None
    record = read_record(ckpt, path)
    recorded = None if record is None else RecordedData(record, target_class(cfg.data), lambda: build_data(cfg))
    module, dm = build(cfg, prepare=False, datamodule=recorded)
    load_weights(module, ckpt, path=path)
    return module.to(device).eval(), dm, cfg
