"""Throughput benchmarks, printed as one JSON line each (never timed tests). Options are key=value
(configs/bench.yaml; ``--help`` lists them all):

    python -m genflow.apps.bench what=train-step [model=pfgmpp] [net=unet_digits] [data=digits] [batch=128]
        [steps=20] [device=cpu|cuda] [precision=fp32|bf16] [threads=N] [shape=[3,32,32]] [compile=true]
        [channels_last=true] [matmul_precision=highest|high|medium] [ema=false]
    python -m genflow.apps.bench what=sample [same options] [sample_steps=18] [num=256]
    python -m genflow.apps.bench what=gpu-suite [device=cuda] [net=ddpmpp_cifar10] [shape=[3,32,32]] [ablation=true]
    python -m genflow.apps.bench what=table table=GPU_SUITE.jsonl   (the suite's lines as a markdown table)
    python -m genflow.apps.bench what=fid        (feature extraction vs clean-fid; genflow.apps.bench_fid)
    python -m genflow.apps.bench what=multiview  (3D vs 2D attention; genflow.apps.bench_multiview)

``shape=[C,H,W]`` benchmarks on random data of that shape (no dataset needed), e.g.
``net=ddpmpp_cifar10 shape=[3,32,32]`` for the CIFAR-10 network.

The training step is the one ``train.py`` runs: the method's loss on ``GenerativeModule``'s training
network (compiled with ``compile=true``), bf16 autocast with ``precision=bf16``, backward, the fused
gradient sanitisation, the module's own optimizer (fused Adam on CUDA) and the EMA update (``ema=false``
leaves it out). MFU = (FLOPs of one training step per image, counted once with
``torch.utils.flop_counter.FlopCounterMode``, x images/s) / the device's dense bf16 tensor-core peak
(``PEAK_BF16_FLOPS``; the same denominator for fp32 runs, so the figures compare); null where the
device is not in the table (any CPU).

``gpu-suite`` measures the GPU figures of docs/benchmarks.md on one GPU in a few minutes, one JSON line per figure:
training step fp32 / bf16 / bf16 with the levers of ``trainer=gpu``; sampling fp32 / bf16 (18 Heun
steps); the time to generate and score 50 000 images for FID, extrapolated from a measured chunk; the
feature extractor's throughput (the Inception file when present, else a stand-in network, said so); then
the levers one at a time on top of bf16 (channels-last alone; with ``ablation=true`` the compiled step
without channels-last too), so one call says which levers ``trainer=gpu`` should keep.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from genflow.devices import device_name

#: dense (no sparsity) bf16 tensor-core peak, FLOP/s, by device-name substring (first match wins). The H200
#: figure is the one genflow's MFU goal is stated against; H100 SXM is NVIDIA's 989 TFLOP/s.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H200", 790e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
]


def peak_bf16_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def _shape(args) -> tuple[int, ...] | None:
    return tuple(int(s) for s in args.shape.split(",")) if getattr(args, "shape", None) else None


def build_for_bench(args):
    """(module, data_shape, a batch of training data on ``args.device``)."""
    from genflow.config import build, build_method, compose, instantiate
    from genflow.training import GenerativeModule

    shape = _shape(args)
    overrides = [f"model={args.model}", f"data={args.data}", f"data.batch_size={args.batch}"]
    if args.net:
        overrides.append(f"net={args.net}")
    overrides += args.override
    cfg = compose(overrides)
    device = torch.device(args.device)
    if shape is None:
        module, dm = build(cfg)
        dm.setup()
        x = dm.train_tensor()[: args.batch]
        x = x.repeat(-(-args.batch // x.shape[0]), *[1] * (x.ndim - 1))[: args.batch]
        shape = tuple(dm.data_shape)
    else:  # random data of the given shape: the network and method only, no dataset
        net = instantiate(cfg.net, data_shape=shape, num_classes=0)
        module = GenerativeModule(net, build_method(cfg), lr=1e-4)
        x = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    return module.to(device), shape, x.to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def _environment(device) -> dict:
    return {"torch": torch.__version__, "device": device_name(device)}


def train_step_flops(module, x: torch.Tensor, precision: str) -> float:
    """FLOPs of one training step (forward + backward of the method's loss) per image, counted once."""
    from torch.utils.flop_counter import FlopCounterMode

    sample = x[: min(4, x.shape[0])]
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = module.method.loss(module.net, sample, None).mean()
        loss.backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops() / sample.shape[0]


def bench_train_step(args) -> dict:
    from genflow.training.module import sanitize_gradients, speed_settings

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    module, shape, x = build_for_bench(args)
    module.train()
    # the FLOPs do not depend on the precision or the levers: gpu-suite counts them once for its three steps
    flops = getattr(args, "flops_per_img", None) or train_step_flops(module, x, args.precision)
    speed_settings(module, matmul_precision=args.matmul_precision, channels_last=args.channels_last,
                   compile=args.compile_backend if args.compile else False)
    opt = module.configure_optimizers()["optimizer"]
    params = [p for p in module.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params] if args.ema else None
    use_bf16 = args.precision == "bf16"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = module.method.loss(module._training_net(), x, None).mean()
        loss.backward()
        sanitize_gradients([p.grad for p in params if p.grad is not None])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1e-3)

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    wall = time.perf_counter() - start
    img_per_s = args.batch * args.steps / wall
    peak = peak_bf16_flops(device)
    return {"bench": "train-step", "model": args.model, "net": args.net or f"{args.data}_default",
            "data_shape": list(shape), "batch": args.batch, "precision": args.precision,
            "matmul_precision": args.matmul_precision, "compile": args.compile_backend if args.compile else False,
            "channels_last": bool(args.channels_last), "ema": bool(args.ema),
            "optimizer": "fused adam" if opt.defaults.get("fused") else "foreach adam",
            "ms_per_step": round(1000 * wall / args.steps, 2), "img_per_s": round(img_per_s, 1),
            "flops_per_img": float(f"{flops:.4g}"), "tflops_per_s": round(flops * img_per_s / 1e12, 2),
            "mfu": round(flops * img_per_s / peak, 4) if peak else None,
            "mfu_peak": f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else None,
            "warmup_s": round(warmup_s, 1),
            "params_M": round(sum(p.numel() for p in module.net.parameters()) / 1e6, 3),
            "peak_mem_MB": _peak_mb(device), **_environment(device)}


def bench_sample(args) -> dict:
    from genflow.sampling import generate

    from genflow.training.module import speed_settings

    device = torch.device(args.device)
    module, shape, _ = build_for_bench(args)
    speed_settings(module, matmul_precision=args.matmul_precision)
    module.eval()
    seeds = list(range(args.num))
    kwargs = dict(steps=args.sample_steps, solver=args.solver, batch_size=args.batch, device=device,
                  precision=args.precision)
    generate(module.method, module.net, seeds[: min(args.batch, args.num)], shape, **kwargs)  # warm-up
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    generate(module.method, module.net, seeds, shape, **kwargs)
    _sync(device)
    wall = time.perf_counter() - start
    return {"bench": "sample", "model": args.model, "net": args.net or f"{args.data}_default", "num": args.num,
            "batch": args.batch, "steps": args.sample_steps, "nfe": module.method.nfe(args.sample_steps, args.solver),
            "solver": args.solver, "precision": args.precision, "matmul_precision": args.matmul_precision,
            "img_per_s": round(args.num / wall, 2), "s_total": round(wall, 3),
            "ms_per_nfe": round(1000 * wall / module.method.nfe(args.sample_steps, args.solver)
                                / -(-args.num // args.batch), 2),
            "peak_mem_MB": _peak_mb(device), **_environment(device)}


def bench_extractor(args, images: torch.Tensor) -> dict:
    """Throughput of the FID feature extractor (clean mode, resizer on CPU threads) on generated images."""
    from genflow.apps.bench_fid import _standin_folder
    from genflow.errors import ConfigError
    from genflow.metrics.features import InceptionFeatures, resolve_inception_path

    device = images.device
    try:
        path, network = resolve_inception_path(getattr(args, "inception", None)), "inception-2015-12-05"
    except ConfigError:
        path, network = _standin_folder(), "torchscript stand-in (inception-2015-12-05.pt not found)"
    extractor = InceptionFeatures(path, mode="clean").to(device)
    extractor(images[:2])
    _sync(device)
    start = time.perf_counter()
    for i in range(0, images.shape[0], args.batch):
        extractor(images[i:i + args.batch])
    _sync(device)
    wall = time.perf_counter() - start
    return {"bench": "fid-extractor", "network": network, "mode": "clean", "num": images.shape[0],
            "resolution": list(images.shape[1:]), "img_per_s": round(images.shape[0] / wall, 1),
            "cpu_threads": torch.get_num_threads(), **_environment(device)}


def bench_gpu_suite(args) -> list[dict]:
    """The GPU figures, one JSON line each (see the module docstring)."""
    from genflow.sampling import generate

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: the GPU suite needs a CUDA device and none is visible\n"
              "  why: it measures training, sampling and FID throughput on the GPU\n"
              "  fix: run it on a machine with a GPU (scripts/gpu_check.sh), or "
              "`python -m genflow.apps.bench what=gpu-suite device=cpu` for a small smoke run", file=sys.stderr)
        raise SystemExit(2)
    results = []

    def emit(result: dict) -> None:
        results.append(result)
        print(json.dumps(result), flush=True)

    def variant(**changes):
        return argparse.Namespace(**{**vars(args), **changes})

    # 1. training step: the table (EDM: fp32 249 img/s, its --fp16 1652 img/s on one H200)
    emit(bench_train_step(variant(precision="fp32", matmul_precision="highest", compile=False, channels_last=False)))
    flops = results[-1]["flops_per_img"]
    emit(bench_train_step(variant(precision="bf16", matmul_precision="highest", compile=False, channels_last=False,
                                  flops_per_img=flops)))
    emit(bench_train_step(variant(precision="bf16", matmul_precision="high", compile=True, channels_last=True,
                                  flops_per_img=flops)))
    # 2. sampling, 18 Heun steps (NFE 35): EDM's generate.py makes 12.6 img/s in fp32 on one H200
    for precision in ("fp32", "bf16"):
        emit(bench_sample(variant(precision=precision, matmul_precision="highest", batch=args.sample_batch)))
    # 3. FID: generate and score a measured chunk in fp32 (the protocol), extrapolate to 50 000 images
    module, shape, _ = build_for_bench(variant(batch=args.sample_batch))
    module.eval()
    seeds = list(range(args.fid_chunk))
    kwargs = dict(steps=args.sample_steps, solver=args.solver, batch_size=args.sample_batch, device=device)
    generate(module.method, module.net, seeds[: args.sample_batch], shape, **kwargs)  # warm-up (cuDNN autotune)
    _sync(device)
    start = time.perf_counter()
    images = generate(module.method, module.net, seeds, shape, **kwargs)
    _sync(device)
    generate_s = time.perf_counter() - start
    extractor = bench_extractor(variant(batch=args.sample_batch), images)
    per_image = generate_s / len(seeds) + 1.0 / extractor["img_per_s"]
    emit({"bench": "fid-50k", "precision": "fp32", "steps": args.sample_steps,
          "nfe": module.method.nfe(args.sample_steps, args.solver), "measured_images": len(seeds),
          "generate_img_per_s": round(len(seeds) / generate_s, 2), "extractor_img_per_s": extractor["img_per_s"],
          "extractor_network": extractor["network"], "extrapolated_50k_s": round(50000 * per_image, 1),
          "bottleneck": "extractor" if 1.0 / extractor["img_per_s"] > generate_s / len(seeds) else "generation",
          **_environment(device)})
    # 4. the feature extractor alone, on more images than one sampling batch
    reps = max(1, args.extractor_num // images.shape[0])
    emit(bench_extractor(args, images.repeat(reps, *[1] * (images.ndim - 1))))
    # 5. each lever of trainer=gpu alone on top of bf16 (last: the figures above are out if time runs short);
    # channels-last is cheap, a second compilation is not, so that one only with ablation=true
    emit(bench_train_step(variant(precision="bf16", matmul_precision="high", compile=False, channels_last=True,
                                  flops_per_img=flops)))
    if args.ablation:
        emit(bench_train_step(variant(precision="bf16", matmul_precision="high", compile=True, channels_last=False,
                                      flops_per_img=flops)))
    return results


#: measurements of NVlabs EDM's train.py on one H200 (torch 2.11, DDPM++ CIFAR-10, batch 256): its fp32 step
#: (TF32 off), its own --fp16 step (set against our bf16 rows) and generate.py's fp32 sampling, 18 Heun steps
EDM_H200 = {("train-step", "fp32"): "249", ("train-step", "bf16"): "1652 (its fp16)", ("sample", "fp32"): "12.6"}


def _settings(row: dict) -> str:
    if row["bench"] == "train-step":
        levers = [row["precision"], "compiled" if row["compile"] else "eager",
                  "channels-last" if row["channels_last"] else "NCHW", f"matmul {row['matmul_precision']}",
                  row["optimizer"], f"batch {row['batch']}"]
        return ", ".join(levers)
    if row["bench"] == "sample":
        return f"{row['precision']}, {row['solver']} {row['steps']} steps (NFE {row['nfe']}), batch {row['batch']}"
    if row["bench"] == "fid-50k":
        return (f"{row['precision']}, generate + extract, 50 000 images in {row['extrapolated_50k_s']:.0f} s "
                f"(from {row['measured_images']}; bottleneck: {row['bottleneck']})")
    return f"{row['mode']} mode, {row['network']}, {row['cpu_threads']} CPU threads for the resizer"


def _edm_setting(row: dict) -> bool:
    """Whether EDM's figures apply: the issue's network and batch on an H200."""
    return row.get("net") == "ddpmpp_cifar10" and row.get("batch") == 256 and "H200" in row.get("device", "")


def markdown_table(rows: list[dict]) -> str:
    """The suite's JSON lines as the README's Benchmarks table (with the measured figures of NVlabs EDM beside ours)."""
    lines = ["| figure | settings | img/s | ms/step | MFU | peak MB | EDM, one H200 |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        img_per_s = row.get("img_per_s") or (round(50000 / row["extrapolated_50k_s"], 1)
                                             if row["bench"] == "fid-50k" else None)
        mfu = f"{100 * row['mfu']:.1f} %" if row.get("mfu") is not None else ""
        cells = [row["bench"], _settings(row), img_per_s, row.get("ms_per_step", ""), mfu, row.get("peak_mem_MB") or "",
                 EDM_H200.get((row["bench"], row.get("precision")), "") if _edm_setting(row) else ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if rows:
        lines.append(f"\n{rows[0]['device']}, torch {rows[0]['torch']}")
    return "\n".join(lines) + "\n"


def print_table(args) -> str:
    path = args.table
    if path is None:
        from genflow.errors import config_error

        raise config_error("what=table needs table=GPU_SUITE.jsonl", "the table is made from gpu-suite's JSON lines",
                           "python -m genflow.apps.bench what=table table=gpu_check/gpu_suite.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.startswith("{")]
    table = markdown_table(rows)
    print(table, end="")
    return table


WHAT = ("train-step", "sample", "gpu-suite", "fid", "multiview", "table")


def options_of(cfg) -> argparse.Namespace:
    """The benchmark's options as attributes (``args.batch``); lists of the command line as the functions
    read them (shape "3,32,32", views "4,8")."""
    from omegaconf import OmegaConf

    opts = OmegaConf.to_container(cfg, resolve=True)
    for key in ("shape", "views", "modes"):
        if isinstance(opts.get(key), list):
            opts[key] = ",".join(str(v) for v in opts[key])
    return argparse.Namespace(**opts)


def main(argv=None):
    from genflow.config import MATMUL_PRECISIONS, PRECISION, Bool, Int, Spec, Str, plain_app

    schema = {"what": Str(choices=WHAT), "model": Str(null=True), "net": Str(null=True), "data": Str(),
              "shape": Spec(object, null=True), "batch": Int(1, null=True), "steps": Int(1), "warmup": Int(0),
              "sample_steps": Int(1), "solver": Str(), "num": Int(1), "device": Str(null=True),
              "precision": PRECISION, "matmul_precision": Str(choices=MATMUL_PRECISIONS),
              "compile": Bool(), "compile_backend": Str(), "channels_last": Bool(), "ema": Bool(),
              "sample_batch": Int(1), "fid_chunk": Int(1), "extractor_num": Int(1), "ablation": Bool(),
              "inception": Str(null=True), "threads": Int(1, null=True), "override": Spec(object),
              "table": Str(null=True), "res": Int(8), "objects": Int(1), "views": Spec(object), "modes": Spec(object),
              "resolution": Int(8), "stage": Int(choices=(1, 2))}
    cfg, _ = plain_app("bench", sys.argv[1:] if argv is None else argv, __doc__, schema=schema)
    args = options_of(cfg)
    if args.what == "table":
        return print_table(args)
    suite = args.what == "gpu-suite"
    if suite and args.net is None:
        args.net, args.shape = "ddpmpp_cifar10", args.shape or "3,32,32"
    args.model = args.model or ("edm" if suite else "pfgmpp")
    args.batch = args.batch or (256 if suite else 128)
    args.device = args.device or ("cuda" if suite or torch.cuda.is_available() else "cpu")
    from genflow.threads import configure_threads

    print(f"bench: {configure_threads(args.threads)}", file=sys.stderr, flush=True)
    if args.what == "fid":
        from genflow.apps.bench_fid import bench_fid as fn
    elif args.what == "multiview":
        from genflow.apps.bench_multiview import bench_multiview as fn
    else:
        fn = {"train-step": bench_train_step, "sample": bench_sample, "gpu-suite": bench_gpu_suite}[args.what]
    result = fn(args)
    if not suite:
        print(json.dumps(result), flush=True)
    return result


def cli() -> None:
    """The ``genflow-bench`` console script and ``python -m genflow.apps.bench``."""
    from genflow.config import run_plain
    from genflow.progress import Phase

    run_plain(main, phase=Phase("benchmarking", "the lines above are what was measured", "run the same command "
                                "again for the rest"))


if __name__ == "__main__":
    cli()
