"""Training progress: Lightning's Rich bar counting optimizer steps (``train 250/3000``, elapsed, ETA, it/s,
the loss per data dimension) in a terminal; one plain line every ``every_seconds`` otherwise, to stdout and
the run's train.log (``step 250/3000 | 4.1 it/s, 525 img/s | ETA 11m 05s | loss/dim 0.0412``). The rate and
ETA count from the end of the first step, which carries compilation and warm-up (``trainer.compile``)."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from pytorch_lightning.callbacks import RichProgressBar

from genflow.progress import duration, say


class TrainProgress(RichProgressBar):
    """``plain=None`` picks the plain lines when stdout is not a terminal.

    The losses are shown divided by the number of data dimensions (``loss/dim``): the methods' training
    losses sum over dimensions (EDM's convention), which makes raw values incomparable across resolutions.
    """

    def __init__(self, every_seconds: float = 30.0, log_path: str | Path | None = None, plain: bool | None = None):
        super().__init__(leave=True)
        self.every_seconds, self.log_path = float(every_seconds), log_path
        self.plain = (not sys.stdout.isatty()) if plain is None else plain
        self._start = self._last = 0.0
        self._first_end: tuple[int, float] | None = None  # (step, time) the first step ended: warm-up behind
        self._printed_step = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.plain:
            self.disable()
        super().setup(trainer, pl_module, stage)

    # --- the rich bar: steps of the whole run, not batches of an epoch -------------------------------
    @property
    def total_train_batches(self):
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return "train"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._start = self._last = time.perf_counter()
        self._first_end, self._printed_step = None, trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.plain:
            self._plain_line(trainer)
            return
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        dims = data_dims(trainer)
        for key in ("train/loss", "val/loss"):
            if key in items:
                items[key.split("/")[0] + " loss/dim"] = round(float(items.pop(key)) / dims, 5)
        return items

    # --- plain lines ------------------------------------------------------------------------------
    def _plain_line(self, trainer) -> None:
        now = time.perf_counter()
        step, total = trainer.global_step, trainer.max_steps
        # one line per optimizer step at most (with gradient accumulation a batch may end without one)
        if step == self._printed_step or not trainer.is_global_zero:
            return
        first = self._first_end is None
        if not (first or now - self._last >= self.every_seconds or step == total):
            return
        self._last, self._printed_step = now, step
        parts = [f"step {step}/{total}" if total and total > 0 else f"step {step}"]
        if first:
            # the first step carries compilation, cuDNN autotuning and data start-up: no rate or ETA from it
            self._first_end = (step, now)
            parts.append(f"first step {duration(now - self._start)} (start-up, compilation)")
        else:
            rate = (step - self._first_end[0]) / max(now - self._first_end[1], 1e-9)
            batch = getattr(trainer.datamodule, "batch_size", None)
            parts.append(f"{rate:.2f} it/s" + (f", {rate * batch * trainer.world_size:.0f} img/s" if batch else ""))
            if total and total > 0 and rate > 0:
                parts.append(f"ETA {duration((total - step) / rate)}")
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:  # one host sync per line, not per step
            parts.append(f"loss/dim {float(loss) / data_dims(trainer):.5f}")
        say(" | ".join(parts), self.log_path)


def data_dims(trainer) -> int:
    shape = getattr(trainer.datamodule, "data_shape", None)
    return math.prod(shape) if shape else 1
