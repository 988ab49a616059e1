"""Resume that keeps everything: a checkpoint on Ctrl-C / SIGTERM, every few minutes and at the last step,
and a CSV log that a resumed run appends to instead of deleting."""
from __future__ import annotations

import csv
import signal
import sys
import threading
import time
from pathlib import Path

from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (periodic ``step_*.ckpt``, the newest ``save_top_k`` kept with
    ``monitor="step"``, ``last.ckpt``) that also writes ``last.ckpt``

    * at the end of the step during which SIGINT or SIGTERM arrived, then stops training (a second signal
      stops at once, without a checkpoint): ``stopped_by`` holds the signal;
    * every ``every_minutes`` of wall-clock time, so ``ckpt_path=last`` always continues from a recent state;
    * at the end of the last step (``max_steps`` reached or ``trainer.should_stop`` set, e.g. by ``max_time``).

    Every save happens at the end of a step, where Lightning's own periodic checkpoints are taken, so a
    resumed run continues exactly (data position, RNG, EMA, optimizer). Nothing is saved in ``on_train_end``:
    by then the EMA callback has copied the averaged weights into the model, and a checkpoint taken there
    would store them as the raw weights.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, *args, every_minutes: float | None = None, **kwargs):
        kwargs.setdefault("enable_version_counter", False)  # a resumed run overwrites its own last.ckpt
        super().__init__(*args, **kwargs)
        self.every_s = float(every_minutes) * 60 if every_minutes else None
        self.stopped_by: int | None = None
        self._previous: dict = {}
        self._last_save = time.monotonic()

    @property
    def last_path(self) -> Path:
        return Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def _on_signal(self, signum, frame) -> None:
        if self.stopped_by is not None:  # the second one: stop now, with the shell's exit status for it
            self._restore()
            print(f"{signal.Signals(signum).name} again: stopped at once, without saving this step; ckpt_path=last "
                  "continues from the newest checkpoint", file=sys.stderr, flush=True)
            # not KeyboardInterrupt: Lightning turns that into exit status 1 without a word
            raise SystemExit(128 + int(signum))
        self.stopped_by = signum
        print(f"\n{signal.Signals(signum).name}: saving {self.last_path} at the end of this step, then stopping "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.stopped_by, self._last_save = None, time.monotonic()
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._on_signal)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stop = self.stopped_by is not None
        due = self.every_s is not None and time.monotonic() - self._last_save >= self.every_s
        if trainer.world_size > 1 and not trainer.global_step % 10:
            # ranks agree every 10 steps (one tiny all-reduce), never every step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
            due = trainer.strategy.reduce_boolean_decision(due, all=False)
        elif trainer.world_size > 1:
            stop = due = False
        # the last step: max_steps reached, or another callback (e.g. the trainer.max_time Timer, which runs
        # before checkpoint callbacks) ended training
        final = 0 < trainer.max_steps <= trainer.global_step or trainer.should_stop
        if (stop or due or final) and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if stop or due:
            self._last_save = time.monotonic()
        if stop:
            self.stopped_by = self.stopped_by or signal.SIGTERM
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()
        super().on_exception(trainer, pl_module, exception)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one keeps it and appends. Rows logged
    after the checkpoint a run resumes from (work lost by the interruption) are dropped at the first save, so
    every step appears once."""

    def _check_log_dir_exists(self) -> None:
        self._first_save = True
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def save(self) -> None:
        if self._first_save and self.metrics:
            self._first_save = False
            if self._fs.isfile(self.metrics_file_path):
                self._drop_rows_from(min(int(m["step"]) for m in self.metrics))
        super().save()

    def _drop_rows_from(self, step: int) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if r.get("step") in (None, "") or int(float(r["step"])) < step]
        if len(kept) < len(rows):
            with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)


class HistoryCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives a resume (appended to, never deleted)."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
