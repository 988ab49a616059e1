"""What an app may write where: outputs never replace what another command wrote.

- ``holds_run(folder)``, ``check_folder_before_start(folder, resuming=...)``: a training run's folder (its
  exports, result or checkpoints) and its lock; train.py refuses a folder holding a run, or one a live
  process trains in, before Hydra starts the job and writes ``.hydra/`` there.

- ``check_record(path, ckpt)``: ``evaluate out=FILE`` replaces a file only if it is an earlier record of
  the same checkpoint's evaluation (one JSON line with that ``ckpt``); a run's ``result.json``, another
  checkpoint's record or any other file is refused.
- ``check_sample_folder(out, settings)`` / ``write_sample_manifest(out, settings, seeds)``: ``sample.py``
  records what made the images of a folder in ``samples.json``; a folder holding a training run, or images,
  ``samples.npz`` or ``grid.png`` without a manifest of the same settings (checkpoint, solver, steps, ...),
  is refused. The same command again may write there (it produces the same images) and continues: the seeds
  whose PNG is already there and decodes are not sampled again.
- ``check_writable(path, key, ...)``: a destination that cannot be written (no write permission on the folder
  or its nearest existing parent, or less free space than the job needs) is refused before the work;
  ``write_output(path, write)``: an atomic write whose disk-full or permission failure is an error naming
  the file.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from genflow.errors import config_error, free_bytes, nearest_existing

# what a run leaves in its folder (Hydra's .hydra/ and train.log are written before the job starts, so
# they do not count)
RUN_FILES = ("ema.safetensors", "config.yaml", "result.json", "grid.png")


LOCK_NAME = ".genflow.lock"



def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (so a reused pid is not taken for the lock's owner)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return start is None or _process_start(pid) in (None, start)


def check_folder_before_start(run_dir: Path, *, resuming: bool) -> None:
    """What can be refused before Hydra starts the job (and writes ``.hydra/`` and the log into the folder):
    a run already there without ``ckpt_path``, or a live process training there. ``prepare_run`` and
    ``RunFolderLock`` check the same again once the job runs (another process may have started meanwhile)."""
    if not resuming and holds_run(run_dir):
        raise holds_run_error(run_dir)
    try:
        owner = json.loads((run_dir / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return  # no lock, or one being written: RunFolderLock decides when the job starts
    refusal = lock_in_use(run_dir, owner) if isinstance(owner, dict) else None
    if refusal is not None:
        raise refusal


def lock_in_use(run_dir: Path, owner: dict):
    """The refusal of a run folder whose lock's owner (``{"pid", "host", "start", "since"}``) may still train there:
    a live process on this host, or any process on another host (a shared file system, where liveness cannot be
    checked); None when the owner no longer runs (its lock may be taken over)."""
    pid, host = owner.get("pid"), owner.get("host")
    if host == socket.gethostname() and (pid is None or not _alive(pid, owner.get("start"))):
        return None
    return config_error(
        f"{run_dir} is in use: process {pid} on {host} has trained there since {owner.get('since')}",
        "two processes training into one folder would overwrite each other's checkpoints and logs",
        f"wait for that run to end or stop it; if it no longer runs (e.g. its machine is off), remove "
        f"{run_dir / LOCK_NAME}")


def holds_run_error(run_dir: Path):
    return config_error(
        f"{run_dir} already holds a run", "training there again would overwrite its checkpoints and exports",
        "resume it with ckpt_path=last, or choose a new folder (hydra.run.dir=..., or omit it for a "
        "fresh timestamped one)")


def holds_run(run_dir: Path, *, ignore: tuple[str, ...] = ()) -> bool:
    """Whether ``run_dir`` holds what a run leaves (``RUN_FILES`` but those in ``ignore``, or a checkpoint)."""
    ckpts = run_dir / "checkpoints"
    return any((run_dir / name).exists() for name in RUN_FILES if name not in ignore) or \
        (ckpts.is_dir() and any(ckpts.glob("*.ckpt")))


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
    guide = cfg.get("guide_ckpt")  # autoguidance: the guiding checkpoint decides the images as much
    return {"ckpt": str(p), "ckpt_bytes": stat and stat.st_size, "ckpt_mtime_ns": stat and stat.st_mtime_ns,
            "guide_ckpt": None if guide is None else str(Path(str(guide)).expanduser().resolve()),
            **{k: (None if cfg.get(k) is None else str(cfg.get(k))) for k in keys}}


def check_sample_folder(out: Path, settings: dict) -> None:
    """Refuse a folder that holds a training run or samples of other settings (see the module docstring)."""
    if not out.is_dir():
        return
    if holds_run(out, ignore=("grid.png",)):  # a grid alone may be sample.py's own
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


def sample_bytes(data_shape, num: int) -> int:
    """About the disk ``num`` samples of ``data_shape`` take: a PNG per image (at most its raw bytes plus the
    format's overhead), ``samples.npz`` (the raw bytes) and the grid."""
    import math

    raw = math.prod(int(s) for s in data_shape)
    return num * (2 * raw + 1024) + min(num, 64) * raw * 16 + (1 << 20)


def write_sample_manifest(out: Path, settings: dict, seeds) -> None:
    from genflow.cache import atomic_write

    text = json.dumps({"settings": settings, "seeds": [int(s) for s in seeds]})
    atomic_write(out / MANIFEST, lambda tmp: tmp.write_text(text + "\n"))


def check_writable(path, key: str, fix: str | None = None, *, need_bytes: int = 0) -> None:
    """Refuse, before any work, a destination folder ``path`` (made later if missing) that cannot be written:
    its nearest existing folder must grant write and search permission, and hold ``need_bytes`` free."""
    existing = nearest_existing(path)
    if existing is None or not existing.is_dir():
        return  # a file on the way is check_output_dir's error
    fix = fix or f"choose a folder you can write for {key}=, or make {existing} writable"
    if not os.access(existing, os.W_OK | os.X_OK):
        raise config_error(f"{key}={path} cannot be written: {existing} is not writable by this user",
                           "the outputs would be lost at the end of the work", fix)
    free = free_bytes(existing) if need_bytes else None
    if free is not None and free < need_bytes:
        raise config_error(f"{key}={path}: {existing} has {free / 2 ** 20:.1f} MiB free, the job needs about "
                           f"{need_bytes / 2 ** 20:.1f} MiB", "the disk would fill before the outputs are written",
                           f"free space there or choose another {key}=")


def write_output(path: Path, write) -> Path:
    """``cache.atomic_write(path, write)``; a full disk or a refused write ends in an error naming ``path``
    (the file under that name is left as it was). Any writer's failure is looked at: safetensors' (Rust) names the
    errno only in its message; what ``os_error`` does not recognise is raised as it was."""
    from genflow.cache import atomic_write
    from genflow.errors import os_error

    try:
        return atomic_write(path, write)
    except Exception as err:
        raise (os_error(err, path) or err) from err


class FolderState:
    """What a folder (and every file under it) held before a command wrote anything, to put it back when the
    command is refused after it has begun writing (Hydra writes ``.hydra/`` and the log before train.py's job
    runs; a check that needs the built network comes after). ``restore(within)`` removes what is new under
    ``within`` (never anything that was there), writes back the bytes of small files that changed, cuts a grown
    log back to its length, and sets their modification times back; ``remove_made_folders()`` then removes the
    folders this command made, only where they are empty (never another process's files). ``within``: a part of
    the recorded folder (one job's folder of a sweep)."""

    SMALL = 64 << 10     # files up to this size are kept whole (Hydra's .hydra/*.yaml, a sweep's multirun.yaml)
    BUDGET = 16 << 20    # at most this much kept in memory

    def __init__(self, root):
        self.root = Path(str(root)).expanduser().absolute()
        self.made = [q for q in (self.root, *self.root.parents) if not q.exists()]  # folders a write would make
        self.entries: dict[Path, tuple] = {}   # path -> (is_dir, size, atime_ns, mtime_ns)
        self.saved: dict[Path, bytes] = {}
        if not self.root.is_dir():
            return
        budget = self.BUDGET
        for path in [self.root, *self.root.rglob("*")]:
            try:
                st = path.lstat()
            except OSError:
                continue
            is_dir = path.is_dir() and not path.is_symlink()
            self.entries[path] = (is_dir, st.st_size, st.st_atime_ns, st.st_mtime_ns)
            if not is_dir and path.is_file() and not path.is_symlink() and st.st_size <= min(self.SMALL, budget):
                try:
                    self.saved[path] = path.read_bytes()
                    budget -= st.st_size
                except OSError:
                    pass

    def restore(self, within=None, *, keep=(LOCK_NAME,)) -> None:
        within = self.root if within is None else Path(str(within)).expanduser().absolute()
        if not within.is_dir():
            return
        new = [p for p in within.rglob("*") if p not in self.entries and p.name not in keep]
        for path in sorted(new, key=lambda p: len(p.parts), reverse=True):  # files before their folders
            try:
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()  # emptied just before (its files are deeper, so removed first)
                else:
                    path.unlink()
            except OSError:
                pass
        for path, (is_dir, size, atime, mtime) in self.entries.items():
            if is_dir or not (path == within or within in path.parents):
                continue
            try:
                st = path.stat()
                if (st.st_size, st.st_mtime_ns) == (size, mtime):
                    continue
                if path in self.saved:
                    path.write_bytes(self.saved[path])
                elif st.st_size > size:  # a log appended to
                    os.truncate(path, size)
                else:
                    continue
                os.utime(path, ns=(atime, mtime))
            except OSError:
                pass

    def put_back_unchanged(self, written: "FolderState", within=None) -> None:
        """Where another process holds the folder (a run that started at the same moment): only the small files
        that still hold what this command wrote (``written``: the folder as this command found it once Hydra had
        written) get their earlier bytes back; nothing is removed, another process's writes are kept."""
        within = self.root if within is None else Path(str(within)).expanduser().absolute()
        for path, mine in written.saved.items():
            earlier = self.saved.get(path)
            if earlier is None or earlier == mine or not (path == within or within in path.parents):
                continue
            try:
                if path.read_bytes() == mine:
                    path.write_bytes(earlier)
                    os.utime(path, ns=self.entries[path][2:])
            except OSError:
                pass

    def remove_made_folders(self, within=None) -> None:
        """After ``restore`` (and once the lock file is gone): the folders from ``within`` up that did not exist
        before, each only if empty, then the modification times of the folders that did."""
        within = self.root if within is None else Path(str(within)).expanduser().absolute()
        for folder in (within, *within.parents):
            inside = folder == self.root or self.root in folder.parents
            if (folder in self.entries) or (not inside and folder not in self.made):
                break  # it was there before
            try:
                folder.rmdir()
            except OSError:
                break
        for path, (is_dir, size, atime, mtime) in self.entries.items():
            if is_dir and (path == within or within in path.parents) and path.is_dir():
                try:
                    os.utime(path, ns=(atime, mtime))
                except OSError:
                    pass
