"""Run folders: no run is ever overwritten, resume keeps everything (signal checkpoints, CSV history, true
rates), runs describe themselves. One tiny trained run is shared by the module."""
import csv
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from genflow.config import compose
from genflow.errors import CheckpointError, ConfigError
from genflow.apps.train import train
from genflow.apps.run_folder import prepare_run, summarize

TINY = ["model=pfgmpp", "data=digits", "net=unet_tiny", "data.batch_size=16", "trainer.max_steps=6",
        "trainer.val_check_interval=3", "checkpoint.every_n_steps=2", "sample.num=4", "sample.steps=2",
        "optim.warmup_steps=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"]


def cfg_for(run_dir, *extra):
    return compose(TINY + list(extra) + [f"+run_dir={run_dir}"])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "done"
    return train(cfg_for(run_dir, "fid.num=32"))


def _snapshot(run_dir: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"}


def test_outputs_share_one_file_mode(finished, tmp_path):
    run_dir = Path(finished["run_dir"])
    (tmp_path / "plain").write_text("")  # what an ordinary open() gives under this umask
    plain = (tmp_path / "plain").stat().st_mode & 0o777
    for path in (run_dir / "checkpoints" / "final.ckpt", run_dir / "checkpoints" / "last.ckpt",
                 run_dir / "ema.safetensors", run_dir / "grid.png"):
        assert path.stat().st_mode & 0o777 == plain, path
    # keep=3 (the default) bounds the periodic checkpoints: steps 2, 4, 6 of every_n_steps=2 ...
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.ckpt")) == \
        ["step_000002.ckpt", "step_000004.ckpt", "step_000006.ckpt"]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["model"] == "pfgmpp" and result["net"] == "unet_tiny" and result["D"] == 128 and result["seed"] == 0
    assert result["steps"] == result["steps_this_session"] == 6


def test_final_fid_reaches_csv_and_tensorboard(finished):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(finished["run_dir"])
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("final/fid")]
    assert len(rows) == 1 and float(rows[0]["final/fid"]) == pytest.approx(finished["fid"], rel=1e-6)
    events = EventAccumulator(str(run_dir / "tb")).Reload()
    assert events.Scalars("final/fid")[0].value == pytest.approx(finished["fid"], rel=1e-5)
    assert "D: 128" in (run_dir / "tb" / "hparams.yaml").read_text()


def _checksums(folder: Path) -> dict:
    """Every file of the folder (Hydra's .hydra/ and the log included) by its content's SHA-256."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_training_into_a_run_is_refused_before_any_work(finished, cli):
    run_dir = Path(finished["run_dir"])
    hydra_dir = run_dir / ".hydra"            # what Hydra left there when the run was started by train.py
    hydra_dir.mkdir(exist_ok=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        if not (hydra_dir / name).exists():
            (hydra_dir / name).write_text(f"# the run's own {name}\n")
    before, times = _checksums(run_dir), _snapshot(run_dir)
    code, out, err = cli("train.py", *TINY, f"hydra.run.dir={run_dir}")
    assert code == 2 and "already holds a run" in err and "fix:" in err and "Traceback" not in err
    assert _checksums(run_dir) == before and _snapshot(run_dir) == times   # .hydra/ and train.log included


def test_resuming_a_finished_run_from_the_command_line_changes_no_file(finished, cli):
    """Nothing to do: what Hydra wrote (.hydra/ with this command's overrides, the log's notes) is undone."""
    run_dir = Path(finished["run_dir"])
    (run_dir / ".hydra").mkdir(exist_ok=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("# the run's own overrides\n")
    before = _checksums(run_dir)
    code, out, err = cli("train.py", *TINY, "ckpt_path=last", f"hydra.run.dir={run_dir}")
    assert code == 0 and json.loads(out.splitlines()[-1])["already_finished"], err
    assert "the run already finished" in err + out
    assert _checksums(run_dir) == before


def test_resume_after_training_makes_the_missing_outputs(finished, tmp_path):
    """Stopped while writing the grid or the exports (SIGTERM after final.ckpt): ckpt_path=last makes them."""
    import shutil

    run_dir = tmp_path / "stopped"
    shutil.copytree(finished["run_dir"], run_dir)
    for name in ("ema.safetensors", "grid.png", "result.json"):
        (run_dir / name).unlink()
    result = train(cfg_for(run_dir, "ckpt_path=last", "fid.num=32"))
    assert not result.get("already_finished") and result["steps"] == 6 and result["steps_this_session"] == 0
    assert all((run_dir / name).is_file() for name in ("ema.safetensors", "grid.png", "result.json"))
    from safetensors.torch import load_file

    made, kept = load_file(run_dir / "ema.safetensors"), load_file(Path(finished["run_dir"]) / "ema.safetensors")
    assert all(torch.equal(made[k], kept[k]) for k in kept)               # final.ckpt's EMA weights, exported
    assert result["fid"] == pytest.approx(finished["fid"], rel=1e-4)     # the same EMA weights were scored
    assert "are missing (stopped while writing them): making them" in (run_dir / "train.log").read_text()


def test_resuming_a_finished_run_is_a_no_op(finished):
    run_dir = Path(finished["run_dir"])
    before = _snapshot(run_dir)
    result = train(cfg_for(run_dir, "ckpt_path=last"))
    assert result["already_finished"] and result["steps"] == 6
    assert _snapshot(run_dir) == before  # final.ckpt and ema.safetensors untouched


def test_a_resumed_run_names_its_parts_as_the_fresh_run_did(finished, cli, tmp_path):
    """The resumed run adopts the recorded net (the command line leaves it at the data's default), so Hydra's
    choice no longer names it; its JSON line still says the config names the fresh run said."""
    run_dir = tmp_path / "copy"
    shutil.copytree(finished["run_dir"], run_dir)
    tiny = [o for o in TINY if not o.startswith("net=")]
    code, out, err = cli("train.py", *tiny, "trainer.max_steps=8", "ckpt_path=last", f"hydra.run.dir={run_dir}")
    assert code == 0, err[-2000:]
    resumed = json.loads(out.strip().splitlines()[-1])
    assert "resuming with the run's recorded net" in out + err
    assert {k: resumed[k] for k in ("model", "net", "data")} == {k: finished[k] for k in ("model", "net", "data")} \
        == {"model": "pfgmpp", "net": "unet_tiny", "data": "digits"}
    assert resumed["run_dir"] == str(run_dir) and Path(resumed["checkpoint"]).is_absolute()


def test_resume_with_another_model_is_refused_naming_the_keys(finished, cli):
    run_dir = Path(finished["run_dir"])
    before = _snapshot(run_dir)
    code, out, err = cli("train.py", *TINY, "model=edm", "trainer.max_steps=8", "ckpt_path=last",
                         f"hydra.run.dir={run_dir}")
    assert code == 2 and "model._target_" in err and "Traceback" not in err
    assert _snapshot(run_dir) == before
    # without the explicit override the recorded model is kept (compose() alone cannot tell: it refuses)
    with pytest.raises(CheckpointError, match="net"):
        prepare_run(cfg_for(run_dir, "ckpt_path=last", "trainer.max_steps=8", "net=unet_small"), run_dir)


def test_a_resume_file_follows_the_same_rule_as_last(finished, tmp_path, cli):
    """ckpt_path=FILE: a net that is only a default is adopted from the record (as for ckpt_path=last), an
    explicit other net is refused up front, before anything is written."""
    from genflow.config import preflight

    run_dir = tmp_path / "copy"
    shutil.copytree(finished["run_dir"], run_dir)
    (run_dir / "checkpoints" / "final.ckpt").unlink()
    ckpt = run_dir / "checkpoints" / "step_000004.ckpt"
    defaults_only = [o for o in TINY if not o.startswith("net=")] + ["trainer.max_steps=5", f"ckpt_path={ckpt}",
                                                                     f"hydra.run.dir={run_dir}", "sample.num=2"]
    with pytest.raises(CheckpointError, match="net.preset: recorded .unet_tiny., requested .unet_small."):
        preflight("train", argv=defaults_only + ["net=unet_small"])
    # a run recorded with another model than the default one: the default is replaced, an explicit model refused
    edm_run = torch.load(ckpt, map_location="cpu", weights_only=True)
    edm_run["hyper_parameters"]["config"]["model"] = dict(compose(["model=edm"], validator=False).model)
    edm_ckpt = tmp_path / "edm.ckpt"
    torch.save(edm_run, edm_ckpt)
    no_model = [o for o in defaults_only if not o.startswith(("model=", "ckpt_path=", "hydra.run.dir="))]
    preflight("train", argv=no_model + [f"ckpt_path={edm_ckpt}", f"hydra.run.dir={tmp_path / 'edm'}"])
    with pytest.raises(CheckpointError, match="model._target_"):
        preflight("train", argv=no_model + ["model=pfgmpp", f"ckpt_path={edm_ckpt}", f"hydra.run.dir={tmp_path / 'edm'}"])
    before = _snapshot(run_dir)
    code, out, err = cli("train.py", *defaults_only, "net=unet_small")
    assert code == 2 and "recorded" in err and "Traceback" not in err and _snapshot(run_dir) == before
    code, out, err = cli("train.py", *defaults_only)
    assert code == 0, err
    assert "resuming with the run's recorded net" in out + err
    assert json.loads((run_dir / "result.json").read_text())["steps"] == 5


def test_every_knob_counts_for_the_section_that_reads_it():
    """stage= is read by the multi-view net: resuming a stage-1 run with stage=2 is refused, not adopted."""
    from genflow.config import check_resume, declared_knobs, explicit_sections, to_container

    base = ["model=isotropic3d", "data=multiview"]
    recorded = to_container(compose(base + ["stage=1"], validator=False))
    knobs = declared_knobs(compose(base, validator=False))
    assert explicit_sections(["stage=2"], knobs) == {"net"}
    assert explicit_sections(["D=64"], declared_knobs(compose([], validator=False))) == {"model"}
    with pytest.raises(CheckpointError, match="net.stage: recorded 1, requested 2"):
        check_resume(compose(base + ["stage=2"], validator=False), recorded, "run.ckpt",
                     explicit_sections(["stage=2"], knobs))


def test_last_falls_back_to_the_newest_valid_checkpoint(finished, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(finished["run_dir"], run_dir)
    ckpts = run_dir / "checkpoints"
    (ckpts / "last.ckpt").write_bytes((ckpts / "last.ckpt").read_bytes()[:1000])  # a kill during the write
    stale = ckpts / ".last.ckpt.x1y2z3"
    stale.write_bytes(b"")
    now = ckpts.stat().st_mtime
    for i, name in enumerate(["step_000002.ckpt", "step_000004.ckpt", "step_000006.ckpt", "last.ckpt"]):
        os.utime(ckpts / name, (now + i, now + i))
    os.utime(ckpts / "step_000006.ckpt", (now - 10, now - 10))  # older than step 4 on disk
    start = prepare_run(cfg_for(run_dir, "ckpt_path=last", "trainer.max_steps=8"), run_dir)
    assert start.ckpt_path == str(ckpts / "step_000004.ckpt") and start.step == 4
    assert any("skipped last.ckpt" in n for n in start.notes) and any("step_000004" in n for n in start.notes)
    assert not stale.exists()


def test_last_without_a_run_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        prepare_run(cfg_for(tmp_path / "empty", "ckpt_path=last"), tmp_path / "empty")


def test_weights_only_export_is_not_resumable(finished, tmp_path):
    with pytest.raises(CheckpointError, match="weights only"):
        prepare_run(cfg_for(tmp_path / "new", f"ckpt_path={finished['checkpoint']}"), tmp_path / "new")


class SignalAt(pl.Callback):
    """Sends a signal to this process at the end of a given step (as a user's Ctrl-C or a scheduler would)."""

    seen_last_step = None  # global_step of last.ckpt when the signal was sent

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            last = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
            if last.is_file():
                SignalAt.seen_last_step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
                shutil.copy(last, last.with_name("early.ckpt"))  # an older state to resume from
            os.kill(os.getpid(), self.signum)


def test_signal_saves_and_resume_keeps_history_and_true_rate(tmp_path):
    run_dir = tmp_path / "killed"
    extra = ["trainer.max_steps=8", "checkpoint.every_n_steps=100", "checkpoint.every_minutes=null"]
    kill = [f"+callbacks.kill._target_={__name__}.SignalAt", "+callbacks.kill.step=3"]
    # a wall-clock cadence of ~0 s: last.ckpt after every step, although every_n_steps is never reached
    with pytest.raises(SystemExit) as stop:
        train(cfg_for(run_dir, *extra, *kill, "checkpoint.every_minutes=1e-9"))
    assert stop.value.code == 128 + signal.SIGTERM
    assert SignalAt.seen_last_step == 2  # the time-based save of the step before the signal
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 3
    handler = signal.getsignal(signal.SIGTERM)  # ours is removed after fit
    assert type(getattr(handler, "__self__", None)).__name__ != "RunCheckpoint"
    # resuming from the older state (step 2) makes step 2 of the first session a lost segment, as after kill -9
    resumed = train(cfg_for(run_dir, *extra, f"ckpt_path={run_dir / 'checkpoints' / 'early.ckpt'}"))
    assert resumed["steps"] == 8 and resumed["steps_this_session"] == 6
    with open(run_dir / "csv" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == list(range(8))  # the first session's rows kept, every step once
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run_dir / "tb")).Reload()
    assert sorted(e.step for e in tb.Scalars("train/loss")) == list(range(8))  # both sessions, each step once
    log = (run_dir / "train.log").read_text()
    # a library call has no command line: the printed command keeps the step budget at least
    assert "stopped by SIGTERM at step 3" in log and \
        f"continue with: python train.py trainer.max_steps=8 ckpt_path=last hydra.run.dir={run_dir}" in log


class SignalTwiceAt(SignalAt):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
            os.kill(os.getpid(), self.signum)


def test_a_second_ctrl_c_stops_at_once_with_status_130_and_one_line(tmp_path, capsys):
    run_dir = tmp_path / "twice"
    kill = [f"+callbacks.kill._target_={__name__}.SignalTwiceAt", "+callbacks.kill.step=2",
            f"+callbacks.kill.signum={int(signal.SIGINT)}"]
    with pytest.raises(SystemExit) as stop:
        train(cfg_for(run_dir, "trainer.max_steps=8", *kill))
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert "SIGINT again: stopped at once, without saving this step; ckpt_path=last continues" in err
    assert "Traceback" not in err and not (run_dir / ".genflow.lock").exists()   # the folder's lock released


def test_the_continue_command_repeats_the_runs_own_overrides():
    from genflow.apps.run_folder import continue_command

    cfg = cfg_for("unused")
    command = continue_command(cfg, Path("/runs/a b"), ["model=edm", "trainer.max_steps=2000", "ckpt_path=x.ckpt",
                                                        "hydra.run.dir=/old", "optim.lr=1e-4"])
    assert command == ("python train.py model=edm trainer.max_steps=2000 optim.lr=1e-4 ckpt_path=last "
                       "'hydra.run.dir=/runs/a b'")


def test_sweep_summary_table(tmp_path):
    for name, D, fid in (("0_D=64", 64, 2.5), ("1_D=128", 128, 1.5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps({"model": "pfgmpp", "D": D, "fid": fid}))
    table, rows = summarize(tmp_path)
    assert [r["D"] for r in rows] == [64, 128]
    assert table.splitlines()[0] == "| run | model | D | fid |" and "| 1_D=128 | pfgmpp | 128 | 1.5 |" in table


def test_init_from_says_what_it_loaded(finished, capsys):
    from genflow.config import build

    module, _ = build(cfg_for("unused", f"init_from={finished['checkpoint']}"))
    note = capsys.readouterr().out
    total = len(module.state_dict())
    assert f"loaded {total} of {total} tensors" in note and "skipped" not in note


def test_plain_progress_lines_when_not_a_terminal(tmp_path, cli):
    """stdout captured (not a terminal): settings lines, then `step i/N | rate | ETA | loss/dim` lines in stdout
    and train.log, then the JSON line; none of Lightning's device lines or advertisements."""
    run_dir = tmp_path / "plain"
    args = [a for a in TINY if a != "trainer.enable_progress_bar=false"]
    code, out, err = cli("train.py", *args, "progress.every_seconds=0", f"hydra.run.dir={run_dir}")
    assert code == 0, err[-2000:]
    lines = out.strip().splitlines()
    steps = [l for l in lines if l.startswith("step ")]
    assert steps[0].startswith("step 1/6 | first step ") and steps[-1].startswith("step 6/6 | ")
    assert all(" it/s, " in l and "ETA " in l and "loss/dim " in l for l in steps[1:])
    assert lines[0] == f"run {run_dir}" and "CPU thread" in lines[2] and json.loads(lines[-1])["steps"] == 6
    assert "Epoch" not in out + err and "GPU available" not in out + err and "Tip" not in out + err
    log = (run_dir / "train.log").read_text()
    assert steps[-1] in log and lines[-1] in log


def test_threads_follow_the_available_cpus(monkeypatch):
    from genflow import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 0)  # an idle machine, whatever else runs now
    cpus = len(os.sched_getaffinity(0))
    assert threads.choose_threads() == (cpus, "CPUs available to this process")
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: cpus)  # every CPU busy elsewhere: still one thread
    assert threads.choose_threads() == (1, f"{cpus} CPUs available to this process, {cpus} busy with other work")
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 0.5)  # a quota below one CPU still gets one thread
    assert threads.available_cpus() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads() == (3, "OMP_NUM_THREADS") and threads.choose_threads(2) == (2, "requested")


def test_help_starts_with_genflow_and_its_groups(cli):
    code, out, err = cli("train.py", "--help")
    assert code == 0 and out.startswith("genflow: train continuous-time generative models")
    assert "model: ddpm, edm, flow, isotropic3d, lfm, pfgmpp, spd" in out and "Powered by Hydra" not in out
    assert "leaderboard" not in out  # only train.py's own groups, not the other apps' config folders


def test_a_run_without_loggers(tmp_path):
    """logger=none: no csv/ or tb/ folder, and the learning-rate monitor (which needs a logger) stays out."""
    result = train(cfg_for(tmp_path / "quiet", "logger=none", "trainer.max_steps=2", "trainer.val_check_interval=2"))
    assert result["steps"] == 2 and Path(result["checkpoint"]).is_file()
    assert not (tmp_path / "quiet" / "csv").exists() and not (tmp_path / "quiet" / "tb").exists()


def test_one_training_process_per_run_folder(tmp_path):
    """A live owner's lock (or one on another host) refuses a second run; a dead owner's lock is taken over;
    the lock is gone when the run ends."""
    import socket
    import subprocess

    from genflow.apps.run_folder import LOCK_NAME, _process_start

    run_dir = tmp_path / "locked"
    run_dir.mkdir()
    lock = run_dir / LOCK_NAME
    short = ["trainer.max_steps=2", "trainer.val_check_interval=2", "sample.num=2"]
    owner = subprocess.Popen(["sleep", "60"])
    try:
        for host in (socket.gethostname(), "another-host"):
            lock.write_text(json.dumps({"pid": owner.pid, "host": host, "start": _process_start(owner.pid),
                                        "since": "2026-11-30 00:00:00"}))
            with pytest.raises(ConfigError, match=f"is in use: process {owner.pid} on {host}(.|\n)*fix: .*remove"):
                train(cfg_for(run_dir, *short))
            assert lock.is_file() and not (run_dir / "checkpoints").exists()
    finally:
        owner.kill()
        owner.wait()
    # the owner is gone (as after kill -9): its lock is taken over, and released at the end
    lock.write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname(), "start": None, "since": "?"}))
    result = train(cfg_for(run_dir, *short))
    assert result["steps"] == 2 and not lock.exists()
    assert f"took over the lock of process {owner.pid}" in (run_dir / "train.log").read_text()


def test_the_loser_of_two_simultaneous_starts_leaves_the_winners_folder_as_it_was(tmp_path, cli, monkeypatch):
    """The other process took the lock between this command's check and its job (both started at once): Hydra
    has rewritten .hydra/ by then; the refused command puts back what the folder held, and removes nothing."""
    import socket
    import subprocess

    import genflow.outputs
    from genflow.apps.run_folder import LOCK_NAME, _process_start

    run_dir = tmp_path / "busy"
    (run_dir / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run_dir / ".hydra" / name).write_text(f"# the running job's {name}\n")
    (run_dir / "train.log").write_text("the running job's log\n")
    owner = subprocess.Popen(["sleep", "60"])
    try:
        (run_dir / LOCK_NAME).write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname(),
                                                     "start": _process_start(owner.pid), "since": "now"}))
        before = _checksums(run_dir)
        monkeypatch.setattr(genflow.outputs, "check_folder_before_start", lambda *a, **k: None)  # the lock came later
        code, _, err = cli("train.py", *TINY, f"hydra.run.dir={run_dir}")
        assert code == 2 and f"is in use: process {owner.pid}" in err, err
        assert _checksums(run_dir) == before
    finally:
        owner.kill()
        owner.wait()


def test_only_rank_zero_takes_the_run_folder_lock(tmp_path, monkeypatch):
    from genflow.apps.run_folder import LOCK_NAME, RunFolderLock

    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP child started by Lightning (torchrun sets RANK likewise)
    with RunFolderLock(tmp_path):
        assert not (tmp_path / LOCK_NAME).exists()
    monkeypatch.setenv("LOCAL_RANK", "0")
    with RunFolderLock(tmp_path / "new"):
        assert (tmp_path / "new" / LOCK_NAME).is_file()
    assert not (tmp_path / "new").exists()  # nothing was written: the folder it made is removed again


def test_a_half_written_lock(tmp_path):
    """An empty lock file: a run starting right now (refused), or, once old, one that died at once (taken over)."""
    from genflow.apps.run_folder import LOCK_NAME, RunFolderLock

    lock = tmp_path / LOCK_NAME
    lock.write_text("")
    with pytest.raises(ConfigError, match="another process is starting a run there"):
        RunFolderLock(tmp_path).__enter__()
    os.utime(lock, (lock.stat().st_atime - 60, lock.stat().st_mtime - 60))
    with RunFolderLock(tmp_path) as held:
        assert json.loads(lock.read_text())["pid"] == os.getpid() and held.notes
    assert not lock.exists()


def test_plain_rate_and_eta_start_after_the_first_step(monkeypatch, capsys):
    """A compiled run's first step takes minutes: the rate and ETA count from its end (100 s, then 1 s/step)."""
    from types import SimpleNamespace

    import genflow.training.progress_bar as progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    bar = progress.TrainProgress(every_seconds=0, plain=True)
    trainer = SimpleNamespace(global_step=0, max_steps=101, is_global_zero=True, world_size=1, callback_metrics={},
                              datamodule=SimpleNamespace(batch_size=8, data_shape=(1, 8, 8)))
    # (0, 50 s): a batch that ended without an optimizer step (gradient accumulation) prints nothing
    for step, t in ((0, 50.0), (1, 100.0), (1, 100.5), (11, 110.0)):
        trainer.global_step, clock[0] = step, t
        bar._plain_line(trainer)
    first, later = capsys.readouterr().out.strip().splitlines()
    assert first == "step 1/101 | first step 1m 40s (start-up, compilation)"
    assert later.startswith("step 11/101 | 1.00 it/s, 8 img/s | ETA 1m 30s")


def test_a_batch_larger_than_the_data_is_refused_before_any_step(tmp_path):
    """Not trained on a silently smaller batch while the settings and the JSON line report the requested one."""
    run_dir = tmp_path / "big"
    with pytest.raises(ConfigError, match=r"data.batch_size=128 is larger than the training set: 58 points"):
        train(compose(["model=flow", "data=toy2d", "data.n=64", "data.batch_size=128", "trainer.max_steps=1",
                       "trainer.enable_progress_bar=false", f"+run_dir={run_dir}"], validator=False))
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "result.json").exists()


def test_a_batch_larger_than_the_data_is_refused_before_hydra_writes(cli, tmp_path):
    """The refusal comes before Hydra starts the job: no .hydra/, no log; a folder's own files untouched."""
    run_dir = tmp_path / "big"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("a user's file\n")
    before = _checksums(run_dir)
    code, out, err = cli("train.py", "model=flow", "data=toy2d", "data.n=64", "data.batch_size=128",
                         "trainer.max_steps=1", f"hydra.run.dir={run_dir}")
    assert code == 2 and "data.batch_size=128 is larger than the training set: 58 points" in err, err
    assert "Traceback" not in err and _checksums(run_dir) == before   # no .hydra/, no train.log
    # the same for a data set known by its files (digits: 1797, a tenth held out -> 1617 for training)
    code, out, err = cli("train.py", "data=digits", "net=unet_tiny", "data.batch_size=2000", "trainer.max_steps=1",
                         f"hydra.run.dir={run_dir}")
    assert code == 2 and "training set: 1617 points" in err and _checksums(run_dir) == before, err


def test_a_run_without_the_optional_callbacks_trains_cleanly(cli, tmp_path):
    """The grid, the learning-rate monitor and the loggers are optional; the EMA and the checkpoints are the run's."""
    run = tmp_path / "run"
    code, out, err = cli("train.py", "~callbacks.sample_grid", "~callbacks.lr_monitor", "logger=none", "data=digits",
                         "net=unet_tiny", "data.batch_size=8", "trainer.max_steps=2", "trainer.val_check_interval=2",
                         "optim.warmup_steps=1", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}")
    assert code == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["grid"] is None and not (run / "grid.png").exists() and not (run / "samples").exists()
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "ema.safetensors").is_file()


def _signal_during(monkeypatch, phase: str, signum=signal.SIGTERM):
    """Send ``signum`` to this process from inside a phase of the end of a run (a real signal, delivered while
    that phase's code runs)."""
    import genflow.apps.train as train_app
    import genflow.training.callbacks as callbacks

    def kill_then(real):
        def wrapped(*args, **kwargs):
            os.kill(os.getpid(), signum)
            return real(*args, **kwargs)
        return wrapped

    if phase == "final.ckpt":
        real = callbacks.save_checkpoint
        monkeypatch.setattr(callbacks, "save_checkpoint",
                            lambda ckpt, path: (kill_then(real) if Path(path).name == "final.ckpt" else real)(ckpt, path))
    elif phase == "grid":  # the final grid (not the grids of the validation steps)
        import genflow.sampling

        real_grid = genflow.sampling.save_grid
        monkeypatch.setattr(genflow.sampling, "save_grid", lambda images, path, *a: (
            kill_then(real_grid) if "grid.png" in Path(path).name else real_grid)(images, path, *a))
    elif phase == "exports":
        monkeypatch.setattr(train_app, "save_file", kill_then(train_app.save_file))
    elif phase == "fid":
        monkeypatch.setattr(train_app, "evaluate_fid", kill_then(train_app.evaluate_fid))


@pytest.mark.parametrize("phase, says", [("final.ckpt", "writing final.ckpt"), ("grid", "drawing the final grid"),
                                         ("exports", "exporting ema.safetensors"), ("fid", "computing the final FID")])
def test_a_signal_at_the_end_of_a_run_leaves_what_ckpt_path_last_completes(finished, tmp_path, monkeypatch, capsys,
                                                                          phase, says):
    """SIGTERM while final.ckpt, the grid, the exports or the final FID are written: exit 143 with the line that
    says where and the command that continues, no lock, no temporary file; ckpt_path=last then makes what is
    missing from the trained weights (the same EMA weights and FID as the run that never stopped) and replaces
    nothing that was there."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "stopped"
    with monkeypatch.context() as m:
        _signal_during(m, phase)
        with pytest.raises(SystemExit) as stop:
            train(cfg_for(run_dir, "fid.num=32"))
    assert stop.value.code == 143
    out = capsys.readouterr().out
    assert f"stopped by SIGTERM while {says}" in out and "training is complete (step 6" in out, out
    assert f"continue with: python train.py trainer.max_steps=6 ckpt_path=last hydra.run.dir={run_dir}" in out
    assert not (run_dir / ".genflow.lock").exists() and not (run_dir / "result.json").exists()
    assert not [p for p in run_dir.rglob(".*") if p.is_file()]  # no temporary file of a write cut short
    there = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.parent.name != "csv"
             and p.parent.name != "tb" and p.name != "train.log"}

    result = train(cfg_for(run_dir, "ckpt_path=last", "fid.num=32"))
    assert result["steps"] == 6 and not result.get("already_finished")
    assert all((run_dir / name).is_file() for name in ("ema.safetensors", "config.yaml", "grid.png", "result.json"))
    assert all(path.read_bytes() == data for path, data in there.items())  # nothing that was there replaced
    made, kept = load_file(run_dir / "ema.safetensors"), load_file(Path(finished["run_dir"]) / "ema.safetensors")
    assert all(torch.equal(made[k], kept[k]) for k in kept)
    assert result["fid"] == pytest.approx(finished["fid"], rel=1e-4)
    assert (run_dir / "grid.png").read_bytes() == (Path(finished["run_dir"]) / "grid.png").read_bytes()


def test_a_signal_during_the_final_fid_keeps_its_batches(finished, tmp_path, monkeypatch, capsys):
    """SIGTERM while the final FID generates: the batch in progress ends, its progress is written to
    <run>/fid.partial, and ckpt_path=last generates only the missing seeds (then removes the file)."""
    import genflow.metrics.partial as partial_module
    import genflow.sampling

    run_dir = tmp_path / "stopped"
    real = partial_module.PartialFID.after_batch

    def signal_in_batch_two(self, seed_set, batches, images, stats):
        if batches == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, seed_set, batches, images, stats)

    with monkeypatch.context() as m:
        m.setattr(partial_module.PartialFID, "after_batch", signal_in_batch_two)
        with pytest.raises(SystemExit) as stop:
            train(cfg_for(run_dir, "fid.num=32", "fid.batch_size=8"))
    assert stop.value.code == 143
    out = capsys.readouterr().out
    assert "stopped by SIGTERM while computing the final FID" in out, out
    assert f"of the final FID, 16 of 32 images are kept in {run_dir / 'fid.partial'}" in out, out
    real_generate, asked = genflow.sampling.generate, []

    def recorded(method, net, seeds, *a, **kw):
        asked.extend(seeds)
        return real_generate(method, net, seeds, *a, **kw)

    monkeypatch.setattr(genflow.sampling, "generate", recorded)
    result = train(cfg_for(run_dir, "ckpt_path=last", "fid.num=32", "fid.batch_size=8"))
    assert [s for s in asked if s >= 4] == list(range(16, 32))  # beside the grid's 4 seeds: only the missing ones
    assert result["fid_images"] == 32 and result["fid"] == pytest.approx(finished["fid"], rel=1e-4)
    assert not (run_dir / "fid.partial").exists()
