"""Feature-extraction throughput: genflow's extractors vs clean-fid's own loop on the same images.

    python -m genflow.apps.bench fid [--num 256] [--batch 128] [--device cuda] [--inception PATH] [--res 32]

Both sides use the same TorchScript network (clean-fid's ``InceptionV3W``) and resizer; clean-fid's
``get_model_features`` resizes image by image in the main thread ('clean' mode) while genflow
resizes on a thread pool. Without the real ``inception-2015-12-05.pt`` a small TorchScript stand-in
with the same interface is used (the result says so): it measures the pipeline, not Inception's FLOPs.
"""
from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path

import torch

from genflow.devices import device_name


@functools.lru_cache(maxsize=None)  # one stand-in file per process
def _standin_folder() -> Path:
    from torch import nn

    class Layers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 32, 3, stride=2)
            self.fc = nn.Linear(32, 2048)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3))).reshape(x.shape[0], 2048, 1, 1)

    class StandIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            return self.layers((x - 128) / 128).reshape(x.shape[0], 2048)

    import warnings

    from genflow.metrics.features import INCEPTION_FILE

    folder = Path(tempfile.mkdtemp(prefix="genflow-bench-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(StandIn().eval()).save(str(folder / INCEPTION_FILE))
    return folder / INCEPTION_FILE


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_fid(args) -> dict:
    import warnings

    from cleanfid.fid import get_model_features
    from cleanfid.inception_torchscript import InceptionV3W

    from genflow.errors import ConfigError
    from genflow.metrics.features import DigitsFeatures, InceptionFeatures, resolve_inception_path
    from genflow.sampling import to_uint8

    extra = args  # inception=, res= of configs/bench.yaml
    device = torch.device(args.device)
    num = int(args.num)
    batch = min(int(args.batch), num)  # clean-fid's loop draws whole batches: none larger than the image count
    try:
        path, network = resolve_inception_path(extra.inception), "inception-2015-12-05"
    except ConfigError:
        path, network = _standin_folder(), "torchscript stand-in (real weights not found)"
    g = torch.Generator().manual_seed(0)
    images = torch.rand(num, 3, extra.res, extra.res, generator=g) * 2 - 1
    u8 = to_uint8(images).float()
    result = {"bench": "fid", "num": num, "batch": batch, "resolution": extra.res, "network": network,
              "device": device_name(device)}
    for mode in ("clean", "legacy_tensorflow"):
        ours = InceptionFeatures(path, mode=mode).to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            theirs = InceptionV3W(str(path.parent) if path.name == "inception-2015-12-05.pt" else str(ours.file.parent),
                                  download=False, resize_inside=(mode == "legacy_tensorflow")).to(device).eval()
        ours(images[:2])  # warm-up (TorchScript profiling runs, thread pool start)
        _sync(device)
        t = time.perf_counter()
        feats = torch.cat([ours(images[i:i + batch]) for i in range(0, num, batch)])
        _sync(device)
        t_ours = time.perf_counter() - t
        chunks = iter(range(0, num, batch))

        def gen(z):
            i = next(chunks)
            return u8[i:i + z.shape[0]]

        t = time.perf_counter()
        ref = get_model_features(gen, theirs, mode=mode, z_dim=1, num_gen=num, batch_size=batch, device=device,
                                 verbose=False)
        _sync(device)
        t_theirs = time.perf_counter() - t
        result[f"{mode}_genflow_img_per_s"] = round(num / t_ours, 1)
        result[f"{mode}_cleanfid_img_per_s"] = round(num / t_theirs, 1)
        result[f"{mode}_speedup"] = round(t_theirs / t_ours, 2)
        result[f"{mode}_max_abs_diff"] = float((feats.cpu() - torch.from_numpy(ref)).abs().max())
    digits = DigitsFeatures().to(device)
    x = torch.rand(max(num, 1024), 1, 8, 8, generator=g).to(device) * 2 - 1
    digits(x[:2])
    _sync(device)
    t = time.perf_counter()
    for i in range(0, x.shape[0], batch):
        digits(x[i:i + batch])
    _sync(device)
    result["digits_img_per_s"] = round(x.shape[0] / (time.perf_counter() - t), 1)
    return result
