"""Multi-view consistency on the toy set: generated views vs ground-truth renders of the same object.

For held-out toy objects the model sees only what inference gets (the lossy image embedding and
the V target cameras, plus, where asked, the clean reference view) and samples V views; each view is
compared with the true render from that camera (per-view MSE and PSNR, images in [-1, 1]). Because
the embedding keeps only the mean colour and silhouette, matching the per-face colours needs the
reference (stage 2) and agreeing views need cross-view (3D) attention.

Two ways to get models:
  * ``--ckpt-3d A.ckpt --ckpt-2d B.ckpt``: stage-2 checkpoints from train.py (net.attention=3d / 2d);
  * default: trains both here (stage-2 nets with the reference dropped half the time, so one model
    serves "with" and "without reference"), ``--train-steps`` Adam steps each.

    python scripts/isotropic3d_consistency.py --train-steps 1500 --objects 32
Ends with one JSON line; ``--markdown`` also prints the table.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genflow.data.multiview import MultiView  # noqa: E402
from genflow.methods.edm import EDM  # noqa: E402
from genflow.nets.multiview import MultiViewUNet  # noqa: E402


def train_net(dm: MultiView, attention: str, steps: int, seed: int, batch: int = 16) -> MultiViewUNet:
    torch.manual_seed(seed)
    net = MultiViewUNet(data_shape=dm.data_shape, embedding_dim=dm.embedding_dim, model_channels=32,
                        channel_mult=(1, 2), attn_resolutions=(dm.resolution, dm.resolution // 2),
                        channels_per_head=16, attention=attention, p_drop_emb=0.1, p_drop_ref=0.5)
    edm = EDM()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    x, cond = dm.train_tensor(), dm.train_cond()
    g = torch.Generator().manual_seed(seed)
    net.train()
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = edm.loss(net, x[idx], {k: v[idx] for k, v in cond.items()}).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


def load_net(path: str) -> MultiViewUNet:
    from genflow.config import module_from_checkpoint

    module, _, _ = module_from_checkpoint(path)
    return module.net.eval()


@torch.no_grad()
def evaluate(net: MultiViewUNet, dm: MultiView, objects: int, steps: int, guidance: float, with_ref: bool) -> dict:
    edm = EDM()
    x = dm.val_tensor()[:objects]
    cond = {k: v[:objects] for k, v in dm.val_cond().items()}
    if not with_ref:
        cond = {k: v for k, v in cond.items() if not k.startswith("reference")}
    gens = [torch.Generator().manual_seed(i) for i in range(x.shape[0])]
    noise = edm.prior_sample(x.shape, generator=gens)
    out = edm.sample(net, noise, steps=steps, cond=cond, guidance=guidance).clamp(-1, 1)
    mse = ((out - x) ** 2).flatten(2).mean(2)                       # (objects, V)
    per_view = mse.mean(0)
    psnr = 10 * torch.log10(4.0 / per_view)                           # peak-to-peak range 2 in [-1, 1]
    return {"mse_per_view": [round(v, 4) for v in per_view.tolist()], "mse": round(mse.mean().item(), 4),
            "mse_se": round((mse.mean(1).std() / math.sqrt(mse.shape[0])).item(), 4),
            "psnr_per_view": [round(v, 2) for v in psnr.tolist()]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-3d")
    p.add_argument("--ckpt-2d")
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--num-objects", type=int, default=512, help="toy set size (15%% held out)")
    p.add_argument("--resolution", type=int, default=8)
    p.add_argument("--objects", type=int, default=32, help="held-out objects to evaluate")
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dm = MultiView(num_objects=a.num_objects, resolution=a.resolution, val_fraction=0.15)
    dm.setup()
    start = time.perf_counter()
    results = {}
    for mode, ckpt in (("3d", a.ckpt_3d), ("2d", a.ckpt_2d)):
        net = load_net(ckpt) if ckpt else train_net(dm, mode, a.train_steps, a.seed)
        if ckpt and net.attention_mode != mode:
            raise SystemExit(f"error: --ckpt-{mode} holds a net with attention={net.attention_mode}")
        for with_ref in (True, False):
            results[f"{mode}/{'ref' if with_ref else 'no-ref'}"] = evaluate(net, dm, a.objects, a.steps, a.guidance,
                                                                            with_ref)
    summary = {"script": "isotropic3d_consistency", "train_steps": 0 if a.ckpt_3d else a.train_steps,
               "resolution": a.resolution, "objects": a.objects, "sampler_steps": a.steps, "guidance": a.guidance,
               "wall_s": round(time.perf_counter() - start, 1), "results": results}
    if a.markdown:
        print("| attention | reference | MSE (± s.e.) | PSNR per view (dB) |")
        print("|---|---|---|---|")
        for key, r in results.items():
            mode, ref = key.split("/")
            label = "yes" if ref == "ref" else "no (the paper's inference setting)"
            print(f"| {mode} | {label} | {r['mse']:.4f} ± {r['mse_se']:.4f} | "
                  f"{', '.join(f'{v:.1f}' for v in r['psnr_per_view'])} |")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
