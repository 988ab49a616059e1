"""What an app may write where: outputs never replace what another command wrote.

- ``check_record(path, ckpt)``: ``evaluate out=FILE`` replaces a file only if it is an earlier record of
  the same checkpoint's evaluation (one JSON line with that ``ckpt``); a run's ``result.json``, another
  checkpoint's record or any other file is refused.
- ``check_sample_folder(out, settings)`` / ``write_sample_manifest(out, settings, seeds)``: ``sample.py``
  records what made the images of a folder in ``samples.json``; a folder holding a training run, or images,
  ``samples.npz`` or ``grid.png`` without a manifest of the same settings (checkpoint, solver, steps, ...),
  is refused. The same command again may write there (it produces the same images).
"""
from __future__ import annotations

import json
from pathlib import Path

from genflow.errors import config_error

MANIFEST = "samples.json"
SAMPLE_FILES = ("samples.npz", "grid.png")


def check_record(path: Path, ckpt) -> None:
    """Refuse to replace ``path`` unless it is an evaluation record of ``ckpt``."""
    if not path.exists():
        return
    try:
        record = json.loads(path.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        record = None
    if isinstance(record, dict) and record.get("ckpt") == str(ckpt) and "run_dir" not in record:
        return
    raise config_error(f"out={path} already exists and is not a record of this checkpoint's evaluation",
                       "evaluate never replaces a file it did not write (a run's result.json, another "
                       "checkpoint's record, any other file)",
                       "choose a new file name for out=, or move that file away")


def sample_settings(cfg, ckpt_path) -> dict:
    """What decides the images of a seed: the checkpoint (path, size, modification time) and the sampler."""
    p = Path(str(ckpt_path)).expanduser().resolve()
    stat = p.stat() if p.is_file() else None
    keys = ("steps", "solver", "guidance", "class", "reference", "precision", "sigma_min", "sigma_max", "rho",
            "S_churn", "S_tmin", "S_tmax", "S_noise")
    return {"ckpt": str(p), "ckpt_bytes": stat and stat.st_size, "ckpt_mtime_ns": stat and stat.st_mtime_ns,
            **{k: (None if cfg.get(k) is None else str(cfg.get(k))) for k in keys}}


def check_sample_folder(out: Path, settings: dict) -> None:
    """Refuse a folder that holds a training run or samples of other settings (see the module docstring)."""
    from genflow.training.runs import RUN_FILES

    if not out.is_dir():
        return
    ckpts = out / "checkpoints"
    if any((out / name).exists() for name in RUN_FILES if name != "grid.png") or \
            (ckpts.is_dir() and any(ckpts.glob("*.ckpt"))):
        raise config_error(f"out={out} holds a training run", "sample.py would replace the run's grid.png and "
                           "mix its images into the run's folder", "choose another out= folder")
    images = sorted(p for p in out.glob("*.png") if p.name != "grid.png")
    present = [p.name for p in images] + [n for n in SAMPLE_FILES if (out / n).exists()]
    if not present:
        return
    try:
        recorded = json.loads((out / MANIFEST).read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded == settings:
        return
    differ = sorted(k for k in settings if recorded is None or recorded.get(k) != settings[k])
    what = "no record of what made them" if recorded is None else f"other settings ({', '.join(differ)})"
    raise config_error(f"out={out} already holds {len(images)} images from another command ({what})",
                       "new images beside old ones, a new grid.png and samples.npz would mix two sets without a "
                       "trace", "choose a new out= folder, or move the old images away")


def write_sample_manifest(out: Path, settings: dict, seeds) -> None:
    from genflow.cache import atomic_write

    text = json.dumps({"settings": settings, "seeds": [int(s) for s in seeds]})
    atomic_write(out / MANIFEST, lambda tmp: tmp.write_text(text + "\n"))
