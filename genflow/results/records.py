"""One schema for every JSON line genflow writes (docs/RECORDS.md).

- Components are named by their config names (``"model": "pfgmpp"``, ``"net": "unet_tiny"``,
  ``"data": "digits"``): the config file of ``configs/<group>/`` the stored section was made from, found
  from the section itself. A fresh run, the same run resumed, ``evaluate`` of its checkpoint and the
  leaderboard therefore all say the same names.
- Paths are absolute (``absolute``).
- Keys are plain identifiers: a setting is its own key (``"sigma0": 0.05``), never part of a key name.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping

from omegaconf import OmegaConf

from genflow.registry import CONFIG_DIR

NAMED_GROUPS = ("model", "net", "data")


def absolute(path) -> str | None:
    """An absolute path string (the working folder resolved, symlinks kept), None stays None."""
    if path is None:
        return None
    return os.path.abspath(os.path.expanduser(str(path)))


@functools.lru_cache(maxsize=None)
def _group_files(group: str) -> tuple[tuple[str, dict], ...]:
    """(config name, literal keys) of every config file of a group; interpolations (``${knob:D,128}``) and
    the defaults list say nothing about which file a stored section came from, so they are left out."""
    found = []
    for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
        node = OmegaConf.load(path)
        literal = {}
        for key in node:
            if key == "defaults" or OmegaConf.is_interpolation(node, key):
                continue
            value = node[key]
            literal[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        if "_target_" in literal:
            found.append((path.stem, literal))
    return tuple(found)


def config_name(group: str, section: Mapping | None) -> str | None:
    """The config file of ``configs/<group>/`` a stored (resolved, possibly overridden) section was made
    from: same ``_target_``, most literal keys equal, fewest different; None when no file has its target.
    Several files share a class (``genflow.nets.UNet`` for every U-Net preset), so the target alone does
    not say it."""
    if not section or "_target_" not in section:
        return None
    best, best_score = None, None
    for name, literal in _group_files(group):
        if literal["_target_"] != section["_target_"]:
            continue
        same = sum(1 for k, v in literal.items() if k in section and section[k] == v)
        score = (same, -sum(1 for k, v in literal.items() if k in section and section[k] != v))
        if best_score is None or score > best_score:
            best, best_score = name, score
    return best


def config_names(cfg: Mapping, choices: Mapping | None = None) -> dict[str, str]:
    """``{"model": ..., "net": ..., "data": ...}`` by config name for a composed or stored config: the config
    file the section matches, decided from the section alone so that every reader of the same run (fresh,
    resumed, evaluated) says the same name; a Hydra choice only where no file of genflow's has the class
    (a user's own config), else the class name. A file that only composes others (``model=isotropic3d`` is
    EDM's denoiser with the multi-view data and net) is named by what it composes."""
    choices = choices or {}
    names = {}
    for group in NAMED_GROUPS:
        section = cfg.get(group) if hasattr(cfg, "get") else None
        if section is not None and OmegaConf.is_config(section):
            section = OmegaConf.to_container(section, resolve=True)
        if not section:
            continue
        names[group] = (config_name(group, section) or (str(choices[group]) if choices.get(group) else None)
                        or str(section.get("_target_", "?")).rsplit(".", 1)[-1])
    return names


def plain_key(key: str) -> bool:
    """A key of the one schema: letters, digits, underscores and slashes (``val/loss``) only."""
    return bool(key) and all(c.isalnum() or c in "_/" for c in key)


def check_record(record: Mapping[str, Any]) -> Mapping[str, Any]:
    """Raise ValueError on a key outside the schema (``"bpd_sigma0=0.05"``), recursively."""
    for key, value in record.items():
        if not plain_key(str(key)):
            raise ValueError(f"record key {key!r} is not a plain key (letters, digits, _ and /)")
        if isinstance(value, Mapping):
            check_record(value)
    return record
