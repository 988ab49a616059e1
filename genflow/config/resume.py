"""The one rule for resuming a run: what a resume must keep of the recorded run (its model, net and data)."""
from __future__ import annotations

from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from genflow.errors import CheckpointError


# recorded settings a resume must keep, and data keys that may change between machines or sessions
RECORDED = ("model", "net", "data")
MACHINE_KEYS = {"num_workers", "root", "path", "download", "cache_dir", "pin_memory", "persistent_workers"}
# top-level override keys and the recorded section they change
OVERRIDE_SECTIONS = {"model": "model", "allow_heavy_tails": "model",
                     "net": "net", "data": "data", "experiment": "model net data"}


def explicit_sections(overrides: Sequence[str], knobs=None) -> set[str]:
    """The recorded sections a command line's overrides change (``model=edm``, ``D=64``, ``net.x=...``);
    ``knobs``: the declared knobs (``genflow.knobs.Knob`` by name), each changing its own section."""
    sections = set()
    for item in overrides:
        key = str(item).lstrip("+~").split("=", 1)[0]
        if knobs and key in knobs:
            sections.add(knobs[key].section)
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
