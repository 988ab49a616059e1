"""Content-hash keys and atomic, rank-safe writes for everything genflow stores: the cache of values computed
from data (SPD spectra, lambda-hat of kinetic-optimal paths; ``cache_dir()``, ``$GENFLOW_CACHE``), FID
reference statistics and converted checkpoints (under ``$GENFLOW_METRICS_HOME``, beside the metric weights),
checkpoints and exports of runs.

``content_hash`` keys a value by the bytes, dtype and shape of the tensors it was computed from plus
any settings; ``cached(path, compute, load=..., save=...)`` returns the stored value or computes and
stores it. Writes go to a unique temporary file in the target folder (``tempfile.mkstemp``) that is
renamed over the target (``os.replace``): DDP ranks or concurrent runs computing the same entry never
read a half-written file nor clobber each other's temporary file, and the last rename wins with an
identical value.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def cache_dir() -> Path:
    """``$GENFLOW_CACHE`` or ``~/.cache/genflow``."""
    return Path(os.environ.get("GENFLOW_CACHE", Path.home() / ".cache" / "genflow"))


def content_hash(*parts: Tensor | str | bytes, length: int = 24) -> str:
    """sha256 (hex, first ``length`` characters) of each tensor's dtype, shape and bytes and of each string."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            x = part.detach().cpu().contiguous()
            h.update(f"{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
        else:
            h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"|")
    return h.hexdigest()[:length]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 (hex) of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def output_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives under this process's umask (0644 under the usual 022)."""
    try:  # read, not set: flipping the umask to read it would race with other threads creating files
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("Umask:"))
        mask = int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` to a unique temporary file beside ``path``, flush it to disk, give it the mode of any
    other output (``mkstemp`` makes it private) and rename it over ``path``: a kill or a crash never leaves a
    half-written file under that name. Every file genflow writes for later use (checkpoints, exports,
    cache entries) goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, output_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def cached(path: str | os.PathLike, compute: Callable[[], T], *, load: Callable[[Path], T],
           save: Callable[[T, Path], None]) -> T:
    """The value stored at ``path``, or ``compute()`` stored there atomically."""
    path = Path(path)
    if path.is_file():
        return load(path)
    value = compute()
    atomic_write(path, lambda tmp: save(value, tmp))
    return value
