"""Destinations that cannot be written are refused before the work; a full disk is an error naming the file;
``sample.py`` writes as it goes and a re-run of the same command continues where it stopped.

Tests run as root in CI, where permission bits do not stop a write: an unwritable folder is simulated by
``os.access`` answering no for it (the check asks exactly that), a full disk by a writer raising ENOSPC.
"""
import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from genflow.errors import GenflowError


@pytest.fixture
def read_only(monkeypatch, tmp_path):
    """A folder that ``os.access`` reports as not writable (what a chmod 555 folder is for a normal user)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    real = os.access

    def access(path, mode, *args, **kwargs):
        p = Path(path).resolve()
        if mode & os.W_OK and (p == folder.resolve() or folder.resolve() in p.parents):
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    return folder


def files_of(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(result, *words):
    code, _, err = result
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def test_unwritable_outputs_are_refused_before_any_work(cli, trained_ckpt, read_only, monkeypatch):
    import genflow.config

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the destination was checked")

    monkeypatch.setattr(genflow.config, "module_from_checkpoint", no_loading)
    refused(cli("sample.py", f"ckpt={trained_ckpt}", "num=2", "steps=2", f"out={read_only / 'samples'}"),
            "cannot be written", str(read_only))
    refused(cli("genflow.apps.evaluate", f"ckpt={trained_ckpt}", "fid.num=4", f"out={read_only / 'fid.json'}"),
            "out=", "cannot be written")
    monkeypatch.setenv("GENFLOW_METRICS_HOME", str(read_only / "metrics"))
    refused(cli("genflow.apps.evaluate", f"ckpt={trained_ckpt}", "fid.num=4"), "GENFLOW_METRICS_HOME")
    monkeypatch.delenv("GENFLOW_METRICS_HOME")
    monkeypatch.setenv("HOME", str(read_only))  # the default metrics home is ~/.cache/genflow
    refused(cli("genflow.apps.evaluate", f"ckpt={trained_ckpt}", "fid.num=4"), "GENFLOW_METRICS_HOME",
            str(read_only / ".cache"))
    monkeypatch.undo()
    assert files_of(read_only) == {}


def test_read_only_run_folder_is_refused_before_hydra_writes(cli, read_only):
    run = read_only / "run"
    refused(cli("train.py", "data=digits", "net=unet_tiny", "trainer.max_steps=1", f"hydra.run.dir={run}"),
            "hydra.run.dir=", "cannot be written")
    assert not run.exists() and files_of(read_only) == {}


def test_training_refuses_unwritable_caches_before_the_run(cli, read_only, tmp_path, monkeypatch):
    """A method that caches a data-derived estimate (SPD's spectrum) needs GENFLOW_CACHE, and a run with a final
    FID needs GENFLOW_METRICS_HOME: both refused before any work, nothing written."""
    run = tmp_path / "run"
    monkeypatch.setenv("GENFLOW_CACHE", str(read_only / "cache"))
    refused(cli("train.py", "model=spd", "data=digits", "trainer.max_steps=1", f"hydra.run.dir={run}"),
            "GENFLOW_CACHE", "cannot be written")
    monkeypatch.setenv("GENFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GENFLOW_METRICS_HOME", str(read_only / "metrics"))
    refused(cli("train.py", "data=digits", "net=unet_tiny", "trainer.max_steps=1", "fid.num=8",
                f"hydra.run.dir={run}"), "GENFLOW_METRICS_HOME", "cannot be written")
    assert not run.exists() and files_of(read_only) == {}


def test_too_little_free_space_is_refused(tmp_path, monkeypatch):
    import shutil

    from genflow.outputs import check_writable

    check_writable(tmp_path / "new" / "folder", "out", need_bytes=1)  # a folder to be made: its parent counts
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 90, 10))
    with pytest.raises(GenflowError, match="needs about"):
        check_writable(tmp_path / "new", "out", need_bytes=11)
    check_writable(tmp_path / "new", "out", need_bytes=10)


def test_disk_full_while_writing_is_an_error_naming_the_file(cli, trained_ckpt, tmp_path, monkeypatch):
    import torchvision

    from genflow.outputs import write_output

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torchvision.io, "write_png", full)
    out = tmp_path / "samples"
    refused(cli("sample.py", f"ckpt={trained_ckpt}", "seeds=0-2", "steps=2", f"out={out}", "progress=false"),
            f"could not write {out / '000000.png'}", "disk is full", "run the same command again")
    assert sorted(p.name for p in out.iterdir()) == ["samples.json"]  # no half-written file
    target = tmp_path / "record.json"
    target.write_text("old\n")
    with pytest.raises(GenflowError, match="could not write .*record.json"):
        write_output(target, full)
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir() if p.is_file()] == ["record.json"]


def test_sample_continues_where_it_stopped(cli, trained_ckpt, tmp_path, monkeypatch):
    import genflow.sampling

    args = ["seeds=0-5", "batch=2", "steps=2", "progress=false"]
    whole = tmp_path / "whole"
    code, stdout, err = cli("sample.py", f"ckpt={trained_ckpt}", *args, f"out={whole}")
    assert code == 0, err
    assert json.loads(stdout.splitlines()[-1])["sampled"] == 6

    real, asked = genflow.sampling.generate, []

    def stopped_after_one_batch(*a, on_batch=None, **kw):
        def once(seeds, x):
            on_batch(seeds, x)
            raise KeyboardInterrupt  # Ctrl-C right after the first batch was written

        return real(*a, on_batch=once, **kw)

    monkeypatch.setattr(genflow.sampling, "generate", stopped_after_one_batch)
    out = tmp_path / "continued"
    code, _, err = cli("sample.py", f"ckpt={trained_ckpt}", *args, f"out={out}")
    assert code == 130 and "Traceback" not in err, err
    assert "stopped: 2 of 6 images" in err and "run the same command again" in err, err
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png"]

    def recorded(method, net, seeds, *a, **kw):
        asked.append(list(seeds))
        return real(method, net, seeds, *a, **kw)

    monkeypatch.setattr(genflow.sampling, "generate", recorded)
    code, stdout, err = cli("sample.py", f"ckpt={trained_ckpt}", *args, f"out={out}")
    assert code == 0, err
    result = json.loads(stdout.splitlines()[-1])
    assert asked == [[2, 3, 4, 5]] and (result["sampled"], result["kept"]) == (4, 2)
    # every file byte for byte, but samples.npz, whose zip entries carry the time they were written
    assert {k: v for k, v in files_of(out).items() if k != "samples.npz"} == \
        {k: v for k, v in files_of(whole).items() if k != "samples.npz"}
    a, b = np.load(out / "samples.npz"), np.load(whole / "samples.npz")
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["seeds"], b["seeds"])

    # a PNG cut short (a crash of the file system) is sampled again; whole ones are kept
    (out / "000004.png").write_bytes((out / "000004.png").read_bytes()[:20])
    asked.clear()
    code, stdout, err = cli("sample.py", f"ckpt={trained_ckpt}", *args, f"out={out}")
    assert code == 0, err
    assert asked == [[4]] and files_of(out)["000004.png"] == files_of(whole)["000004.png"]


def test_sigterm_stops_sample_with_what_is_kept(cli, trained_ckpt, tmp_path, monkeypatch):
    import signal

    import genflow.sampling

    real = genflow.sampling.generate

    def terminated_after_one_batch(*a, on_batch=None, **kw):
        def once(seeds, x):
            on_batch(seeds, x)
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, delivered to this (the in-process app's) process

        return real(*a, on_batch=once, **kw)

    monkeypatch.setattr(genflow.sampling, "generate", terminated_after_one_batch)
    out, before = tmp_path / "out", signal.getsignal(signal.SIGTERM)
    code, _, err = cli("sample.py", f"ckpt={trained_ckpt}", "seeds=0-3", "batch=2", "steps=2", "progress=false",
                       f"out={out}")
    assert code == 143 and "stopped: 2 of 4 images" in err and "Traceback" not in err, err
    assert signal.getsignal(signal.SIGTERM) is before  # the app's handler is gone with the app
