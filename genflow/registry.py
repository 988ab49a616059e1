"""The code a configuration may name: genflow's registry of ``_target_``s, and the check of configs read from files.

Hydra's ``instantiate`` calls whatever a ``_target_`` names (``builtins.open``, ``shutil.copyfile``, ...). A
config the user composed on the command line is the user's own choice; a config READ FROM A FILE that genflow
did not compose is data from whoever wrote the file: the training config stored in a checkpoint
(``ckpt=``, ``init_from=``, ``ckpt_path=FILE|last``) and a leaderboard suite (its entries' overrides). Such a
config may name only

* genflow's registry: the targets of genflow's own config files (``configs/**.yaml``, by the section they fill:
  model, net, data, optim, callbacks, logger) and the classes genflow ships for each section (its methods,
  networks and data modules, torch's optimizers), listed here in code, never read from a user's file;
* the user's extensions: what the user's own command line names, i.e. the targets it types
  (``+callbacks.mine._target_=pkg.Mine``) and those of the config files on the search path it gives
  (``hydra.searchpath=[file://DIR]`` or ``[pkg://PACKAGE]``: a method of one's own in ``DIR/model/``), and the
  targets a program that embeds genflow registers with ``register``.

``check_stored`` checks every ``_target_`` of such a config (nested in dicts and lists, ``_args_``, values that
are themselves target dicts) before anything in it is imported or built, and refuses an interpolation
(``${...}``): genflow stores configs resolved, and a resolver such as ``oc.decode`` would build a target dict
after the check. A refusal is ``error: what / why / fix`` naming the key, exit 2.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from genflow.errors import config_error

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
#: the sections of a training config whose targets genflow builds (each filled by the config folder of its name)
SECTIONS = ("model", "net", "data", "optim", "callbacks", "logger")
#: config-group folders of a user's search path whose targets the user vouches for (not suites: a suite is data)
USER_GROUPS = ("model", "net", "data", "callbacks", "logger", "experiment")

_user_targets: set[str] = set()


def _targets_in(node, section: str | None, path: str = "") -> Iterator[tuple[str, str, str]]:
    """(section, key path, target) of every ``_target_`` in a plain yaml tree; ``section`` None: the tree's
    top-level keys name the sections (train.yaml, an experiment's ``@package _global_``)."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str) and section is not None:
            yield section, path, target
        for key, value in node.items():
            child = f"{path}.{key}" if path else str(key)
            yield from _targets_in(value, section if section is not None else str(key), child)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets_in(value, section, f"{path}[{i}]")


def _yaml_files(folder: Path, groups: Sequence[str] | None) -> Iterator[tuple[str | None, Path]]:
    """(section the file fills, file): a group folder's files fill that group; top-level files and
    experiments name their sections themselves."""
    if groups is None:
        for path in sorted(folder.glob("*.yaml")):
            yield None, path
        groups = [p.name for p in sorted(folder.iterdir()) if p.is_dir() and p.name != "leaderboard"]
    for group in groups:
        for path in sorted((folder / group).rglob("*.yaml")):
            # a group file in Hydra's global package (experiments, ema/) names its sections itself
            yield (None if group == "experiment" or _global_package(path) else group), path


def _global_package(path: Path) -> bool:
    """Whether a config file declares ``# @package _global_`` in its header comments."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            return False
        if line.lstrip("# ").startswith("@package _global_"):
            return True
    return False


def _file_targets(folder: Path, groups: Sequence[str] | None = None) -> Iterator[tuple[str, str]]:
    from omegaconf import OmegaConf

    for section, path in _yaml_files(folder, groups):
        try:  # read as written: interpolations stay text, nothing is resolved
            tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        except Exception:
            continue  # Hydra reports a broken file when it composes it
        for sec, _, target in _targets_in(tree, section):
            yield sec, target


def _spellings(cls, exported_as: str) -> set[str]:
    """The names a config may use for a class: where it is defined, and where it is exported."""
    return {f"{cls.__module__}.{cls.__qualname__}", exported_as}


@functools.lru_cache(maxsize=None)
def registry() -> dict[str, frozenset[str]]:
    """section -> the targets genflow itself may build there (from its own config files and classes)."""
    import torch

    import genflow.data as data
    import genflow.methods as methods
    import genflow.nets as nets
    from genflow.data.base import GenerativeDataModule
    from genflow.methods.base import Method

    found: dict[str, set[str]] = {section: set() for section in SECTIONS}
    for section, target in _file_targets(CONFIG_DIR):
        found.setdefault(section, set()).add(target)
    shipped = ((methods, Method, "model"), (nets, torch.nn.Module, "net"), (data, GenerativeDataModule, "data"))
    for package, base, section in shipped:
        for name in package.__all__:
            obj = getattr(package, name)
            if isinstance(obj, type) and issubclass(obj, base) and obj is not base:
                found[section] |= _spellings(obj, f"{package.__name__}.{name}")
    # the run's own callbacks, which genflow.apps.train builds itself; checkpoints written before that hold them
    # in their callbacks section
    from genflow.training import EDMEma
    from genflow.training.resume import RunCheckpoint

    found["callbacks"] |= _spellings(EDMEma, "genflow.training.EDMEma") | _spellings(RunCheckpoint, "genflow.training.resume.RunCheckpoint")
    for name in dir(torch.optim):  # torch's own optimizers (any of them may replace Adam in optim)
        obj = getattr(torch.optim, name)
        if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer:
            found["optim"] |= _spellings(obj, f"torch.optim.{name}")
    return {section: frozenset(targets) for section, targets in found.items()}


def register(*targets: str) -> None:
    """Allow more targets in configs read from files (a program that embeds genflow and brings its own classes)."""
    _user_targets.update(targets)


def _parsed(overrides: Iterable[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides([str(o) for o in overrides])
    except Exception:
        return []  # Hydra reports a malformed override when it composes


def search_path_folders(overrides: Iterable[str]) -> list[Path]:
    """The folders a command line's ``hydra.searchpath=[...]`` adds (``file://DIR``, ``pkg://PACKAGE``, a path)."""
    folders = []
    for override in _parsed(o for o in overrides if str(o).lstrip("+~").split("=", 1)[0] == "hydra.searchpath"):
        value = override.value()
        for entry in value if isinstance(value, list) else [value]:
            entry = str(entry)
            if entry.startswith("pkg://"):
                import importlib.util

                try:
                    spec = importlib.util.find_spec(entry[len("pkg://"):].replace("/", "."))
                except (ImportError, ValueError):
                    spec = None
                if spec is not None and spec.submodule_search_locations:
                    folders += [Path(p) for p in spec.submodule_search_locations]
            else:
                folders.append(Path(entry.removeprefix("file://")).expanduser())
    return folders


def typed_targets(overrides: Iterable[str]) -> set[str]:
    """The targets a command line names itself (``+callbacks.x._target_=pkg.X``, ``+model.y={_target_: pkg.Y}``)."""
    found = set()
    for override in _parsed(o for o in overrides if "_target_" in str(o)):
        key, value = override.get_key_element().lstrip("+~"), override.value()
        if (key == "_target_" or key.endswith("._target_")) and isinstance(value, str):
            found.add(value)
        found.update(target for _, _, target in _targets_in(value, "", "") if isinstance(value, (dict, list)))
    return found


_trusting = [True]


@contextlib.contextmanager
def composing_a_file():
    """Within: a composition's overrides come from a file (a suite's entries), not from the user's command
    line, so they extend nothing."""
    _trusting.append(False)
    try:
        yield
    finally:
        _trusting.pop()


def trust_command_line(overrides: Sequence[str]) -> None:
    """What the user's command line names is the user's own choice: the targets it types, and those of the
    config files on the search path it gives. A config read from a file may name them too."""
    if not _trusting[-1]:
        return
    _user_targets.update(typed_targets(overrides))
    for folder in search_path_folders(overrides):
        if folder.is_dir():
            _user_targets.update(target for _, target in _file_targets(folder, USER_GROUPS))


def allowed(section: str | None, target: str) -> bool:
    if target in _user_targets:
        return True
    table = registry()
    if section in table:
        return target in table[section]
    return any(target in targets for targets in table.values())


def _walk(node, path: str) -> Iterator[tuple[str, object]]:
    """(key path, node) of every dict and string in a plain tree (dicts, lists, scalars)."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}" if path else str(key), key
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def check_stored(config, source: str) -> None:
    """Refuse a config read from ``source`` (a file genflow did not compose) that names code outside the
    registry, or holds an interpolation; nothing in it has been imported or built. ``config``: plain dicts and
    lists (a checkpoint's ``hyper_parameters.config``), or an OmegaConf node (resolved here)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=True)
    if not isinstance(config, dict):  # OmegaConf.create would parse a string as yaml, after this check
        raise config_error(f"{source}: the stored config is a {type(config).__name__}, not a mapping of settings",
                           "genflow stores the training config as plain dicts and lists",
                           "use a checkpoint written by genflow's train.py or genflow.apps.convert")
    for path, node in _walk(config, ""):
        if isinstance(node, str) and "${" in node:
            raise config_error(f"{source}: {path or 'the config'} holds an interpolation ({node[:80]!r})",
                               "a config read from a file is data, stored resolved; a resolver (e.g. oc.decode) "
                               "would turn it into objects after any check of what it may build",
                               f"use a checkpoint or suite that genflow wrote, or replace {path} by its value")
        if not isinstance(node, dict) or "_target_" not in node:
            continue
        target = node["_target_"]
        section = path.split(".", 1)[0].split("[", 1)[0] if path else None
        if not isinstance(target, str) or not allowed(section, target):
            kind = f"genflow's own {section} classes" if section in SECTIONS else "genflow's own classes"
            raise config_error(
                f"{source}: {path or 'the config'} names _target_={target!r}, which is not in genflow's registry",
                f"a config read from a file is data, not code: it may name only {kind} (methods, networks, data "
                "modules, optimizers, callbacks, loggers) or classes that the config files on your own "
                "hydra.searchpath name; building anything else could write files or run code",
                "use a file from a source you trust; if the class is your own, put its config folder on the "
                "command line: hydra.searchpath=[file://DIR] (DIR/model/<name>.yaml naming it)")
