"""An FID evaluation kept as it goes, so that a stopped one continues where it stopped.

``PartialFID(path, settings)`` holds the progress of ``evaluate_fid`` in one file: the scores of the seed sets
already finished and, for the set being generated, how many batches are done with the float64 feature sums
(count, sum f, sum f f^T) and the kept raw features after them. Sums restored from the file are the very
numbers the uninterrupted loop held at that batch, and the batches after it are added in the same order, so a
continued evaluation ends with the same statistics, bit for bit, as one that never stopped (the generated
images being the same: same seeds, same batch size, same machine).

The file is written through ``genflow.cache.save_checkpoint``: atomically (a stop while writing keeps the
previous one) and with the sha256 of its tensors, verified on read together with the CRC-32 of its other
records. It holds the settings it belongs to; a file of other settings is refused (error / why / fix), a
damaged one is not used (one line says so) and the evaluation starts over. It is written every ``every_s``
seconds of generation, after every seed set, and when a stop was asked for (``request_stop``: the caller's
signal handler; the loop stops after the batch in progress, so the sums are never taken half-updated), and
removed once the evaluation is complete.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from genflow.errors import config_error


class PartialFID:
    """The kept progress of one FID evaluation at ``path``, for the evaluation described by ``settings`` (JSON
    values: what decides its numbers); ``command`` is named in the refusal of another command's file."""

    def __init__(self, path, settings: dict, *, every_s: float = 30.0, command: str | None = None):
        self.path, self.every_s, self.command = Path(path), float(every_s), command
        self.settings = json.loads(json.dumps(settings))  # plain JSON values, compared as such
        self.stop_signal: int | None = None
        self.sets: list[dict] = []       # the scored results of the finished seed sets
        self.counts: dict = {}           # the generator's image and network-evaluation counts
        self.current: dict | None = None  # the set in progress: its index, batches done, feature sums
        self.images_kept = 0
        self.saved = (0, 0)               # (seed sets, images of the next set) in the file
        self.deferring = False            # a stop waits for the batch in progress (see ``stop_or_defer``)
        self._saved_at = time.monotonic()

    # --- reading -------------------------------------------------------------------------------------
    def load(self, *, say: bool = True) -> "PartialFID":
        """Take up the progress stored at ``path`` (nothing there: start from the beginning). ``say``: print the
        line about a damaged file (once: the checks before the work load it too)."""
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # a write cut short by a kill
            stale.unlink(missing_ok=True)
        if not self.path.is_file():
            return self
        state, why = self._read()
        if state is None:
            if say:
                print(f"genflow: {self.path} not used, {why}; starting the evaluation over", file=sys.stderr,
                      flush=True)
            return self
        recorded = json.loads(state["settings"])
        if recorded != self.settings:
            differ = sorted(k for k in set(recorded) | set(self.settings) if recorded.get(k) != self.settings.get(k))
            shown = ", ".join(f"{k}={recorded.get(k)}" for k in differ)
            before = json.loads(state.get("command", "null"))
            if before == self.command:  # the same command: the checkpoint it scored was replaced since
                before = None
            raise config_error(
                f"{self.path} holds a stopped evaluation of other settings ({shown})",
                "continuing it with these settings would mix images of two evaluations in one score",
                (f"finish it with its own command ({before}), or " if before else "") +
                f"delete {self.path} to start this evaluation, or write it elsewhere (out=)")
        self.sets, self.counts = json.loads(state["sets"]), json.loads(state["counts"])
        if "set" in state:
            self.current = {key: state[key] for key in ("set", "batches", "count", "feature_sum", "outer_sum", "kept")
                            if key in state}
            self.images_kept = int(state["count"].item())
        self.saved = (len(self.sets), self.images_kept)
        return self

    def _read(self) -> tuple[dict | None, str]:
        from genflow.cache import archive_damage, checksum_mismatch

        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated, empty, not an archive
            return None, f"it cannot be read ({type(err).__name__})"
        if not isinstance(state, dict) or "settings" not in state:
            return None, "it is not a partial FID evaluation"
        why = checksum_mismatch(state) or archive_damage(self.path, tensors=False)
        return (None, why) if why else (state, "")

    def resume(self, seed_set: int, stats) -> int:
        """Restore the sums of ``seed_set`` into ``stats`` (a ``FeatureStats``); the number of batches done.
        From here to the end of the set, a stop waits for the batch in progress."""
        self.deferring = True
        cur = self.current
        if cur is None or int(cur["set"]) != seed_set:
            return 0
        stats.load_sums(cur["count"], cur.get("feature_sum"), cur.get("outer_sum"), cur.get("kept"))
        return int(cur["batches"])

    # --- writing -------------------------------------------------------------------------------------
    def stop_or_defer(self, signum: int) -> bool:
        """For a signal handler: while a seed set is generated, ask the loop to stop after the batch in progress
        (True; it writes the file first); elsewhere the caller stops at once (False: the file holds the last
        write)."""
        if self.deferring:
            self.stop_signal = signum
        return self.deferring

    def after_batch(self, seed_set: int, batches: int, images: int, stats) -> None:
        """Called by the generation loop once a batch is in ``stats`` (``images`` in all, this set): write when
        due; stop when asked to."""
        self.current, self.images_kept = {"set": seed_set, "batches": batches, "stats": stats}, images
        if self.stop_signal is not None or time.monotonic() - self._saved_at >= self.every_s:
            self.save()
        if self.stop_signal is not None:
            raise KeyboardInterrupt(self.stop_signal)

    def after_set(self, scored: dict, images: int) -> None:
        self.sets.append({**scored, "images": images})
        self.current, self.images_kept, self.deferring = None, 0, False
        self.save()

    def save(self) -> None:
        from genflow.cache import save_checkpoint

        state = {"settings": json.dumps(self.settings), "command": json.dumps(self.command),
                 "sets": json.dumps(self.sets), "counts": json.dumps({k: float(v) for k, v in self.counts.items()})}
        cur = self.current
        if cur is not None:
            sums = cur["stats"].sums() if "stats" in cur else {k: cur[k] for k in cur if k not in ("set", "batches")}
            state.update(set=int(cur["set"]), batches=int(cur["batches"]),
                         **{k: v.detach().cpu() for k, v in sums.items() if v is not None})
        save_checkpoint(state, self.path)  # a full disk: WriteFailed naming the file, the last write kept
        self._saved_at = time.monotonic()
        self.saved = (len(self.sets), self.images_kept)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def kept_line(self, total_sets: int, num: int) -> str:
        """What a stop keeps (what the file holds), in a few words."""
        done, images = self.saved
        if not self.path.is_file() or (done, images) == (0, 0):
            return "no images were kept yet"
        if done == total_sets:
            return f"the {done} finished seed set(s) are kept in {self.path}"
        where = f"{images} of {num} images of seed set {done + 1} of {total_sets}" if total_sets > 1 \
            else f"{images} of {num} images"
        if done:
            where = f"{done} finished seed set(s) and {where}"
        return f"{where} are kept in {self.path}"


def estimated_bytes(dim: int, kept: int) -> int:
    """The size of a partial file: the float64 sums of ``dim``-d features and ``kept`` float32 raw features."""
    return 8 * (dim * dim + dim + 1) + 4 * kept * dim + (1 << 16)
