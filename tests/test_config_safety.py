"""Nothing read from a file chooses what code runs: a checkpoint's stored config, a resumed run folder's
checkpoint and a leaderboard suite may name only genflow's registry of targets (or the user's own search path).
Each payload below would write, copy or link a file if it were instantiated; every entry point refuses it with
exit 2 and an error naming the key, and the victim file and the payload's target paths are untouched."""
import re
import shutil
from pathlib import Path

import pytest
import torch

from genflow import registry
from genflow.errors import ConfigError

VICTIM_BYTES = b"the user's data\n"


def payloads(victim: Path, target: Path) -> dict:
    """name -> (key, value set at that key of the stored config, the key path the error must name)."""
    v, t = str(victim), str(target)
    return {
        "open": ("model.S_noise", {"_target_": "builtins.open", "_args_": [v, "w"]}, "model.S_noise"),
        "savetxt": ("model.S_noise", {"_target_": "numpy.savetxt", "_args_": [t, [1.0]]}, "model.S_noise"),
        "copyfile": ("model.S_noise", {"_target_": "shutil.copyfile", "_args_": [v, t]}, "model.S_noise"),
        "symlink": ("model.S_noise", {"_target_": "os.symlink", "_args_": [v, t]}, "model.S_noise"),
        "tarfile": ("data.extra", {"_target_": "tarfile.open", "name": t, "mode": "w"}, "data.extra"),
        "in_a_list": ("net.extra", [1, {"_target_": "builtins.open", "_args_": [v, "w"]}], "net.extra[1]"),
        # a registered class whose argument is a target dict: the inner one is checked too
        "in_args": ("model.S_noise", {"_target_": "genflow.methods.EDM", "_partial_": True,
                                      "_args_": [{"_target_": "builtins.open", "_args_": [v, "w"]}]},
                    "model.S_noise._args_[0]"),
        # a registered class, but in another section: a network is not a data module
        "wrong_section": ("data", {"_target_": "genflow.nets.UNet"}, "data"),
        # a resolver would build the target dict after any check of the stored values
        "interpolation": ("model.S_noise", "${oc.decode:'{_target_: builtins.open, _args_: [" + v + ", w]}'}",
                          "model.S_noise"),
    }


def poison(src, dst: Path, key: str, value) -> Path:
    """A copy of checkpoint ``src`` whose stored training config holds ``value`` at ``key`` (written with
    torch.save as plain containers: it still loads with weights_only=True)."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    node = ckpt["hyper_parameters"]["config"]
    *parents, last = key.split(".")
    for name in parents:
        node = node[name]
    node[last] = value
    torch.save(ckpt, dst)
    assert torch.load(dst, map_location="cpu", weights_only=True)["hyper_parameters"]["config"]
    return dst


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_bytes(VICTIM_BYTES)
    return path


def untouched(victim: Path, target: Path) -> None:
    assert victim.read_bytes() == VICTIM_BYTES
    assert not target.exists() and not target.is_symlink()


def refused(result, key: str) -> None:
    code, out, err = result
    assert code == 2, (out, err)
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert key in err.splitlines()[0], err
    assert "why:" in err and "fix:" in err


@pytest.mark.parametrize("name", list(payloads(Path("v"), Path("t"))))
def test_sample_refuses_a_checkpoint_that_names_other_code(name, trained_run, victim, tmp_path, cli):
    target = tmp_path / "written.pth"
    key, value, where = payloads(victim, target)[name]
    bad = poison(trained_run["checkpoint"], tmp_path / "bad.ckpt", key, value)
    refused(cli("sample.py", f"ckpt={bad}", "num=2", "steps=2", f"out={tmp_path / 'out'}"), where)
    untouched(victim, target)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["open", "in_a_list"])
def test_evaluate_refuses_it(name, trained_run, victim, tmp_path, cli):
    target = tmp_path / "written.pth"
    key, value, where = payloads(victim, target)[name]
    bad = poison(trained_run["checkpoint"], tmp_path / "bad.ckpt", key, value)
    refused(cli("genflow.apps.evaluate", f"ckpt={bad}", "fid.num=4", f"out={tmp_path / 'out.json'}"), where)
    untouched(victim, target)
    assert not (tmp_path / "out.json").exists()


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("name", ["copyfile", "in_a_list"])
def test_resuming_a_run_folder_refuses_it(name, trained_run, victim, tmp_path, cli):
    target = tmp_path / "written.pth"
    key, value, where = payloads(victim, target)[name]
    run = tmp_path / "run"
    shutil.copytree(trained_run["run_dir"], run)
    last = run / "checkpoints" / "last.ckpt"
    poison(last, last, key, value)  # the newest checkpoint of the folder, which ckpt_path=last resumes
    before = snapshot(run)
    refused(cli("train.py", "ckpt_path=last", f"hydra.run.dir={run}", "trainer.max_steps=12"), where)
    untouched(victim, target)
    assert snapshot(run) == before  # no file of the run folder written, removed or added


@pytest.mark.parametrize("name", ["symlink", "in_args"])
def test_init_from_refuses_it(name, trained_run, victim, tmp_path, cli):
    target = tmp_path / "written.pth"
    key, value, where = payloads(victim, target)[name]
    bad = poison(trained_run["checkpoint"], tmp_path / "bad.ckpt", key, value)
    refused(cli("train.py", f"init_from={bad}", f"hydra.run.dir={tmp_path / 'new'}", "trainer.max_steps=1"), where)
    untouched(victim, target)
    assert not (tmp_path / "new").exists()


def leaderboard(cli, tmp_path, suite: str):
    """The leaderboard on a suite file from the user's search path (as a downloaded suite would be used)."""
    (tmp_path / "lb" / "suite").mkdir(parents=True, exist_ok=True)
    (tmp_path / "lb" / "suite" / "downloaded.yaml").write_text(suite)
    return cli("genflow.apps.leaderboard", f"hydra.searchpath=[file://{tmp_path / 'lb'}]", "suite=downloaded",
               f"out={tmp_path / 'board'}")


def test_leaderboard_refuses_a_suite_checkpoint_that_names_other_code(trained_run, victim, tmp_path, cli):
    target = tmp_path / "written.pth"
    key, value, where = payloads(victim, target)["savetxt"]
    bad = poison(trained_run["checkpoint"], tmp_path / "bad.ckpt", key, value)
    refused(leaderboard(cli, tmp_path, f"entries:\n  - {{name: shared, ckpt: {bad}, steps: 2}}\n"), where)
    untouched(victim, target)
    assert not (tmp_path / "board").exists()


def test_leaderboard_refuses_suite_overrides_that_name_other_code(victim, tmp_path, cli):
    target = tmp_path / "written.pth"
    entry = "  - name: trained\n    method: edm\n    dataset: digits\n    budget: {steps: 1}\n    overrides: [%s]\n"
    first = "  - {name: harmless, method: edm, dataset: digits, budget: {steps: 1}}\n"  # nothing trains before the check
    cases = [(f"\"+model.S_noise={{_target_: builtins.open, _args_: ['{victim}', w]}}\"", "model.S_noise"),
             (f"\"+net.extra=[1, {{_target_: shutil.copyfile, _args_: ['{victim}', '{target}']}}]\"", "net.extra[1]"),
             (f"\"hydra.searchpath=[file://{tmp_path}]\"", "hydra.searchpath")]
    for override, where in cases:
        refused(leaderboard(cli, tmp_path, "entries:\n" + first + entry % override), where)
        untouched(victim, target)
        assert not (tmp_path / "board").exists()


def test_a_suite_cannot_reach_outside_its_section(victim, tmp_path, cli):
    """Hydra builds hydra.callbacks before the app starts: a suite with a ``@package _global_`` header that sets
    one is refused when the command line is checked, before Hydra runs."""
    suite = ("# @package _global_\nhydra:\n  callbacks:\n    evil:\n      _target_: builtins.open\n"
             f"      _args_: ['{victim}', w]\nsuite:\n  entries:\n    - {{name: x, ckpt: {tmp_path / 'none.ckpt'}}}\n")
    refused(leaderboard(cli, tmp_path, suite), "hydra.callbacks.evil")
    assert victim.read_bytes() == VICTIM_BYTES
    assert not (tmp_path / "board").exists()


def test_a_normal_checkpoint_still_samples(trained_run, tmp_path, cli):
    code, out, err = cli("sample.py", f"ckpt={trained_run['checkpoint']}", "num=2", "steps=2", f"out={tmp_path}")
    assert code == 0, err
    assert (tmp_path / "samples.npz").is_file()


def test_a_stored_config_written_as_yaml_text_is_refused(trained_run, victim, tmp_path, cli):
    """OmegaConf.create parses a string as yaml: a config stored as text could hide its targets from a check
    of the stored values."""
    ckpt = torch.load(trained_run["checkpoint"], map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["config"] = f"model: {{_target_: builtins.open, _args_: ['{victim}', w]}}"
    torch.save(ckpt, tmp_path / "text.ckpt")
    refused(cli("sample.py", f"ckpt={tmp_path / 'text.ckpt'}", f"out={tmp_path / 'out'}"), "not a mapping")
    assert victim.read_bytes() == VICTIM_BYTES


def test_the_registry_holds_genflow_code_only():
    table = registry.registry()
    every = set().union(*table.values())
    assert "genflow.methods.PFGMPP" in table["model"] and "genflow.nets.UNet" in table["net"]
    assert "genflow.data.Digits" in table["data"] and "torch.optim.AdamW" in table["optim"]
    assert "genflow.training.EDMEma" in table["callbacks"]
    assert all(t.startswith(("genflow.", "torch.optim.", "pytorch_lightning.")) for t in every), every
    stored = {"model": {"_target_": "genflow.methods.pfgmpp.PFGMPP", "D": 128},
              "net": {"_target_": "genflow.nets.UNet"}, "optim": {"_target_": "torch.optim.SGD", "_partial_": True},
              "callbacks": {"ema": {"_target_": "genflow.training.EDMEma"}}}
    registry.check_stored(stored, "ckpt=x")  # genflow's own targets pass, in either spelling
    for bad, where in [({"sample": {"_target_": "os.system"}}, "sample"), ({"model": {"_target_": 3}}, "model"),
                       ({"model": {"a": [[{"_target_": "posix.remove"}]]}}, "model.a[0][0]"),
                       ({"optim": {"_target_": "genflow.methods.EDM"}}, "optim")]:
        with pytest.raises(ConfigError, match=re.escape(f"ckpt=x: {where} names")):
            registry.check_stored(bad, "ckpt=x")


def test_the_users_own_method_is_allowed_through_their_search_path(trained_run, tmp_path, cli, monkeypatch):
    """A method of one's own: its config file on hydra.searchpath vouches for its class; without it, a
    checkpoint that names the class is refused like any other foreign code."""
    monkeypatch.setattr(registry, "_user_targets", set())
    package = tmp_path / "ext" / "my_safety_methods"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from genflow.methods import PFGMPP\n\n\nclass Mine(PFGMPP):\n"
                                         "    \"\"\"PFGM++ under another name.\"\"\"\n")
    (tmp_path / "configs" / "model").mkdir(parents=True)
    (tmp_path / "configs" / "model" / "mine.yaml").write_text("_target_: my_safety_methods.Mine\nD: 128\n")
    monkeypatch.syspath_prepend(str(tmp_path / "ext"))
    ckpt = poison(trained_run["checkpoint"], tmp_path / "mine.ckpt", "model._target_", "my_safety_methods.Mine")
    refused(cli("sample.py", f"ckpt={ckpt}", "num=2", "steps=2", f"out={tmp_path / 'a'}"), "model")
    code, out, err = cli("sample.py", f"hydra.searchpath=[file://{tmp_path / 'configs'}]", f"ckpt={ckpt}", "num=2",
                         "steps=2", f"out={tmp_path / 'b'}")
    assert code == 0, err
    assert (tmp_path / "b" / "samples.npz").is_file()


def test_what_the_command_line_types_is_trusted_and_a_suite_extends_nothing(monkeypatch):
    from genflow.config import compose

    monkeypatch.setattr(registry, "_user_targets", set())
    typed = ["+callbacks.mine._target_=my_pkg.Mine", "+model.extra={_target_: my_pkg.Extra, n: [1, {_target_: my_pkg.In}]}"]
    assert registry.typed_targets(typed) == {"my_pkg.Mine", "my_pkg.Extra", "my_pkg.In"}
    with registry.composing_a_file():
        compose(typed, validator=False)
    with pytest.raises(ConfigError, match="callbacks.mine names"):
        registry.check_stored({"callbacks": {"mine": {"_target_": "my_pkg.Mine"}}}, "ckpt=x")
    compose(typed, validator=False)
    registry.check_stored({"callbacks": {"mine": {"_target_": "my_pkg.Mine"}}, "model": {"_target_": "my_pkg.Extra"}},
                          "ckpt=x")


def test_search_path_folders_of_a_command_line(tmp_path):
    import genflow

    folders = registry.search_path_folders([f"hydra.searchpath=[file://{tmp_path},pkg://genflow]", "model=edm"])
    assert folders == [tmp_path, Path(genflow.__file__).parent]
    assert registry.search_path_folders(["model=edm"]) == []


def test_a_checkpoint_recording_the_runs_own_callbacks_passes():
    """Checkpoints written while the EMA and the checkpoints were config callbacks record them there; the run
    builds them itself now, and the registry still knows them (a foreign callback is still refused)."""
    from genflow import registry
    from genflow.config import compose, to_container
    from genflow.errors import ConfigError

    cfg = to_container(compose([], validator=False))
    cfg["callbacks"]["ema"] = {"_target_": "genflow.training.EDMEma", "halflife_kimg": 25.0, "rampup": 0.05}
    cfg["callbacks"]["checkpoint"] = {"_target_": "genflow.training.resume.RunCheckpoint", "dirpath": "checkpoints"}
    registry.check_stored(cfg, "old.ckpt")
    cfg["callbacks"]["x"] = {"_target_": "shutil.copyfile", "src": "a", "dst": "b"}
    with pytest.raises(ConfigError):
        registry.check_stored(cfg, "old.ckpt")
