"""Benchmark: cross-view (3D) vs per-view (2D) attention in MultiViewUNet, train-step time and peak memory.

``python -m genflow.apps.bench what=multiview [objects=8] [views=[4,8]] [steps=10] [stage=2] [device=cpu]``

Each (attention, V) point builds the stage config (EDM + MultiViewUNet + toy multi-view data, the
reference frame included at stage 2), then times full training steps (loss, backward, Adam). Peak
memory: on CUDA ``max_memory_allocated``; on CPU the peak resident set of a fresh subprocess that
runs only that point, minus its resident set before the first step (the allocator's high-water
mark of the step itself, approximately).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

from genflow.devices import device_name


def _memory_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (``VmRSS``: resident now, ``VmHWM``: its peak), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_point(mode: str, views: int, objects: int, resolution: int, stage: int, steps: int, warmup: int,
              device: str, threads: int) -> dict:
    """Time ``steps`` training steps of one configuration in this process."""
    from genflow.config import build, compose

    torch.set_num_threads(threads)
    dev = torch.device(device)
    cfg = compose([f"experiment=isotropic3d_stage{stage}", f"data.views={views}", f"data.resolution={resolution}",
                   f"data.num_objects={max(objects, 8)}", "data.val_fraction=0", f"net.attention={mode}"])
    module, dm = build(cfg, prepare=False)
    net, method = module.net.to(dev).train(), module.method.to(dev)
    x = dm.train_tensor()[:objects].to(dev)
    cond = {k: v[:objects].to(dev) for k, v in dm.train_cond().items()}
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step():
        loss = method.loss(net, x, cond).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    base = _memory_mb("VmRSS")
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    times.sort()
    frames = views + (1 if stage >= 2 else 0)
    out = {"attention": mode, "views": views, "frames": frames, "objects": objects, "resolution": resolution,
           "step_ms_median": round(1000 * times[len(times) // 2], 1), "step_ms_min": round(1000 * times[0], 1),
           "views_per_s": round(objects * views / times[len(times) // 2], 1)}
    if dev.type == "cuda":
        out["peak_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    else:
        out["peak_rss_mb"] = round(_memory_mb("VmHWM"), 1)
        out["rss_before_mb"] = round(base, 1)
    return out


def bench_multiview(args) -> dict:
    """Entry point used by ``python -m genflow.apps.bench multiview``; returns the JSON-able result."""

    opts = args  # objects=, views=, modes=, resolution=, stage= of configs/bench.yaml
    steps, warmup = getattr(args, "steps", 10), getattr(args, "warmup", 2)
    # the count genflow.apps.bench chose (threads=, OMP_NUM_THREADS or the CPUs free), passed on to each point's process
    device, threads = getattr(args, "device", "cpu"), getattr(args, "threads", None) or torch.get_num_threads()
    points = []
    for v in [int(s) for s in opts.views.split(",")]:
        for mode in opts.modes.split(","):
            kw = dict(mode=mode, views=v, objects=opts.objects, resolution=opts.resolution, stage=opts.stage,
                      steps=steps, warmup=warmup, device=device, threads=threads)
            if torch.device(device).type == "cuda":
                points.append(run_point(**kw))
                continue
            # a fresh process per point so the CPU peak RSS belongs to that configuration alone
            code = ("import json,sys; from genflow.apps.bench_multiview import run_point; "
                    "print(json.dumps(run_point(**json.loads(sys.argv[1]))))")
            res = subprocess.run([sys.executable, "-c", code, json.dumps(kw)], capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"benchmark point {kw} failed:\n{res.stderr[-2000:]}")
            points.append(json.loads(res.stdout.strip().splitlines()[-1]))
    by = {(p["attention"], p["views"]): p for p in points}
    ratios = {f"V={v}": round(by[("3d", v)]["step_ms_median"] / by[("2d", v)]["step_ms_median"], 2)
              for (_, v) in by if ("3d", v) in by and ("2d", v) in by}
    return {"bench": "multiview", "device": device_name(torch.device(device)), "stage": opts.stage,
            "points": points, "time_ratio_3d_over_2d": ratios}
