"""The leaderboard's history: one JSON line per entry per run, only ever appended (docs/RECORDS.md).

A record holds what was run (suite, entry, commit, date, device) with which settings (precision, solver,
NFE, steps, images per seed set, seed sets, extractor, reference) and what came out (FID per seed set,
their mean and standard deviation, the reported FID = the minimum over sets as in EDM, the paper's figure,
wall time). ``settings_key`` says which records measure the same thing: the gate and the page compare
only those.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

from genflow.errors import config_error
from genflow.results.records import check_record

SCHEMA = 1
# the keys a record must have, with their JSON types; read_history checks every line against them
REQUIRED = {"schema": int, "suite": str, "entry": str, "commit": str, "date": str, "device": str,
            "precision": str, "solver": str, "nfe": (int, float), "images": int, "seed_sets": int,
            "fid_sets": list, "fid": (int, float), "fid_mean": (int, float), "wall_s": (int, float)}
# what must agree for two records to measure the same thing (the model may differ: that is what is compared)
SETTINGS = ("suite", "entry", "precision", "solver", "S_churn", "S_tmin", "S_tmax", "S_noise", "nfe", "images",
            "seed_sets", "extractor", "ref")


def seed_set_summary(fid_sets: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1) of the per-seed-set FIDs; one set has no spread."""
    n = len(fid_sets)
    mean = sum(fid_sets) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in fid_sets) / (n - 1))


def settings_key(record: dict) -> tuple:
    return tuple(record.get(k) for k in SETTINGS)


def _check(record: dict, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where} is not a JSON object")
    for key, kind in REQUIRED.items():
        if key not in record:
            raise ValueError(f"{where} has no {key!r}")
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"{where}: {key}={value!r} is not {getattr(kind, '__name__', 'a number')}")
    if record["schema"] != SCHEMA:
        raise ValueError(f"{where} has schema {record['schema']}, this genflow reads schema {SCHEMA}")
    if len(record["fid_sets"]) != record["seed_sets"] or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in record["fid_sets"]):
        raise ValueError(f"{where}: fid_sets must hold one number per seed set")
    check_record(record)
    return record


def read_history(path: str | Path) -> list[dict]:
    """Every record of a history file, checked; a missing file is an empty history. A line that is not
    complete JSON (a write cut off by a crash; the next append starts a new line after it) is skipped with
    a note naming it; a complete line that is not a record of this schema is an error naming it."""
    import sys

    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            print(f"note: {path} line {number} is not complete JSON (a write cut off); it is ignored",
                  file=sys.stderr)
            continue
        try:
            records.append(_check(value, f"line {number}"))
        except ValueError as err:
            raise config_error(f"history {path}: {err}",
                               "the history is the record the regression gate compares against; a line that "
                               "does not read as a record would silently drop an entry's past",
                               f"fix or remove that line of {path} (it is never rewritten by genflow), or use "
                               "history=ANOTHER_FILE") from None
    return records


def append_records(path: str | Path, records: Iterable[dict]) -> Path:
    """Append records as JSON lines in one write under an exclusive lock, then fsync: concurrent runs
    never interleave, a crash leaves at most one incomplete line (which ``read_history`` skips; the next
    append starts on a new line after it). Nothing already in the file is touched."""
    records = [check_record(r) for r in records]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    data = b"\n" + data  # start after a torn line, never glued to it
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def last_matching(history: Sequence[dict], record: dict) -> dict | None:
    """The newest earlier record with the same settings (``SETTINGS``), or None."""
    key = settings_key(record)
    for past in reversed(history):
        if settings_key(past) == key:
            return past
    return None
