"""GPU-first behaviour checked on CPU and divergence handling.

The device tests use a stand-in for the accelerator: the strategy's root device is patched to ``meta`` after
``fit``, so post-training work that stays on the CPU is caught without a GPU.
"""
import copy
import json

import pytest
import torch

from genflow.config import build, compose, read_checkpoint
from genflow.errors import CheckpointError, ConfigError, TrainingDiverged
from genflow.apps.train import train
from genflow.training.module import check_finite_weights, sanitize_gradients

TINY = ["model=edm", "data=digits", "net=unet_tiny", "data.batch_size=16", "trainer.max_steps=4",
        "trainer.val_check_interval=2", "checkpoint.every_n_steps=2", "sample.num=4", "sample.steps=2",
        "optim.warmup_steps=2", "trainer.log_every_n_steps=2", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false"]


def _run(tmp_path, *extra, name="run"):
    return train(compose(TINY + list(extra) + [f"+run_dir={tmp_path / name}"]))


# --- 1. post-training work on the training device ---------------------------------------------------
def test_grid_fid_and_exports_run_on_the_strategy_root_device(tmp_path, monkeypatch):
    """Also: the progress bar never reads a device tensor per step, and trainer.compile/channels_last/
    matmul_precision are genflow's keys, not Lightning's."""
    import genflow.apps.train as run_mod
    import genflow.sampling as sampling
    from genflow.training import GenerativeModule

    seen = []

    def fake_generate(method, net, seeds, shape, *, device=None, precision="fp32", **kwargs):
        seen.append(("grid", torch.device(device).type, next(net.parameters()).device.type, precision))
        return torch.zeros(len(seeds), *shape)  # meta tensors hold no numbers to draw

    def fake_export(cfg, module, run_dir, keep=False):
        seen.append(("export", next(module.parameters()).device.type))
        return {}

    def fake_final_metrics(cfg, module, dm, partial=None):
        seen.append(("fid", module.device.type, next(module.parameters()).device.type))
        return {"fid": float("nan")}

    real_finish = run_mod.finish

    def finish_on_stand_in_device(cfg, trainer, module, *args, **kwargs):
        # what Lightning does on a GPU: fit ends with the module on the CPU while the strategy's device differs
        assert next(module.parameters()).device.type == "cpu"
        monkeypatch.setattr(type(trainer.strategy), "root_device", property(lambda self: torch.device("meta")))
        return real_finish(cfg, trainer, module, *args, **kwargs)

    logged = []
    real_log = GenerativeModule.log

    def spy_log(self, name, value, *args, prog_bar=False, **kwargs):
        if self.training:
            logged.append((self.global_step, name, prog_bar, value.device.type, value.requires_grad))
        return real_log(self, name, value, *args, prog_bar=prog_bar, **kwargs)

    monkeypatch.setattr(GenerativeModule, "log", spy_log)
    monkeypatch.setattr(sampling, "generate", fake_generate)
    monkeypatch.setattr(run_mod, "export_ema", fake_export)
    monkeypatch.setattr(run_mod, "final_metrics", fake_final_metrics)
    monkeypatch.setattr(run_mod, "finish", finish_on_stand_in_device)
    # genflow's own trainer keys must not reach pl.Trainer; the progress bar is on to watch what it reads
    result = _run(tmp_path, "sample.precision=bf16", "trainer.enable_progress_bar=true", "trainer.max_steps=6",
                  "trainer.log_every_n_steps=3", "trainer.val_check_interval=3", "checkpoint.every_n_steps=3",
                  "trainer.compile=false", "trainer.channels_last=true", "trainer.matmul_precision=highest")
    assert result["steps"] == 6 and result["train_img_per_s"] > 0
    # the loss reaches the progress bar as a host copy every 3 steps, never as a device tensor each step
    assert [(step, dev) for step, name, bar, dev, _ in logged if bar] == [(0, "cpu"), (3, "cpu")]
    assert all(not bar for _, name, bar, _, _ in logged if name == "train/loss")
    assert not any(req for *_, req in logged)
    assert [s[0] for s in seen] == ["grid", "export", "fid"]
    assert seen[0] == ("grid", "meta", "meta", "bf16")
    assert seen[1] == ("export", "meta") and seen[2] == ("fid", "meta", "meta")
    assert result["fid"] is None  # non-finite -> null
    json.dumps(result, allow_nan=False)  # valid JSON
    assert read_checkpoint(result["checkpoint"])  # written before the move, from real weights


def test_final_fid_gets_precision_and_device(monkeypatch):
    import genflow.apps.train as run_mod
    from genflow.apps.train import final_metrics

    cfg = compose(["model=edm", "data=digits", "net=unet_tiny", "fid.num=10", "sample.precision=bf16"])
    module, dm = build(cfg)
    calls = {}
    monkeypatch.setattr(run_mod, "evaluate_fid", lambda module, dm, **kw: calls.update(kw) or {"fid": 1.0})
    assert final_metrics(cfg, module, dm) == {"fid": 1.0}
    assert calls["precision"] == "bf16" and calls["device"] == module.device and calls["num"] == 10


# --- 2. precision is configuration ---------------------------------------------------------------
def test_precision_and_matmul_defaults_follow_the_papers():
    cfg = compose(["model=edm", "data=digits", "callbacks=fid"])
    assert cfg.sample.precision == "fp32" and cfg.callbacks.fid.precision == "fp32"
    assert cfg.trainer.matmul_precision == "highest" and cfg.trainer.compile is False
    assert compose(["sample.precision=bf16", "callbacks=fid"]).callbacks.fid.precision == "bf16"
    gpu = compose(["trainer=gpu"], environment=False).trainer  # composed without a GPU here
    assert gpu.precision == "bf16-mixed" and gpu.compile is True and gpu.channels_last is True
    for name in ("pfgmpp_cifar10_uncond", "pfgmpp_cifar10_cond", "edm_cifar10_uncond", "pfgmpp_ffhq64"):
        exp = compose([f"experiment={name}"], environment=False)
        assert exp.trainer.matmul_precision == "highest" and exp.sample.precision == "fp32", name


def test_matmul_precision_is_set_once_and_checked():
    from genflow.training.module import speed_settings

    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    cfg = compose(["model=edm", "data=digits", "net=unet_tiny"])
    module, _ = build(cfg)
    try:
        speed_settings(module, matmul_precision="high")
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        speed_settings(module, matmul_precision="highest")
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
        with pytest.raises(ConfigError, match="matmul_precision"):  # refused when composed, before any work
            compose(["model=edm", "data=digits", "net=unet_tiny", "trainer.matmul_precision=fast"])
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def test_fid_result_names_its_precision(tmp_path):
    from genflow.metrics import evaluate_fid

    cfg = compose(["model=edm", "data=digits", "net=unet_tiny"])
    module, dm = build(cfg)
    out = evaluate_fid(module, dm, num=8, steps=2, batch_size=8, precision="bf16", extractor="digits",
                       cache_dir=str(tmp_path))
    assert out["fid_precision"] == "bf16"
    with pytest.raises(ConfigError, match="precision"):
        evaluate_fid(module, dm, num=8, steps=2, precision="fp16", extractor="digits", cache_dir=str(tmp_path))


# --- 3. training-step levers keep the maths ------------------------------------------------------
def test_fused_gradient_sanitisation_equals_per_tensor_nan_to_num():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g, dtype=torch.float64),
             torch.randn(2, 8, 3, 3, generator=g).contiguous(memory_format=torch.channels_last),
             torch.randn(7, generator=g)]
    for t in grads:
        t[(t > 1.0)] = float("nan") if t.dtype == torch.float32 else float("inf")
        t[(t < -1.0)] = float("-inf")
    expected = [torch.nan_to_num(t, nan=0.0, posinf=1e5, neginf=-1e5) for t in grads]
    before = [t.data_ptr() for t in grads]
    sanitize_gradients(grads)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [t.data_ptr() for t in grads] == before and grads[2].is_contiguous(memory_format=torch.channels_last)


def _loss_and_grads(module, x, seed=0):
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = module.method.loss(module._training_net(), x, None).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_compiled_and_channels_last_training_step_keep_loss_gradients_and_checkpoint_keys():
    torch.manual_seed(0)
    cfg = compose(["model=edm", "data=digits", "net=unet_tiny"])
    module, dm = build(cfg)
    dm.setup()
    x = dm.train_tensor()[:8]
    keys = list(module.state_dict())
    loss0, grads0 = _loss_and_grads(module, x)

    module.compile_net = "aot_eager"  # dynamo + AOT autograd (the joint forward/backward graph); inductor: GPU tests
    ema_copy = copy.deepcopy(module)  # what the EMA callback does in setup, before the first step
    loss1, grads1 = _loss_and_grads(module, x)
    assert module._compiled_forward is not None
    assert list(module.state_dict()) == keys and not any("_orig_mod" in k for k in module.state_dict())
    assert "_compiled_forward" not in dict(module.named_modules())
    torch.testing.assert_close(loss1, loss0)
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], msg=n)
    # compiled lazily at the first step: the EMA copy holds no compiled forward bound to the live weights
    assert ema_copy._compiled_forward is None

    module.compile_net = False
    module.net.channels_last = True
    module.net.to(memory_format=torch.channels_last)
    loss2, grads2 = _loss_and_grads(module, x)
    torch.testing.assert_close(loss2, loss0, rtol=1e-5, atol=1e-6)
    for n in grads0:
        torch.testing.assert_close(grads2[n], grads0[n], rtol=1e-4, atol=1e-6, msg=n)


def test_compile_without_its_toolchain_is_refused_before_any_work(monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    compose(["trainer.compile=true"])  # this machine has a C++ compiler: accepted
    compose(["trainer.compile=aot_eager"])  # a backend by name

    def no_compiler():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(ConfigError, match="no C\\+\\+ compiler.*\n  why: .*\n  fix: .*trainer.compile=false"):
        compose(["trainer.compile=true"])
    compose(["trainer.compile=true"], environment=False)  # composing a GPU recipe elsewhere checks no toolchain


# --- divergence -------------------------------------------------------------------------------
@pytest.mark.parametrize("steps,every", [(6, 2), (3, 1000)], ids=["checkpoint-writes", "short-run"])
def test_divergence_stops_before_any_checkpoint(tmp_path, steps, every):
    with pytest.raises(TrainingDiverged, match="no checkpoint was written.*\n  why: .*\n  fix: "):
        _run(tmp_path, "optim.lr=1e6", "optim.warmup_steps=0", f"trainer.max_steps={steps}",
             f"checkpoint.every_n_steps={every}")
    ckpts = tmp_path / "run" / "checkpoints"
    assert not ckpts.exists() or not any(ckpts.iterdir())
    assert not (tmp_path / "run" / "ema.safetensors").exists()


def test_sample_refuses_non_finite_weights(tmp_path, cli):
    from genflow.config import to_container

    cfg = compose(["model=edm", "data=digits", "net=unet_tiny"])
    module, _ = build(cfg)
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": to_container(cfg)}}, good)
    ckpt = read_checkpoint(good)
    check_finite_weights(ckpt["state_dict"], "good")  # a healthy checkpoint passes
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and v.numel() > 1)
    ckpt["state_dict"][name].view(-1)[1] = float("nan")
    bad = tmp_path / "nan.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match=name):
        check_finite_weights(ckpt["state_dict"], str(bad))
    out = tmp_path / "samples"
    code, stdout, stderr = cli("sample.py", f"ckpt={bad}", f"out={out}", "num=2", "steps=2")
    assert code == 2 and "non-finite weights" in stderr and "fix:" in stderr and "Traceback" not in stderr
    assert not out.exists()


# --- 4. benchmarks ---------------------------------------------------------------------------------
def test_gpu_suite_refuses_without_a_gpu(monkeypatch, capsys):
    from genflow.apps import bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        bench.main(["what=gpu-suite"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "error:" in err and "why:" in err and "device=cpu" in err


def test_gpu_suite_smoke_on_cpu_reports_every_figure(monkeypatch, capsys):
    from genflow.apps import bench

    monkeypatch.setattr(bench, "peak_bf16_flops", lambda device: 1e12)  # a stand-in peak so MFU is computed
    results = bench.main(["what=gpu-suite", "device=cpu", "net=unet_tiny", "shape=[1,8,8]", "batch=4", "steps=1",
                          "warmup=1", "sample_batch=4", "num=4", "sample_steps=2", "fid_chunk=4", "extractor_num=4",
                          "compile_backend=eager", "ablation=true"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines == results
    assert [r["bench"] for r in results] == ["train-step"] * 3 + ["sample"] * 2 + ["fid-50k", "fid-extractor"] + \
        ["train-step"] * 2
    # the ablation: each lever of trainer=gpu alone on top of bf16
    assert [(r["precision"], r["compile"], r["channels_last"]) for r in results[7:]] == \
        [("bf16", False, True), ("bf16", "eager", False)]
    train_fp32, train_bf16, best = results[:3]
    assert (train_fp32["precision"], train_bf16["precision"], best["precision"]) == ("fp32", "bf16", "bf16")
    assert best["compile"] == "eager" and best["channels_last"] and best["matmul_precision"] == "high"
    for r in results[:3]:
        assert r["flops_per_img"] > 0 and r["img_per_s"] > 0
        assert r["mfu"] == pytest.approx(r["flops_per_img"] * r["img_per_s"] / 1e12, rel=1e-2, abs=1e-4)
    assert [r["precision"] for r in results[3:5]] == ["fp32", "bf16"] and results[3]["nfe"] == 3
    assert results[5]["extrapolated_50k_s"] > 0 and all(r["torch"] and r["device"] for r in results)
    # the README's table: one row per line, our figures in it, EDM's only for its setting (DDPM++, 256, H200)
    table = bench.markdown_table(results).splitlines()
    assert len([line for line in table if line.startswith("| ")]) == 1 + len(results)
    assert f"| {results[0]['img_per_s']} | {results[0]['ms_per_step']} |" in table[2] and table[2].endswith("|  |")
    edm_row = bench.markdown_table([{**results[0], "net": "ddpmpp_cifar10", "batch": 256, "device": "NVIDIA H200"}])
    assert edm_row.splitlines()[2].endswith("| 249 |")


def test_mfu_is_null_on_cpu():
    from genflow.apps.bench import peak_bf16_flops

    assert peak_bf16_flops(torch.device("cpu")) is None


def test_fp32_sampling_turns_tf32_off_and_restores_the_settings():
    from genflow.sampling import full_fp32

    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        with full_fp32():
            assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        with full_fp32(enabled=False):
            assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def test_fused_adam_only_where_lightning_can_clip_and_scale(monkeypatch):
    """A fused Adam unscales inside its step: Lightning then refuses gradient clipping, and a loss scaler would
    see the gradients only after the sanitisation. The CUDA rule is exercised here with CPU tensors (torch has a
    fused CPU Adam)."""
    import pytorch_lightning as pl

    import genflow.training.module as module_file
    from genflow.training.module import multi_tensor_options

    monkeypatch.setattr(module_file, "FUSED_DEVICES", ("cuda", "cpu"))
    module, dm = build(compose(["model=edm", "data=digits", "net=unet_tiny", "data.batch_size=8"]))
    for clip, fused in ((None, True), (1.0, False)):
        trainer = pl.Trainer(max_steps=2, precision="bf16-mixed", gradient_clip_val=clip, accelerator="cpu",
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0)
        trainer.fit(module, dm)
        assert trainer.global_step == 2 and bool(trainer.optimizers[0].defaults.get("fused")) is fused
    scaled = type("Trainer", (), {"gradient_clip_val": None,
                                  "precision_plugin": type("AMP", (), {"scaler": torch.amp.GradScaler("cpu")})()})()
    assert multi_tensor_options(list(module.parameters()), scaled) == {"foreach": True}
