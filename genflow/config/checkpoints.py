"""Reading genflow checkpoints: always ``weights_only=True`` (no code is unpickled), with what / why / fix
errors for a missing, corrupt, foreign or weights-only file; a checkpoint's tensors are verified against the
sha256 stored when it was written (``genflow.cache.save_checkpoint``) and the archive's other records against
their CRC-32s; a file written before checksums has all its records' CRC-32s checked. Each function returns
what it read; nothing is kept between calls (``mmap=True`` maps the tensors instead of reading them into
memory, for checks before a run)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from genflow import registry
from genflow.cache import checkpoint_damage
from genflow.errors import CheckpointError, checkpoint_error, config_error


def read_checkpoint(path: str | Path, *, key: str = "ckpt", mmap: bool = False) -> dict:
    """Load a Lightning checkpoint with ``weights_only=True`` (never unpickles code). ``mmap``: map the tensors
    from the file instead of reading them into memory (checks before a run: a training state can hold
    gigabytes of optimizer moments, which the checksum streams through without keeping)."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise checkpoint_error(f"{key}={path} does not exist" + (" (it is a folder)" if path.is_dir() else ""),
                               "a checkpoint is a .ckpt file written by train.py",
                               f"pass {key}=PATH to a .ckpt (runs put them in <run_dir>/checkpoints/)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # empty, truncated, corrupt or pickling foreign classes
        reason = str(err).split(". ")[0].splitlines()[0][:160] if str(err) else "empty file"
        raise checkpoint_error(f"cannot read checkpoint {key}={path} ({type(err).__name__}: {reason})",
                               "the file is empty, truncated, corrupt, or holds objects other than tensors and "
                               "plain containers (genflow never unpickles code)",
                               "use a checkpoint written by genflow's train.py") from err
    if why := checkpoint_damage(ckpt, path):
        raise checkpoint_error(f"checkpoint {key}={path} is corrupt", why,
                               "use another checkpoint of the run (e.g. an earlier step's in <run_dir>/checkpoints/) "
                               "or copy the file again from where it was made")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt.get("hyper_parameters", {}):
        raise checkpoint_error(f"{key}={path} is not a genflow checkpoint",
                               "it has no state_dict and no stored training config",
                               "use a checkpoint written by genflow's train.py")
    registry.check_stored(ckpt["hyper_parameters"]["config"], f"{key}={path}")  # before anything reads it
    return ckpt


def read_resumable(path: str | Path, *, key: str = "ckpt_path", mmap: bool = False) -> dict:
    """A full training checkpoint (weights, optimizer and loop state); a weights-only export is refused."""
    ckpt = read_checkpoint(path, key=key, mmap=mmap)
    if "optimizer_states" not in ckpt or "loops" not in ckpt:
        raise checkpoint_error(f"{key}={path} holds weights only (an export such as final.ckpt), not a training "
                               "state", "resuming needs the optimizer, the EMA and the data position, which only "
                               "full checkpoints keep", "resume from <run>/checkpoints/last.ckpt (ckpt_path=last), "
                               f"or start a new run from these weights with init_from={path}")
    return ckpt


def newest_valid(run_dir: Path, *, mmap: bool = False) -> tuple[Path, dict, list[str]]:
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
            return path, read_resumable(path, mmap=mmap), skipped
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
