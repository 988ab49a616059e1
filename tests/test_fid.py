"""digits-FID, the FID training callback, sharding over processes, per-seed generation."""
import os
import socket

import pytest
import pytorch_lightning as pl
import torch

from genflow.data import Digits
from genflow.errors import ConfigError
from genflow.methods import EDM
from genflow.metrics import DigitsFeatures, FeatureStats, FIDEvaluator, evaluate_fid, extract_features
from genflow.nets import UNet
from genflow.training import EDMEma, GenerativeModule
from genflow.training.fid import FIDCallback

STEPS = 60  # a model "trained a little"


@pytest.fixture(scope="module")
def digits():
    dm = Digits(batch_size=32)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def digits_stats(digits):
    ext = DigitsFeatures()
    return ext, extract_features(ext, digits.train_tensor()), extract_features(ext, digits.val_tensor())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    """A tiny EDM UNet trained for STEPS steps with EMA, FID every 25 steps (and at the end) and best-FID
    checkpoints."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    root = tmp_path_factory.mktemp("run")
    pl.seed_everything(0, verbose=False)
    net = UNet(data_shape=(1, 8, 8), preset="unet_tiny")
    module = GenerativeModule(net, EDM(), lr=3e-3, warmup_steps=10)
    fid_cb = FIDCallback(every_n_steps=25, num=120, steps=5, batch_size=64, cache_dir=str(root / "refs"))
    best = ModelCheckpoint(monitor="val/fid", mode="min", save_top_k=1, every_n_train_steps=25,
                           filename="best_fid_{step}")
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=str(root),
                         callbacks=[EDMEma(halflife_kimg=1, rampup=0.05, batch_size=32), fid_cb, best])
    trainer.fit(module, datamodule=digits)
    return module, fid_cb, best, trainer, root


def test_shipped_digits_classifier_fits_the_data(digits, digits_stats):
    """assets/digits_classifier.safetensors classifies the held-out split (it was never trained on it)."""
    ext = digits_stats[0]
    with torch.no_grad():
        pred = ext.classifier(digits.val_tensor()).argmax(1)
    assert (pred == digits._val.labels).float().mean() > 0.95
    assert ext(digits.val_tensor()[:5]).shape == (5, ext.dim)


def test_digits_fid_orders_data_model_noise(digits, digits_stats, trained):
    """train vs held-out is small, train vs uniform noise is large, a briefly trained model is between."""
    ext, train, val = digits_stats
    fid_val = train.frechet_distance(val.mean, val.cov)
    g = torch.Generator().manual_seed(0)
    noise = extract_features(ext, torch.rand(len(digits.val_tensor()), 1, 8, 8, generator=g) * 2 - 1)
    fid_noise = train.frechet_distance(noise.mean, noise.cov)
    module, *_ = trained
    # same number of images as the held-out split, so the finite-sample bias is the same
    fid_model = evaluate_fid(module, digits, num=len(digits.val_tensor()), steps=5, batch_size=90,
                             cache_dir=str(trained[-1] / "refs"))["fid"]
    assert fid_val < 10 and fid_noise > 60
    assert 2 * fid_val < fid_model < fid_noise


def test_callback_logs_fid_and_keeps_best_checkpoint(digits, trained):
    module, fid_cb, best, trainer, root = trained
    steps = [h["step"] for h in fid_cb.history]
    assert steps == [25, 50, 60]  # every 25 steps, plus once at the end
    assert all(h["val/fid_images"] == 120 for h in fid_cb.history)
    best_value = min(h["val/fid"] for h in fid_cb.history[:2])  # ModelCheckpoint sees the periodic ones
    assert best.best_model_score is not None
    assert float(best.best_model_score) == pytest.approx(best_value, rel=1e-5)
    assert os.path.dirname(best.best_model_path) == str(root / "checkpoints")
    # the end-of-training value reaches callback_metrics (Lightning forbids self.log in on_train_end)
    assert float(trainer.callback_metrics["val/fid"]) == pytest.approx(fid_cb.history[-1]["val/fid"], rel=1e-6)
    # the callback scored the EMA weights: EDMEma copies them into the module at the end of fit
    again = evaluate_fid(module, digits, num=120, steps=5, batch_size=50, cache_dir=str(root / "refs"))
    assert again["fid"] == pytest.approx(fid_cb.history[-1]["val/fid"], rel=1e-4)
    # reference statistics were computed once and cached under a content hash
    assert len(list((root / "refs").glob("digits_train_1x8x8_digits-*.npz"))) == 1


def test_fid_independent_of_batch_size_and_seed_sets(digits, trained, one_thread):
    module, *_, root = trained
    kw = dict(num=40, steps=3, cache_dir=str(root / "refs"))
    a = evaluate_fid(module, digits, batch_size=40, **kw)
    b = evaluate_fid(module, digits, batch_size=7, **kw)
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-5)
    three = evaluate_fid(module, digits, batch_size=40, seed_sets=3, **kw)
    assert three["fid_sets"][0] == pytest.approx(a["fid"], rel=1e-5)
    assert three["fid"] == min(three["fid_sets"]) and len(set(three["fid_sets"])) == 3
    # the measured network evaluations per image equal Heun's closed form (2 steps - 1, EDM's last step)
    assert a["fid_nfe"] == b["fid_nfe"] == three["fid_nfe"] == 2 * 3 - 1 == module.method.nfe(3, "heun")


def test_kid_and_time_limit(digits, trained):
    module, *_, root = trained
    ev = FIDEvaluator(digits, kid=True, kid_subset_size=50, cache_dir=str(root / "refs"))
    out = evaluate_fid(module, digits, num=60, steps=3, batch_size=30, evaluator=ev)
    assert "kid" in out and out["kid"] > 0
    # a zero time budget stops after the first batch and scores what was made
    cut = evaluate_fid(module, digits, num=60, steps=3, batch_size=30, time_limit=0.0,
                       cache_dir=str(root / "refs"))
    assert cut["fid_images"] == 30


def test_bad_fid_settings_fail_early(digits, tmp_path, monkeypatch):
    monkeypatch.delenv("GENFLOW_INCEPTION", raising=False)
    monkeypatch.setenv("GENFLOW_METRICS_HOME", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(ConfigError, match="inception-2015-12-05.pt"):
        FIDEvaluator(digits, extractor="inception").build_extractor()
    with pytest.raises(ConfigError, match="KID needs reference features"):
        FIDEvaluator(digits, kid=True, ref=str(tmp_path / "x.npz"))
    with pytest.raises(ConfigError, match="every_n_steps"):
        FIDCallback(every_n_steps=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, state, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        net = UNet(data_shape=(1, 8, 8), preset="unet_tiny")
        net.load_state_dict(state)
        dm = Digits()
        ev = FIDEvaluator(dm, cache_dir=os.environ["GENFLOW_TEST_REFS"], kid=True, kid_subset_size=50)
        stats = ev.sample_stats(EDM(), net.eval(), range(50), (1, 8, 8), steps=3, batch_size=16)
        queue.put((rank, stats.n, ev.score(stats)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_equal_one(digits, trained, monkeypatch, one_thread):
    import torch.multiprocessing as mp

    module, *_, root = trained
    monkeypatch.setenv("GENFLOW_TEST_REFS", str(root / "refs"))
    state = {k: v.clone() for k, v in module.net.state_dict().items()}
    # KID over one subset of all 50 images: gathered from both ranks, it must equal one process's
    single = FIDEvaluator(digits, cache_dir=str(root / "refs"), kid=True, kid_subset_size=50)
    stats = single.sample_stats(EDM(), module.net.eval(), range(50), (1, 8, 8), steps=3, batch_size=16)
    expected = single.score(stats)
    ctx = mp.get_context("fork")  # the workers need no fresh interpreter (and no second Lightning import)
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, state, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert [n for _, n, _ in results] == [50, 50]  # every rank holds the all-reduced count
    for _, _, scores in results:
        assert scores["fid"] == pytest.approx(expected["fid"], rel=1e-5)
        assert scores["kid"] == pytest.approx(expected["kid"], rel=1e-5)


def test_feature_stats_all_reduce_is_noop_without_distributed():
    s = FeatureStats()
    s.update(torch.randn(10, 3))
    assert s.all_reduce() is s and s.n == 10


@pytest.fixture
def checkpoint(trained_ckpt, tmp_path):
    """The session's shared tiny model (tests/conftest.py, written by genflow.apps.train.train) and a folder for
    this test's files."""
    return trained_ckpt, tmp_path


def test_evaluate_cli_prints_one_json_line(checkpoint, capsys, monkeypatch):
    import json

    from genflow.apps.evaluate import main

    ckpt, root = checkpoint
    monkeypatch.setenv("GENFLOW_METRICS_HOME", str(root / "metrics"))
    capsys.readouterr()
    saved = root / "new" / "folder" / "fid.json"  # folders that do not exist yet are made
    out = main([f"ckpt={ckpt}", "fid.num=40", "fid.steps=3", "fid.seed_sets=2", "fid.batch_size=20", "device=cpu",
                f"out={saved}"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line) == out == json.loads(saved.read_text())
    assert out["fid_images"] == 40 and len(out["fid_sets"]) == 2 and out["fid"] == min(out["fid_sets"])
    assert out["nfe"] == 5 and out["model"] == "pfgmpp" and out["net"] == "unet_tiny" and out["fid_extractor"] == "digits"
    # the same seeds through the library call give the same number
    from genflow.config import module_from_checkpoint

    module, dm, _ = module_from_checkpoint(ckpt)
    direct = evaluate_fid(module, dm, num=40, steps=3, batch_size=40)
    assert direct["fid"] == pytest.approx(out["fid_sets"][0], rel=1e-5)
    # nll=true merges genflow.likelihood.evaluate_nll's keys into the same line
    both = main([f"ckpt={ckpt}", "nll=true", "nll_num=4", "nll_solver=rk4", "nll_steps=3", "device=cpu"])
    assert "fid" not in both and any(k.startswith("bpd") for k in both)
    with pytest.raises(ConfigError, match="nmu"):
        main([f"ckpt={ckpt}", "fid.nmu=10"])
