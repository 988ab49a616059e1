"""GPU tests: mixed-precision training, the real train.py path with a full-size net, seeded sampling,
and the GPU levers (fused Adam, compiled forward, fused gradient sanitisation) on CUDA. Skipped without a GPU;
scripts/gpu_check.sh runs them."""
import json

import pytest
import torch

from genflow.config import compose
from genflow.apps.train import train

pytestmark = pytest.mark.gpu

GPU = ["trainer=gpu", "trainer.max_steps=20", "trainer.val_check_interval=10", "checkpoint.every_n_steps=10",
       "sample.num=16", "sample.steps=4", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
       "trainer.benchmark=false", "trainer.compile=false"]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("model", ["pfgmpp", "edm"])
def test_mixed_precision_training(model, precision, tmp_path):
    cfg = compose([f"model={model}", "data=digits", "data.resolution=32", "net=unet_small", "data.batch_size=64",
                   f"trainer.precision={precision}", f"+run_dir={tmp_path}"] + GPU)
    result = train(cfg)
    assert result["steps"] == 20
    assert torch.isfinite(torch.tensor(result["train/loss"]))


def test_cuda_sampling_is_batch_invariant(tmp_path):
    from genflow.config import build
    from genflow.sampling import generate

    module, dm = build(compose(["model=pfgmpp", "data=digits", "data.resolution=32", "net=unet_small"]))
    module = module.cuda().eval()
    seeds = list(range(12))
    a = generate(module.method, module.net, seeds, dm.data_shape, steps=4, batch_size=12, device="cuda")
    b = generate(module.method, module.net, seeds, dm.data_shape, steps=4, batch_size=5, device="cuda")
    # bf16 autocast kernels may pick different algorithms per batch shape: compare at bf16 resolution
    torch.testing.assert_close(a, b, atol=2e-2, rtol=0)


def _write_images(folder, n=256, size=32):
    import torchvision

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        torchvision.io.write_png(torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8),
                                 str(folder / f"{i:04d}.png"))
    return folder


def test_train_py_full_size_net_on_gpu_keeps_post_training_work_on_the_gpu(tmp_path, cli, monkeypatch):
    """train.py trainer=gpu (bf16-mixed, compiled, channels-last) with DDPM++ CIFAR-10 (55.7 M) for a few steps:
    the grid after fit is generated on the GPU, and the JSON line is valid."""
    import genflow.sampling as sampling

    devices = []
    real_generate = sampling.generate

    def recording_generate(method, net, seeds, shape, **kwargs):
        devices.append((torch.device(kwargs.get("device")).type, next(net.parameters()).device.type))
        return real_generate(method, net, seeds, shape, **kwargs)

    monkeypatch.setattr(sampling, "generate", recording_generate)
    data = _write_images(tmp_path / "images")
    code, out, err = cli("train.py", "model=edm", "net=ddpmpp_cifar10", "data=imagefolder", f"data.root={data}",
                         "data.batch_size=64", "data.on_device=true", "trainer=gpu", "trainer.max_steps=30", "trainer.val_check_interval=1000",
                         "checkpoint.every_n_steps=15", "sample.num=16", "sample.steps=4",
                         "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps"] == 30 and result["train_img_per_s"] > 0
    assert devices and all(d == ("cuda", "cuda") for d in devices), devices


def test_gpu_levers_keep_the_maths():
    from genflow.config import build, compose
    from genflow.training.module import sanitize_gradients

    torch.manual_seed(0)
    module, dm = build(compose(["model=edm", "data=digits", "data.resolution=32", "net=unet_small"]))
    module = module.cuda()
    assert module.configure_optimizers()["optimizer"].defaults["fused"] is True
    grads = [torch.randn(1000, device="cuda") for _ in range(3)]
    grads[1][::7] = float("nan")
    grads[2][::5] = float("inf")
    expected = [torch.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5) for g in grads]
    sanitize_gradients(grads)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    dm.setup()
    x = dm.train_tensor()[:16].cuda()

    def loss_and_grads():
        module.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = module.method.loss(module._training_net(), x, None).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in module.parameters()]

    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    module.eval()  # no dropout: the compiled and eager forward see the same network
    loss0, grads0 = loss_and_grads()
    module.compile_net = True
    loss1, grads1 = loss_and_grads()
    assert not any("_orig_mod" in k for k in module.state_dict())
    torch.testing.assert_close(loss1, loss0, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sampling_precision_is_what_was_asked(precision):
    from genflow.config import build, compose
    from genflow.sampling import generate

    module, dm = build(compose(["model=edm", "data=digits", "data.resolution=32", "net=unet_small"]))
    net = module.cuda().eval().net
    dtypes = []
    hook = net.enc[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    generate(module.method, net, range(4), dm.data_shape, steps=2, device="cuda", precision=precision)
    hook.remove()
    assert set(dtypes) == {torch.bfloat16 if precision == "bf16" else torch.float32}


def test_data_on_device_gives_the_same_batches():
    from types import SimpleNamespace

    from genflow.data import Digits

    batches = []
    for on_device in (False, True):
        dm = Digits(batch_size=32, conditional=True, on_device=on_device)
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1, global_step=3,
                                     strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
        x, cond = next(iter(dm.train_dataloader()))
        assert x.is_cuda == on_device
        batches.append((x.cpu(), cond["class"].cpu()))
    torch.testing.assert_close(batches[0], batches[1], rtol=0, atol=0)
