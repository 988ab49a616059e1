"""Throughput benchmarks, printed as one JSON line each (never timed tests).

    python -m genflow.bench train-step [--model pfgmpp] [--net unet_digits] [--data digits] [--batch 128]
                                       [--steps 20] [--device cpu|cuda] [--precision fp32|bf16] [--threads N]
    python -m genflow.bench sample     [same options] [--sample-steps 18] [--num 256]
    python -m genflow.bench fid        (feature extraction vs clean-fid; genflow.bench_fid)
    python -m genflow.bench multiview  (3D vs 2D attention; genflow.bench_multiview)
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def build_for_bench(args):
    from genflow.config import build, compose

    overrides = [f"model={args.model}", f"data={args.data}", f"data.batch_size={args.batch}"]
    if args.net:
        overrides.append(f"net={args.net}")
    overrides += args.override
    module, dm = build(compose(overrides))
    dm.setup()
    return module, dm


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def bench_train_step(args) -> dict:
    device = torch.device(args.device)
    module, dm = build_for_bench(args)
    module = module.to(device).train()
    x = dm.train_tensor()[: args.batch].to(device)
    reps = -(-args.batch // x.shape[0])
    x = x.repeat(reps, *[1] * (x.ndim - 1))[: args.batch]
    opt = torch.optim.Adam(module.parameters(), lr=1e-4)
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = module.method.loss(module.net, x, None).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    wall = time.perf_counter() - start
    return {"bench": "train-step", "model": args.model, "net": args.net or f"{args.data}_default",
            "data_shape": list(dm.data_shape), "batch": args.batch, "precision": args.precision,
            "ms_per_step": round(1000 * wall / args.steps, 2), "img_per_s": round(args.batch * args.steps / wall, 1),
            "params_M": round(sum(p.numel() for p in module.net.parameters()) / 1e6, 3),
            "peak_mem_MB": _peak_mb(device), "device": device_name(device)}


def bench_sample(args) -> dict:
    device = torch.device(args.device)
    module, dm = build_for_bench(args)
    module = module.to(device).eval()
    seeds = list(range(args.num))
    kwargs = dict(steps=args.sample_steps, solver=args.solver, batch_size=args.batch, device=device,
                  precision=args.precision)
    from genflow.sampling import generate

    generate(module.method, module.net, seeds[: min(args.batch, args.num)], dm.data_shape, **kwargs)  # warm-up
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    generate(module.method, module.net, seeds, dm.data_shape, **kwargs)
    _sync(device)
    wall = time.perf_counter() - start
    return {"bench": "sample", "model": args.model, "net": args.net or f"{args.data}_default", "num": args.num,
            "steps": args.sample_steps, "nfe": module.method.nfe(args.sample_steps, args.solver),
            "solver": args.solver, "img_per_s": round(args.num / wall, 2), "s_total": round(wall, 3),
            "peak_mem_MB": _peak_mb(device), "device": device_name(device)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m genflow.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["train-step", "sample", "fid", "multiview"])
    parser.add_argument("--model", default="pfgmpp")
    parser.add_argument("--net", default=None)
    parser.add_argument("--data", default="digits")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sample-steps", type=int, default=18)
    parser.add_argument("--solver", default="heun")
    parser.add_argument("--num", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: OMP_NUM_THREADS, else the CPUs available to the process)")
    parser.add_argument("--override", nargs="*", default=[], help="extra config overrides, e.g. D=2048")
    args, rest = parser.parse_known_args(argv)
    from genflow.threads import configure_threads

    print(f"bench: {configure_threads(args.threads)}", file=sys.stderr, flush=True)
    if args.what == "fid":
        from genflow.bench_fid import bench_fid as fn
    elif args.what == "multiview":
        from genflow.bench_multiview import bench_multiview as fn
    else:
        fn = {"train-step": bench_train_step, "sample": bench_sample}[args.what]
    args.rest = rest
    result = fn(args)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
