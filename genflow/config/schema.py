"""The schema: the type and range of every value an app reads, checked when its config is composed.

``Spec`` (``Int``, ``Float``, ``Str``, ``Bool``) describes one value; a schema is a dict of them (nested for
sections). ``FID_SCHEMA`` and ``PRECISION`` are spelled once and referenced by every app that reads them.
``check_target`` checks the keys of a ``_target_`` node against the target's own signature.
"""
from __future__ import annotations

import ast
import inspect
import typing
from typing import Sequence

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from genflow.config.composing import APPS, app_defaults
from genflow.errors import config_error
from genflow.solvers import SCHEDULES, UNIPC_ORDERS, UNIPC_VARIANTS


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

# a user's settings of a sampler (Method.check_solver refuses those its solver does not take): EDM's churn,
# the time grid of the exponential integrators (dpmpp_2m, unipc), UniPC's order, B(h) and final-step orders
SAMPLER_SCHEMA = {"S_churn": Float(0, null=True, example=40), "S_tmin": Float(0, null=True, example=0.05),
                  "S_tmax": Float(0, null=True, example=50), "S_noise": Float(0, null=True, example=1.003),
                  "schedule": Str(null=True, choices=SCHEDULES, example="logsnr"),
                  "order": Int(null=True, choices=UNIPC_ORDERS, example=3),
                  "variant": Str(null=True, choices=UNIPC_VARIANTS, example="bh2"),
                  "lower_order_final": Bool(null=True, example=True)}


def sampler_options(node) -> dict:
    """The sampler settings (SAMPLER_SCHEMA keys) a config section sets (non-null), as plain Python values."""
    if node is None:
        return {}
    return {k: spec.kind(node[k]) for k, spec in SAMPLER_SCHEMA.items() if node.get(k) is not None}


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
    "seed": Int(0), "ckpt_path": Str(null=True), "init_from": Str(null=True),
    "allow_heavy_tails": Bool(), "run_dir": Str(null=True),
    # ema=edm: halflife_kimg, rampup; ema=posthoc: sigma_rel (checked by genflow.training.posthoc), snapshot_kimg
    "ema": {"halflife_kimg": Float(0), "rampup": Float(0, null=True), "sigma_rel": Spec(object),
            "snapshot_kimg": Float(0, lo_open=True)},
    "sample": {"num": Int(1), "steps": Int(1), "solver": Str(), "guidance": Float(0, null=True),
               "guide_ckpt": Str(null=True),
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
    """Every key of ``cfg`` is in ``schema`` (or an open section checked elsewhere) and its value fits. Keys are
    checked in the schema's order (a value that interpolates another, ``fid.precision: ${sample.precision}``,
    is reported at its source), unknown keys first."""
    order = {key: i for i, key in enumerate(schema)}
    for key in sorted(cfg.keys(), key=lambda k: order.get(k, -1)):
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
            example = spec.example if spec.example is not None else OmegaConf.select(app_defaults(app), full, default=None)
            raise config_error(f"{full}={value!r}", f"{full}: {problem}",
                               f"pass a valid value, e.g. {full}={'...' if example is None else example}")


def target_class(node):
    """The class or function a ``_target_`` names (imported, not instantiated)."""
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
