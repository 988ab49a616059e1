"""Run folders: which checkpoint a run starts from, what it refuses to overwrite, and how it describes itself.

``prepare_run`` is called before anything is built. It

* refuses to train into a folder that already holds a run unless ``ckpt_path`` resumes it,
* resolves ``ckpt_path=last`` to the newest *valid* full checkpoint of the folder (say which, skip broken ones),
* checks that a resume matches the run's recorded model, net and data (an explicit differing override is
  refused; a default that differs is replaced by the recorded value),
* turns the resume of a finished run into a no-op,
* removes hidden temporary files that an interrupted atomic write left behind.

``RunFolderLock`` keeps a second process from training into a folder while one does.

``describe`` is the one place that says which settings distinguish runs: the JSON line, TensorBoard's
hyperparameters, the sweep summary and the settings lines printed at the start all read it.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from genflow.config import (check_resume, declared_knobs, explicit_sections, newest_valid, read_checkpoint,
                            read_resumable)
from genflow.errors import config_error
from genflow.outputs import LOCK_NAME, FolderState, _process_start, holds_run, holds_run_error, lock_in_use
from genflow.results.records import config_names


@dataclass
class Start:
    """How a run starts: from scratch, from a checkpoint, or not at all (a finished run)."""

    ckpt_path: str | None = None
    step: int = 0
    finished: dict | None = None    # the finished run's result when resuming it is a no-op
    complete: bool = False          # trained to the end, outputs missing: make them from the final weights
    final_weights: str | None = None  # where they are: final.ckpt, or the last checkpoint's (EMA) state_dict
    notes: list[str] = field(default_factory=list)


def primary_process() -> bool:
    """Whether this process is rank 0 of its job (Lightning's DDP children, torchrun and SLURM set these)."""
    return all(os.environ.get(key, "0") == "0" for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


class RunFolderLock:
    """One training process per run folder. ``.genflow.lock`` names its owner (pid, host, start); a lock whose
    owner no longer runs on this host (kill -9, a crash) is taken over, while a live owner, or one on another
    host (a shared file system, where liveness cannot be checked), makes the run refuse to start. Only the
    job's rank-0 process takes it; it is removed when training ends, however it ends."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path = run_dir, run_dir / LOCK_NAME
        self.held, self.made_folder, self.notes = False, False, []

    def __enter__(self) -> "RunFolderLock":
        if not primary_process():
            return self
        self.made_folder = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self

    def _take_over_or_refuse(self) -> None:
        written = time.time()
        try:
            written = self.path.stat().st_mtime
            owner = json.loads(self.path.read_text())
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError):  # being written right now, or half-written by an owner that died at once
            if time.time() - written < 10:
                raise config_error(f"{self.run_dir} is in use: another process is starting a run there",
                                   "two processes training into one folder would overwrite each other's "
                                   "checkpoints and logs", "wait for that run, or choose another folder") from None
            owner = {"pid": None, "host": socket.gethostname()}
        if not isinstance(owner, dict):  # not a lock genflow wrote: no owner to wait for
            owner = {"pid": None, "host": socket.gethostname()}
        refusal = lock_in_use(self.run_dir, owner)
        if refusal is not None:
            raise refusal
        self.path.unlink(missing_ok=True)
        self.notes.append(f"took over the lock of process {owner.get('pid')}, which no longer runs")

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            if self.made_folder and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()  # a run refused before it wrote anything leaves no empty folder


#: the temporary files of ``genflow.cache.atomic_write``: ``.<name>.<8 random characters>.tmp[.<ending>]``
ATOMIC_TEMP = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?")


def remove_stale_temps(run_dir: Path) -> list[Path]:
    """Hidden temporary files of the atomic writer (checkpoints, exports, grid, result) whose process died
    before the rename."""
    stale = []
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "posthoc"):
        if folder.is_dir():
            for path in folder.glob(".*"):
                name = path.name
                if path.is_file() and (ATOMIC_TEMP.fullmatch(name) or any(f".{kind}." in name for kind in
                                                                           ("ckpt", "safetensors", "pt"))):
                    path.unlink(missing_ok=True)
                    stale.append(path)
    return stale


def job_overrides() -> list[str] | None:
    """The command line's overrides of the running Hydra job; None when unknown (not a Hydra job)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def continue_command(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> str:
    """The command that continues a stopped run as it was started: its own overrides (trainer.max_steps, the
    optimizer, ...), then ``ckpt_path=last`` and its folder. Outside a Hydra job the overrides are unknown, so
    the one setting a resume would otherwise lose, ``trainer.max_steps``, is written out."""
    import shlex

    overrides = job_overrides() if overrides is None else overrides
    own = ("ckpt_path", "hydra.run.dir", "run_dir")
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in own] if overrides is not None \
        else [f"trainer.max_steps={cfg.trainer.max_steps}"]
    return " ".join(["python train.py", *map(shlex.quote, kept), "ckpt_path=last", shlex.quote(f"hydra.run.dir={run_dir}")])


def forget_choices(sections) -> None:
    """The Hydra group choices of ``sections`` no longer name what runs (the recorded config replaced them):
    drop them so ``describe`` names the recorded sections' config files."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    if HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
        with read_write(choices), open_dict(choices):
            for section in sections:
                choices[section] = None


def match_recorded(cfg: DictConfig, recorded: dict, path: Path) -> list[str]:
    """Make ``cfg`` continue the recorded run (``config.check_resume``: explicit changes to model/net/data are
    refused, the recorded values replace defaults). Returns notes on what was adopted."""
    overrides = job_overrides()
    knobs = declared_knobs(cfg)
    adopted = check_resume(cfg, recorded, path, explicit_sections(overrides, knobs) if overrides is not None else None)
    if not adopted:
        return []
    for key in knobs:
        if recorded.get(key) is not None:
            with open_dict(cfg):
                cfg[key] = recorded[key]
    for section in adopted:
        cfg[section] = OmegaConf.create(recorded[section])
    forget_choices(adopted)
    return [f"resuming with the run's recorded {', '.join(adopted)}"]


def prepare_run(cfg: DictConfig, run_dir: Path, resume: tuple | None = None) -> Start:
    """Decide how the run in ``run_dir`` starts, refusing anything that would overwrite a run. ``resume``: the
    (path, checkpoint) that validation read for ``ckpt_path`` already (read here otherwise)."""
    start = Start()
    stale = remove_stale_temps(run_dir)
    if stale:
        start.notes.append(f"removed {len(stale)} stale temporary file(s) of an interrupted write")
    requested = cfg.get("ckpt_path")
    if requested is None:
        if holds_run(run_dir):
            raise holds_run_error(run_dir)
        return start
    if str(requested) == "last" and resume is not None and Path(str(resume[0])).parent.parent == run_dir:
        path, ckpt = Path(str(resume[0])), resume[1]
        start.notes.append(f"resuming from {path} (step {ckpt.get('global_step', 0)})")
    elif str(requested) == "last":
        path, ckpt, skipped = newest_valid(run_dir, mmap=True)
        start.notes += skipped
        start.notes.append(f"resuming from {path} (step {ckpt.get('global_step', 0)})")
    else:
        path = Path(str(requested)).expanduser()
        ckpt = resume[1] if resume is not None else read_resumable(path, mmap=True)
        inside = path.resolve().parent == (run_dir / "checkpoints").resolve()
        if holds_run(run_dir) and not inside:
            raise config_error(f"{run_dir} already holds a run, and ckpt_path={path} belongs to another folder",
                               "the resumed run would overwrite the run in this folder",
                               f"resume in the checkpoint's own folder (hydra.run.dir={path.parent.parent}), or "
                               "choose an empty folder")
        start.notes.append(f"resuming from {path} (step {ckpt.get('global_step', 0)})")
    start.notes += match_recorded(cfg, ckpt["hyper_parameters"]["config"], path)
    start.ckpt_path, start.step = str(path), int(ckpt.get("global_step", 0))
    max_steps = int(cfg.trainer.get("max_steps", -1))
    final = run_dir / "checkpoints" / "final.ckpt"
    grid = (cfg.get("callbacks") or {}).get("sample_grid") is not None  # ~callbacks.sample_grid: no grid.png
    missing = [name for name in ("ema.safetensors", "config.yaml", "grid.png", "result.json")
               if not (run_dir / name).is_file() and (grid or name != "grid.png")]
    trained = 0 <= max_steps <= start.step
    if trained and (missing or not final.is_file()):
        if final.is_file():
            read_checkpoint(final, key="final.ckpt", mmap=True)  # the outputs are made from it: verified first
            start.final_weights = str(final)
        else:  # stopped while writing final.ckpt: the EMA weights are also the state_dict of the last checkpoint
            missing.insert(0, final.name)
            start.final_weights = str(path)
        # stopped after training, while writing its outputs: fit restores the state and ends at once,
        # then what is missing of final.ckpt, the grid, the exports, the final metrics and result.json is made
        start.notes.append(f"the run trained to step {start.step} but {', '.join(missing)} "
                           f"{'is' if len(missing) == 1 else 'are'} missing (stopped while writing them): making them")
        start.complete = True
    elif final.is_file() and 0 <= max_steps <= start.step:
        previous = run_dir / "result.json"
        result = json.loads(previous.read_text()) if previous.is_file() else {"run_dir": str(run_dir)}
        result.update(already_finished=True, steps=start.step, steps_this_session=0)
        start.finished = result
        start.notes.append(f"the run already finished at step {start.step} (max_steps={max_steps}): nothing to do, "
                           f"{final.name} and ema.safetensors are kept; raise trainer.max_steps to train further")
    return start


# --- what distinguishes runs ------------------------------------------------------------------------
def hydra_choices() -> dict:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if v is not None and not k.startswith("hydra")}


def describe(cfg: DictConfig, method=None, choices: dict | None = None) -> dict:
    """The settings that tell runs apart: model and its key parameters (``Method.describe()``: D, path, T,
    ...), net, data, precision, steps, seed. Model, net and data by config name (``genflow.results.records``):
    a fresh run and the same run resumed say the same names."""
    names = config_names(cfg, hydra_choices() if choices is None else choices)
    out = {"model": names.get("model", "?")}
    if method is not None:
        out.update({k: v for k, v in method.describe().items() if k != "method"})
    for name, knob in declared_knobs(cfg).items():  # a knob of the net (or one the method does not describe)
        if name not in out:
            value = cfg.get(name)
            out[name] = knob.default if value is None else value
    out["net"] = names.get("net", "?")
    out["data"] = names.get("data", "?")
    data = cfg.get("data") or {}
    if data.get("resolution") is not None:
        out["resolution"] = data.resolution
    trainer = cfg.get("trainer") or {}
    out.update(precision=str(trainer.get("precision", "32-true")), max_steps=trainer.get("max_steps"),
               batch=data.get("batch_size"), lr=(cfg.get("optim") or {}).get("lr"), seed=cfg.get("seed"))
    return out


def write_result(run_dir: Path, result: dict) -> None:
    from genflow.cache import atomic_write

    atomic_write(run_dir / "result.json", lambda tmp: tmp.write_text(json.dumps(result) + "\n"))


# --- the end of a multirun ----------------------------------------------------------------------------
SUMMARY_COLUMNS = ("run", "model", "net", "data", "steps", "train/loss", "val/loss", "fid", "nll_bpd",
                   "train_img_per_s", "wall_s")


def method_settings(row: dict) -> dict:
    """The settings of the model in a ``describe`` dict (or a result.json row): what the method describes and
    the knobs, which ``describe`` writes right after the model's name."""
    keys = list(row)
    if "model" not in keys:
        return {}
    settings = {}
    for key in keys[keys.index("model") + 1:]:
        if key in SUMMARY_COLUMNS or key in ("resolution", "precision", "max_steps", "batch", "lr", "seed"):
            break
        settings[key] = row[key]
    return settings


def summarize(sweep_dir: Path) -> tuple[str, list[dict]]:
    """A markdown table and the rows of every run's result.json under ``sweep_dir``."""
    rows = []
    found = [(str(p.parent.relative_to(sweep_dir)), p) for p in sweep_dir.rglob("result.json")]
    for name, path in sorted(found, key=lambda item: (int(item[0].split("_", 1)[0]) if item[0].split("_", 1)[0].isdigit()
                                                      else 1 << 30, item[0])):
        result = json.loads(path.read_text())
        result["run"] = name
        rows.append(result)
    settings = list(dict.fromkeys(k for r in rows for k in method_settings(r)))
    columns = [c for c in (*SUMMARY_COLUMNS[:2], *settings, *SUMMARY_COLUMNS[2:]) if any(c in r for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n", rows


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - Hydra < 1.1
    _HydraCallback = object


#: the state of each run or sweep folder before Hydra wrote into it (``RecordFolders``), by absolute path
FOLDERS_BEFORE: dict[Path, FolderState] = {}


class RecordFolders(_HydraCallback):
    """Hydra callback: record the run folder (a sweep's folder) before Hydra writes ``.hydra/`` and the log there,
    so a run refused once its job has begun leaves the folder as it was (``folder_before``)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._record(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._record(config.hydra.sweep.dir)

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        FOLDERS_BEFORE.clear()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        FOLDERS_BEFORE.clear()

    @staticmethod
    def _record(folder) -> None:
        FOLDERS_BEFORE.clear()  # one Hydra run at a time: nothing older is what its folder held
        if primary_process():
            state = FolderState(str(folder))
            FOLDERS_BEFORE[state.root] = state


def folder_before(run_dir: Path):
    """What ``run_dir`` held before this command: as ``RecordFolders`` found it before Hydra wrote (the run's
    folder, or the sweep's that holds it), else as it is now (a run started from Python: nothing written yet)."""
    here = Path(str(run_dir)).expanduser().absolute()
    for root in (here, *here.parents):
        if root in FOLDERS_BEFORE:
            return FOLDERS_BEFORE.pop(root) if root == here else FOLDERS_BEFORE[root]
    return FolderState(here)


class SweepSummary(_HydraCallback):
    """Hydra callback: at the end of ``train.py -m ...`` write ``summary.md`` and ``summary.json`` in the sweep
    folder (one row per run, read from each run's result.json) and print the table."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        table, rows = summarize(sweep_dir)
        (sweep_dir / "summary.md").write_text(table)
        (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
        print(f"\nsweep of {len(rows)} runs ({sweep_dir}/summary.md):\n{table}", flush=True)
