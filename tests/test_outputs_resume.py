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
import torch

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
    refused(cli("genflow.apps.leaderboard", "suite=smoke", f"out={read_only / 'board'}"), "out=", "cannot be written")
    refused(cli("genflow.apps.leaderboard", "suite=smoke", f"out={read_only.parent / 'board'}",
                f"history={read_only / 'history.jsonl'}"), "history=", "cannot be written")
    monkeypatch.undo()
    assert files_of(read_only) == {} and not (read_only.parent / "board").exists()


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
    assert "stopped by SIGINT while sampling: 2 of 6 images" in err and "run the same command again" in err, err
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
    assert code == 143 and "stopped by SIGTERM while sampling: 2 of 4 images" in err and "Traceback" not in err, err
    assert signal.getsignal(signal.SIGTERM) is before  # the app's handler is gone with the app


INTERRUPTED_WHILE_LOADING = """
import os, runpy, signal, sys, time
import genflow.config

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job starts with it ignored)

def loading(*args, **kwargs):  # a real Ctrl-C (SIGINT to this process) while the checkpoint is being loaded
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(10)

genflow.config.module_from_checkpoint = loading
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("app,args", [("genflow.apps.sample", ["seeds=0-3", "steps=2"]),
                                      ("genflow.apps.evaluate", ["fid.num=8", "fid.steps=2"])])
def test_ctrl_c_while_the_model_loads_ends_in_one_line(trained_ckpt, tmp_path, app, args):
    import subprocess
    import sys

    out = tmp_path / ("s" if app.endswith("sample") else "fid.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENFLOW_METRICS_HOME": str(tmp_path / "metrics")}
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED_WHILE_LOADING, app, f"ckpt={trained_ckpt}", *args,
                           "progress=false", f"out={out}"], cwd=Path(__file__).parents[1], env=env,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("stopped by SIGINT while loading the model: ") and "Traceback" not in proc.stderr
    assert ("nothing was written; run the same command again" if app.endswith("sample") else
            "no images were kept yet; continue with: python -m genflow.apps.evaluate") in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


FID_ARGS = ["fid.num=100", "fid.batch_size=4", "fid.seed_sets=2", "fid.steps=2", "fid.kid=true", "progress=false",
            "keep_every_s=0"]
SAME = ("fid", "fid_sets", "kid", "fid_images", "fid_nfe")  # what the numbers are; times and paths differ


def test_evaluate_stopped_by_sigterm_continues_to_the_same_numbers(cli, trained_ckpt, tmp_path, monkeypatch):
    """A real SIGTERM to a real process once its partial file holds some batches; the same command again
    generates only the rest and ends with the numbers of an uninterrupted run, bit for bit (the float64 sums
    continue from their stored values in the same order); nothing is left beside the result."""
    import signal
    import subprocess
    import sys
    import time

    monkeypatch.setenv("GENFLOW_METRICS_HOME", str(tmp_path / "metrics"))
    code, stdout, err = cli("genflow.apps.evaluate", f"ckpt={trained_ckpt}", *FID_ARGS, f"out={tmp_path / 'whole.json'}")
    assert code == 0, err
    whole = json.loads(stdout.splitlines()[-1])

    folder = tmp_path / "stopped"
    folder.mkdir()
    out, partial = folder / "fid.json", folder / "fid.json.partial"
    args = [f"ckpt={trained_ckpt}", *FID_ARGS, f"out={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as here: the same reduction order
    proc = subprocess.Popen([sys.executable, "-m", "genflow.apps.evaluate", *args], cwd=Path(__file__).parents[1],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "stopped by SIGTERM while computing the FID: " in err and f"are kept in {partial}" in err, err
    assert "continue with: python -m genflow.apps.evaluate" in err and f"out={out}" in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["fid.json.partial"]  # no result, no temporary file

    kept = torch.load(partial, weights_only=True)
    assert 0 < kept["batches"] < 25 and kept["set"] == 0, kept["batches"]  # stopped early in the first set

    import genflow.sampling

    real, asked = genflow.sampling.generate, []

    def recorded(method, net, seeds, *a, **kw):
        asked.extend(seeds)
        return real(method, net, seeds, *a, **kw)

    monkeypatch.setattr(genflow.sampling, "generate", recorded)
    code, stdout, err = cli("genflow.apps.evaluate", *args)
    assert code == 0, err
    assert "continuing a stopped evaluation" in err
    assert asked == list(range(4 * kept["batches"], 200))  # only the seeds that were missing
    continued = json.loads(stdout.splitlines()[-1])
    assert {k: continued[k] for k in SAME} == {k: whole[k] for k in SAME}
    assert sorted(p.name for p in folder.iterdir()) == ["fid.json"]  # the partial file is gone


def test_evaluate_refuses_another_commands_partial_and_redoes_a_damaged_one(cli, trained_ckpt, tmp_path, monkeypatch):
    import genflow.metrics.partial as partial_module

    monkeypatch.setenv("GENFLOW_METRICS_HOME", str(tmp_path / "metrics"))
    out = tmp_path / "fid.json"
    args = [f"ckpt={trained_ckpt}", *FID_ARGS, f"out={out}"]
    real = partial_module.PartialFID.after_batch

    def stop_after_three(self, seed_set, batches, images, stats):
        if batches == 3:
            self.stop_signal = 2  # Ctrl-C asked for during batch 3
        return real(self, seed_set, batches, images, stats)

    monkeypatch.setattr(partial_module.PartialFID, "after_batch", stop_after_three)
    code, _, err = cli("genflow.apps.evaluate", *args)
    assert code == 130 and "stopped by SIGINT while computing the FID: 12 of 100 images of seed set 1 of 2 are kept" in err, err
    monkeypatch.setattr(partial_module.PartialFID, "after_batch", real)

    # another command on the same out=: refused before any work, the partial file untouched
    before = files_of(tmp_path)
    code, _, err = cli("genflow.apps.evaluate", *[a.replace("fid.steps=2", "fid.steps=3") for a in args])
    refused((code, "", err), "holds a stopped evaluation of other settings (fid.steps=2)", "delete")
    assert files_of(tmp_path) == before

    # a damaged partial file is not used: one line, and the evaluation starts over
    path = tmp_path / "fid.json.partial"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    code, stdout, err = cli("genflow.apps.evaluate", *args)
    assert code == 0 and f"{path} not used" in err and "starting the evaluation over" in err, err
    assert json.loads(stdout.splitlines()[-1])["fid_images"] == 100
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["fid.json"]


def test_evaluate_second_signal_stops_at_once_with_one_line(cli, trained_ckpt, tmp_path, monkeypatch):
    import signal

    import genflow.metrics.partial as partial_module

    monkeypatch.setenv("GENFLOW_METRICS_HOME", str(tmp_path / "metrics"))
    real = partial_module.PartialFID.after_batch

    def twice(self, seed_set, batches, images, stats):
        if batches == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # the second one arrives before the batch is done
        return real(self, seed_set, batches, images, stats)

    monkeypatch.setattr(partial_module.PartialFID, "after_batch", twice)
    before = signal.getsignal(signal.SIGINT)
    code, _, err = cli("genflow.apps.evaluate", f"ckpt={trained_ckpt}", *FID_ARGS, f"out={tmp_path / 'fid.json'}")
    assert code == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("SIGINT again: stopped at once; continue with: "), err
    assert signal.getsignal(signal.SIGINT) is before
    # the file holds its last write (batch 1: keep_every_s=0) and continues from it
    assert torch.load(tmp_path / "fid.json.partial", weights_only=True)["batches"] == 1


TRAIN_ARGS = ["data=digits", "net=unet_tiny", "data.batch_size=8", "trainer.val_check_interval=2", "sample.num=4",
              "sample.steps=2", "optim.warmup_steps=1", "checkpoint.every_n_steps=2", "trainer.enable_progress_bar=false"]
needs_dev_full = pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="no /dev/full (a Linux device)")


def torch_save_on_a_full_disk(obj) -> RuntimeError:
    """The error torch's own zip writer raises when the disk is full: ``torch.save`` to /dev/full, whose every
    write fails with ENOSPC (torch's message has lost the errno)."""
    with pytest.raises(RuntimeError) as failed:
        torch.save(obj, "/dev/full")
    return failed.value


@needs_dev_full
def test_a_full_disk_while_training_keeps_the_last_checkpoint_and_says_how_to_go_on(cli, tmp_path, monkeypatch):
    """The checkpoint writer fails (ENOSPC, or torch's own "unexpected pos" that has lost the errno): error / why /
    fix with the command that continues, exit 2; last.ckpt byte for byte as before, no temporary file, no lock."""
    import shutil

    run = tmp_path / "run"
    code, _, err = cli("train.py", *TRAIN_ARGS, "trainer.max_steps=2", f"hydra.run.dir={run}")
    assert code == 0, err[-2000:]
    last = run / "checkpoints" / "last.ckpt"
    kept = last.read_bytes()
    real_save = torch.save
    for failure, why in ((OSError(errno.ENOSPC, "No space left on device"), ("the disk is full (20.0 MB free)",)),
                         (None, ("the file system refused a write, as a full disk or a used-up quota does (torch: ",
                                 "; 20.0 MB free there now)"))):
        with monkeypatch.context() as m:
            def full(obj, *args, **kwargs):
                if failure is None:  # torch's own writer on a full disk, with this checkpoint
                    real_save(obj, "/dev/full")
                raise failure

            m.setattr(torch, "save", full)
            m.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 12, 10 ** 12 - 20 * 10 ** 6,
                                                                                     20 * 10 ** 6))
            code, _, err = cli("train.py", *TRAIN_ARGS, "trainer.max_steps=4", "ckpt_path=last", f"hydra.run.dir={run}")
        refused((code, "", err[err.index("error: "):]), f"could not write {run / 'checkpoints'}", *why,
                "continue with: python train.py", f"ckpt_path=last hydra.run.dir={run}")
        assert last.read_bytes() == kept
        assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
        assert not (run / ".genflow.lock").exists()
    # room made: the same command continues from the kept checkpoint
    code, out, err = cli("train.py", *TRAIN_ARGS, "trainer.max_steps=4", "ckpt_path=last", f"hydra.run.dir={run}")
    assert code == 0 and json.loads(out.splitlines()[-1])["steps"] == 4, err[-2000:]


def test_training_refuses_a_disk_without_room_for_its_checkpoints(cli, tmp_path, monkeypatch):
    """The free space is checked once the network is built (its size decides the checkpoints'), after Hydra wrote
    .hydra/ and the log: the refusal undoes them. A fresh folder (and the parents it needed) is gone again; a
    folder that held other files, a log and an earlier .hydra/ keeps each byte of them, and nothing new."""
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 12, 10 ** 12 - 10 ** 6, 10 ** 6))
    fresh = tmp_path / "new" / "deeper" / "run"
    existing = tmp_path / "existing"
    (existing / ".hydra").mkdir(parents=True)
    (existing / ".hydra" / "config.yaml").write_text("# an earlier command's config\n")
    (existing / "train.log").write_text("an earlier command's log\n")
    (existing / "notes" ).mkdir()
    (existing / "notes" / "plan.txt").write_text("kept\n")
    listing, before = sorted(p.name for p in tmp_path.iterdir()), files_of(existing)
    times = {p: p.stat().st_mtime_ns for p in existing.rglob("*") if p.is_file()}
    for run in (fresh, existing):
        code, _, err = cli("train.py", *TRAIN_ARGS, "trainer.max_steps=2", f"hydra.run.dir={run}")
        refused((code, "", err), "hydra.run.dir=", "MiB free, the job needs about", "free space there")
    assert sorted(p.name for p in tmp_path.iterdir()) == listing and not (tmp_path / "new").exists()
    assert files_of(existing) == before and sorted(p.name for p in existing.iterdir()) == [".hydra", "notes", "train.log"]
    assert {p: p.stat().st_mtime_ns for p in existing.rglob("*") if p.is_file()} == times


def test_a_run_stopped_while_it_builds_leaves_no_folder(cli, tmp_path, monkeypatch):
    """A real SIGTERM while the network is built (after Hydra wrote .hydra/): one line, exit 143, and the new folder
    is gone again."""
    import signal

    import genflow.apps.train as train_app

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train_app, "build", terminated)
    run = tmp_path / "run"
    code, out, err = cli("train.py", *TRAIN_ARGS, "trainer.max_steps=2", f"hydra.run.dir={run}")
    assert code == 143 and "stopped by SIGTERM while starting: nothing was trained yet; run the same command again" \
        in out, out + err
    assert list(tmp_path.iterdir()) == []


def test_a_refused_job_of_a_sweep_undoes_its_own_folder_only(cli, tmp_path, monkeypatch):
    """The second job of a sweep is refused once built: its folder goes, the first job's finished run and the
    sweep's multirun.yaml stay as they are."""
    import genflow.apps.train as train_app

    real, built = train_app.checkpoint_bytes, []

    def second_too_big(module):
        built.append(module)
        return real(module) if len(built) == 1 else 10 ** 18

    monkeypatch.setattr(train_app, "checkpoint_bytes", second_too_big)
    sweep = tmp_path / "sweep"
    code, _, err = cli("train.py", "-m", *TRAIN_ARGS, "trainer.max_steps=1", "logger=none", "~callbacks.sample_grid",
                       "seed=1,2", f"hydra.sweep.dir={sweep}")
    refused((code, "", err[err.index("error: "):]), "MiB free, the job needs about")
    first = [p for p in sweep.iterdir() if p.name.startswith("0_")]
    assert sorted(p.name for p in sweep.iterdir()) == sorted([first[0].name, "multirun.yaml"])
    assert (first[0] / "result.json").is_file() and (first[0] / ".hydra" / "config.yaml").is_file()


def test_sample_and_evaluate_refuse_a_disk_without_room_before_the_work(cli, trained_ckpt, tmp_path, monkeypatch):
    import shutil

    import genflow.config

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the free space was checked")

    monkeypatch.setattr(genflow.config, "module_from_checkpoint", no_loading)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 12, 10 ** 12 - 10 ** 5, 10 ** 5))
    monkeypatch.setenv("GENFLOW_METRICS_HOME", str(tmp_path / "metrics"))
    refused(cli("sample.py", f"ckpt={trained_ckpt}", "seeds=0-999", f"out={tmp_path / 's'}"), "out=",
            "MiB free, the job needs about")
    refused(cli("genflow.apps.evaluate", f"ckpt={trained_ckpt}", "fid.num=8", f"out={tmp_path / 'fid.json'}"),
            "out=", "MiB free, the job needs about")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@needs_dev_full
def test_write_failures_of_other_writers_name_the_file():
    """safetensors (Rust) reports the errno only in its message; torch's zip writer not at all."""
    from safetensors import SafetensorError

    from genflow.errors import WriteFailed, os_error

    err = os_error(SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)'),
                   "/tmp/x/ema.safetensors")
    assert isinstance(err, WriteFailed) and str(err).startswith("could not write /tmp/x/ema.safetensors\n  why: the disk "
                                                                "is full")
    assert os_error(SafetensorError("Error while serializing: I/O error: No such file (os error 2)")) is None
    assert os_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    torch_full = os_error(torch_save_on_a_full_disk({"w": torch.zeros(1000)}), "/tmp/x/last.ckpt")
    assert isinstance(torch_full, WriteFailed) and "the file system refused a write" in str(torch_full)


def test_write_output_names_the_file_for_any_writer_and_keeps_the_old_one(tmp_path):
    """``write_output`` looks at any writer's failure (safetensors' message, torch's zip writer), keeps the file
    already under that name, leaves no temporary file; a failure it cannot explain is raised unchanged."""
    from safetensors import SafetensorError

    from genflow.errors import WriteFailed
    from genflow.outputs import write_output

    path = tmp_path / "ema.safetensors"
    path.write_bytes(b"earlier")
    for failure in (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
                    ValueError("a bug")):
        def write(tmp):
            tmp.write_bytes(b"half")
            raise failure

        with pytest.raises(WriteFailed if isinstance(failure, SafetensorError) else ValueError) as raised:
            write_output(path, write)
        assert isinstance(raised.value, ValueError) or str(raised.value).startswith(f"could not write {path}\n")
        assert path.read_bytes() == b"earlier" and [p.name for p in tmp_path.iterdir()] == ["ema.safetensors"]
