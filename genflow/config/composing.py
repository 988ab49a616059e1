"""Composing an app's configuration with Hydra (``compose_config``) and wording Hydra's errors as what / why / fix.

Every app's config lives in ``configs/`` (the leaderboard's in ``configs/leaderboard/``); ``options(group)`` lists
what a config group accepts. ``${knob:NAME}`` reads a bare command-line knob (``D=2048``) in a model or net file;
the classes of the model, net and data declare their knobs (``genflow.knobs``), with their defaults.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

from hydra import compose as hydra_compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from genflow import registry
from genflow.errors import ConfigError, config_error
from genflow.knobs import Knob, knobs_of

CONFIG_DIR = registry.CONFIG_DIR  # one definition: the registry reads the same folder
GROUPS = ("model", "net", "data", "trainer", "ema", "callbacks", "logger", "experiment")
# an app's config folder, where not configs/ (the tools' folder has no config groups: their net=, data= are values)
APP_DIRS = {"leaderboard": CONFIG_DIR / "leaderboard", **{name: CONFIG_DIR / "tools" for name in
                                                         ("convert", "dataset", "bench", "plot_spd", "plot_kinetic")}}
APP_FILES = {"leaderboard": "configs/leaderboard/leaderboard.yaml",
             **{name: f"configs/tools/{name}.yaml" for name in ("convert", "dataset", "bench", "plot_spd", "plot_kinetic")}}
APPS = {"train": "train.py", "sample": "sample.py", "evaluate": "python -m genflow.apps.evaluate",
        "leaderboard": "python -m genflow.apps.leaderboard", "convert": "python -m genflow.apps.convert",
        "bench": "python -m genflow.apps.bench", "plot_spd": "python -m genflow.apps.plot_spd",
        "plot_kinetic": "python -m genflow.apps.plot_kinetic", "dataset": "python -m genflow.apps.dataset",
        "posthoc": "python -m genflow.apps.posthoc"}


KNOB_SECTIONS = ("model", "net", "data")  # the sections whose classes may declare knobs


def declared_knobs(cfg) -> dict[str, Knob]:
    """The knobs the classes of ``cfg``'s model, net and data declare, by name."""
    found = {}
    for section in KNOB_SECTIONS:
        node = cfg.get(section) if cfg is not None else None
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        if target:
            try:
                cls = get_object(str(target))
            except Exception:  # an unimportable _target_ is reported by the schema checks, with its fix
                continue
            found.update({k.name: k for k in knobs_of(cls)})
    return found


def knob_owners(extra_dirs: Sequence[Path] = ()) -> dict[str, str]:
    """Every knob a model, net or data config file's class declares, and the choice that brings it
    (``{"D": "model=pfgmpp", "stage": "net=multiview", ...}``): for messages about a knob of another model."""
    owners: dict[str, str] = {}
    for section in KNOB_SECTIONS:
        for folder in (CONFIG_DIR, *extra_dirs):
            for path in sorted((Path(folder) / section).glob("*.yaml")):
                target = OmegaConf.load(path).get("_target_")
                try:
                    cls = get_object(str(target)) if target else None
                except Exception:  # reported where that file is chosen
                    continue
                for knob in knobs_of(cls):
                    owners.setdefault(knob.name, f"{section}={path.stem}")
    return owners


def _knob(name: str, default=None, *, _root_):
    """``${knob:D}``: the bare knob ``D`` when the command line (or an experiment) set it, else the default its
    class declares (``${knob:D,128}``: 128 where no class declares D)."""
    value = _root_.get(name) if name in _root_ else None
    if value is None:
        knob = declared_knobs(_root_).get(name)
        value = knob.default if knob is not None else default
    return value


def _dirname(overrides: str) -> str:
    """``${dirname:${hydra.job.override_dirname}}``: a sweep job's folder name, without the ``+`` that a bare
    knob gets for Hydra (``0_D=64,model=pfgmpp``)."""
    return ",".join(item.lstrip("+") for item in overrides.split(",")) if overrides else overrides


def _groups() -> str:
    """``${train_groups:}`` in train.py's --help: its own groups and their options (not the other apps')."""
    return "\n".join(f"{group}: {', '.join(options(group))}" for group in sorted(GROUPS))


if not OmegaConf.has_resolver("knob"):
    OmegaConf.register_new_resolver("knob", _knob)
if not OmegaConf.has_resolver("dirname"):
    OmegaConf.register_new_resolver("dirname", _dirname)
if not OmegaConf.has_resolver("train_groups"):
    OmegaConf.register_new_resolver("train_groups", _groups)


def options(group: str, app: str = "train") -> list[str]:
    """The names a config group of an app accepts (the yaml files in its folder, e.g. configs/<group>/)."""
    return sorted(p.stem for p in (APP_DIRS.get(app, CONFIG_DIR) / group).glob("*.yaml"))


def searchpath_dirs(overrides: Sequence[str]) -> list[Path]:
    """The folders of ``hydra.searchpath=[file:///my/configs,...]`` (your own config files: a model, a net)."""
    dirs = []
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        if key == "hydra.searchpath":
            dirs += [Path(v.strip().strip("'\"")[len("file://"):]) for v in value.strip("[]").split(",")
                     if v.strip().strip("'\"").startswith("file://")]
    return dirs


def check_choices(overrides: Sequence[str]) -> None:
    """Unknown group options get a list of the valid ones, before Hydra's own, terser error."""
    extra = searchpath_dirs(overrides)
    for item in overrides:
        key, sep, value = item.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or value in ("null", ""):
            continue
        for choice in value.split(","):
            if choice not in options(key) and not any((d / key / f"{choice}.yaml").is_file() for d in extra):
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


def compose_config(overrides: Sequence[str] = (), config_name: str = "train", *,
                   return_hydra_config: bool = False) -> DictConfig:
    """The configuration ``python -m genflow.apps.<config_name> <overrides>`` would run, unvalidated
    (``genflow.config.compose`` validates it)."""
    overrides = list(overrides)
    if APP_DIRS.get(config_name, CONFIG_DIR) == CONFIG_DIR:
        check_choices(overrides)
    registry.trust_command_line(overrides)  # what the user's command line names is the user's choice
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(APP_DIRS.get(config_name, CONFIG_DIR)), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException) as err:
        raise hydra_error(err, config_name) from err
    finally:
        GlobalHydra.instance().clear()


@functools.lru_cache(maxsize=None)
def app_defaults(app: str) -> DictConfig:
    """An app's configuration with no overrides (the examples of error messages come from it)."""
    return compose_config([], app)
