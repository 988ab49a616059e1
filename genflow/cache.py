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

Nothing stored is trusted on read. A cache entry has a sidecar ``<entry>.sha256`` holding the sha256 of its
bytes, written after the entry; ``cached`` recomputes an entry whose bytes do not match (truncated, bit-flipped,
edited numbers), that has no sidecar (written before checksums, or a write killed between the two renames) or
that fails to load, with one line on stderr saying so. A checkpoint (``save_checkpoint``) carries under
``CHECKSUM_KEY`` the sha256 of every tensor it holds (key path, dtype, shape, bytes); ``checksum_mismatch`` on
the loaded dict names what no longer matches, and readers (``genflow.config.checkpoints``) refuse the file.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import zipfile
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


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, suffix: str = ".tmp") -> Path:
    """``write(tmp)`` to a unique temporary file beside ``path``, flush it to disk, give it the mode of any
    other output (``mkstemp`` makes it private) and rename it over ``path``: a kill or a crash never leaves a
    half-written file under that name. Every file genflow writes for later use (checkpoints, exports,
    cache entries) goes through here. ``suffix``: the temporary file's ending, for writers that choose the format
    by it (``.tmp.png`` for a picture)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
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


def checksum_path(path: str | os.PathLike) -> Path:
    """The sidecar holding the sha256 of a cache entry's bytes."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _stored_entry(path: Path, load: Callable[[Path], T]) -> tuple[bool, T | None, str]:
    """(found, value, why not) for the entry at ``path``, verified against its sidecar."""
    if not path.is_file():
        return False, None, ""
    sidecar = checksum_path(path)
    try:
        expected = sidecar.read_text().split()[0] if sidecar.is_file() else ""
    except (OSError, IndexError, UnicodeDecodeError):
        expected = ""
    if not expected:
        return False, None, "it has no checksum"
    if file_sha256(path) != expected:
        return False, None, "its bytes do not match their checksum (truncated or altered)"
    try:
        return True, load(path), ""
    except Exception as err:  # the checksum matched but an older format or a bug cannot read it
        return False, None, f"it cannot be read ({type(err).__name__})"


def cached(path: str | os.PathLike, compute: Callable[[], T], *, load: Callable[[Path], T],
           save: Callable[[T, Path], None]) -> T:
    """The value stored at ``path`` if its bytes match the sha256 in its sidecar, else ``compute()`` stored
    there atomically with a fresh sidecar (one line on stderr says why an existing entry was not used)."""
    path = Path(path)
    found, value, why = _stored_entry(path, load)
    if found:
        return value
    if why:
        print(f"genflow: cache entry {path} not used, {why}; recomputing it", file=sys.stderr, flush=True)
    value = compute()
    atomic_write(path, lambda tmp: save(value, tmp))
    atomic_write(checksum_path(path), lambda tmp: tmp.write_text(f"{file_sha256(path)}  {path.name}\n"))
    return value


CHECKSUM_KEY = "genflow_tensor_sha256"


def _tensors(obj, prefix: str = ""):
    """(key path, tensor) of every tensor in nested dicts, lists and tuples, in a fixed order."""
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            if not (prefix == "" and k == CHECKSUM_KEY):
                yield from _tensors(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def tensor_checksum(obj) -> str:
    """sha256 (hex) of every tensor in ``obj`` with its key path, dtype and shape."""
    h = hashlib.sha256()
    for key, x in _tensors(obj):
        x = x.detach().cpu().contiguous()
        h.update(f"{key}|{x.dtype}|{tuple(x.shape)}|".encode())
        if x.numel():
            h.update(x.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def checksum_mismatch(ckpt: dict) -> str:
    """Why a loaded checkpoint's tensors do not match the checksum stored at save time ("" when they match or
    when it was written before checksums were stored)."""
    stored = ckpt.get(CHECKSUM_KEY) if isinstance(ckpt, dict) else None
    if stored is None:
        return ""
    if not isinstance(stored, str) or stored != tensor_checksum(ckpt):
        return "its tensors do not match the sha256 stored when it was written (the file was altered or damaged)"
    return ""


def archive_damage(path: str | os.PathLike, *, tensors: bool) -> str:
    """Why the zip records of a ``torch.save`` archive fail their CRC-32 ("" when they pass, or when the file is
    not a zip archive): the pickled structure and small records always, the tensor storages only if
    ``tensors`` (a checkpoint without ``CHECKSUM_KEY``; otherwise the sha256 covers them). torch's reader does
    not check these CRCs itself."""
    if not zipfile.is_zipfile(path):  # torch's legacy format: nothing to check
        return ""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if tensors or "/data/" not in info.filename:
                    with archive.open(info) as record:
                        while record.read(1 << 22):
                            pass
    except (zipfile.BadZipFile, OSError, EOFError) as err:  # BadZipFile: "Bad CRC-32 for file ..."
        return f"a record of the archive fails its check ({err})"
    return ""


def checkpoint_damage(ckpt, path: str | os.PathLike) -> str:
    """Why a checkpoint loaded from ``path`` fails its checks ("" when it passes): its tensors against the sha256
    stored at save time, and the archive's records against their CRC-32s (the tensor storages too when it was
    written before checksums)."""
    sealed = isinstance(ckpt, dict) and CHECKSUM_KEY in ckpt
    return checksum_mismatch(ckpt) or archive_damage(path, tensors=not sealed)


def cached_checkpoint_problem(path: str | os.PathLike) -> str:
    """Why a checkpoint kept as a cache (a conversion, a post-hoc reconstruction) must be made again: it cannot
    be read, has no checksum or fails it ("" when it is intact)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated, empty, not an archive
        return f"it cannot be read ({type(err).__name__})"
    if not isinstance(ckpt, dict) or CHECKSUM_KEY not in ckpt:
        return "it has no checksum"
    return checkpoint_damage(ckpt, path)


def save_checkpoint(ckpt: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` ``ckpt`` atomically, with the sha256 of its tensors under ``CHECKSUM_KEY``. A failed write
    (a full disk, a refused folder) leaves any file under that name as it was and raises
    ``genflow.errors.WriteFailed`` naming the file."""
    from genflow.errors import os_error

    ckpt = {**ckpt, CHECKSUM_KEY: tensor_checksum(ckpt)}
    try:
        return atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
    except (OSError, RuntimeError) as err:  # a full disk: torch's writer says "unexpected pos", errno lost
        raise (os_error(err, path) or err) from err
