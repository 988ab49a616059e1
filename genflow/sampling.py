"""Seeded generation shared by sample.py, the training callbacks and evaluation.

Image i is drawn from its own generator seeded with ``seeds[i]`` (prior, class label, sampler noise), so it
is identical whatever the batch size or the number of processes: the protocol of EDM's
``generate.py --seeds=0-49999``.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from genflow.methods.base import Method


def parse_seeds(spec: str | int | Sequence[int]) -> list[int]:
    """'0-63' -> [0..63], '1,5,9-11' -> [1,5,9,10,11], 7 -> [7]."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        return [spec]
    if not isinstance(spec, str):
        if not isinstance(spec, (list, tuple)):
            raise ValueError(f"seed {spec!r} is not a whole number")
        for s in spec:
            if isinstance(s, bool) or not isinstance(s, (int, str)):
                raise ValueError(f"seed {s!r} is not a whole number")
        return [int(s) for s in spec]
    seeds: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part[1:]:
            lo, hi = part.split("-", 1)
            if int(hi) < int(lo):
                raise ValueError(f"seed range {part!r} runs backwards; write it as low-high, e.g. 0-63")
            seeds.extend(range(int(lo), int(hi) + 1))
        else:
            seeds.append(int(part))
    if not seeds:
        raise ValueError(f"no seeds in {spec!r}; use e.g. seeds=0-63")
    return seeds


PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        from genflow.errors import config_error

        raise config_error(f"unknown sampling precision {precision!r}",
                           "the network runs either in float32 (the papers' protocol) or in bfloat16 autocast",
                           f"use precision={' or precision='.join(PRECISIONS)}")
    return precision


def sample_conditions(datamodule, seeds: Sequence[int], device) -> dict | None:
    """The conditioning for each seed where the datamodule has its own rule (multi-view: a held-out
    object), else None; class labels are drawn by ``generate`` from each seed's generator."""
    if hasattr(datamodule, "sample_cond"):
        return datamodule.sample_cond(seeds, device)
    return None


def draw_labels(generators: Sequence[torch.Generator], num_classes: int, class_label: int | None = None,
                device=None) -> dict:
    """One class per image drawn from its own generator (EDM's generate.py: right after the latents), as
    {"class": one-hot (B, num_classes)}; ``class_label`` replaces every draw (``--class=K``), the draw
    still made so that the sampler noise drawn after it is generate.py's."""
    labels = torch.stack([torch.randint(num_classes, size=(), generator=g, device=device) for g in generators])
    if class_label is not None:
        labels = torch.full_like(labels, int(class_label))
    return {"class": torch.nn.functional.one_hot(labels, num_classes).float()}


def _select(cond: dict | None, lo: int, hi: int) -> dict | None:
    return None if cond is None else {k: v[lo:hi] for k, v in cond.items()}


@torch.no_grad()
def generate(method: Method, net: Callable, seeds: Sequence[int], shape: Sequence[int], *, steps: int = 18,
             solver: str = "heun", cond: dict | None = None, guidance: float | None = None,
             batch_size: int = 256, device=None, progress: bool = False, precision: str = "fp32",
             solver_options: dict | None = None, counts: dict | None = None, num_classes: int = 0,
             class_label: int | None = None, on_batch: Callable[[Sequence[int], Tensor], None] | None = None
             ) -> Tensor | None:
    """Generate ``len(seeds)`` samples of ``shape`` (no batch dim); returns them on ``device``.

    ``precision`` is the network's arithmetic: ``fp32`` (EDM's protocol, the default wherever numbers are
    compared with papers: TF32 is off for matmuls and convolutions, whatever trainer.matmul_precision set)
    or ``bf16`` (autocast; an explicit, faster choice). The sampler state stays float64.
    ``solver`` is any sampler ``method.solvers()`` offers; ``solver_options`` override the method's own
    (e.g. EDM's churn: {"S_churn": 40, ...}). Each image's generator also drives its sampler noise.
    ``num_classes``: a class-conditional network's classes; where ``cond`` gives no "class", each image's
    class is drawn from its generator right after its prior sample (``draw_labels``: generate.py's order of
    latents, label, sampler noise), or is ``class_label`` for every image.
    ``on_batch(seeds, samples)``, if given, receives each batch as it is done (to write it as it goes) and
    nothing is kept: ``generate`` then returns None.
    ``counts``, if given, accumulates ``images`` and ``evaluations`` (network evaluations the solves ran,
    ``Solution.nfe`` per image: a batch of an adaptive solver steps until its slowest image is done).
    """
    method.check_solver(solver, options=solver_options)
    device = torch.device(device or "cpu")
    seeds = list(seeds)
    use_autocast = check_precision(precision) == "bf16"
    chunks = range(0, len(seeds), batch_size)
    if progress:
        from genflow.progress import track

        chunks = track(chunks, description=f"sampling {len(seeds)} images")
    out = []
    for lo in chunks:
        batch = seeds[lo:lo + batch_size]
        gens = [torch.Generator(device).manual_seed(int(s)) for s in batch]
        noise = method.prior_sample((len(batch), *shape), generator=gens, device=device)
        batch_cond = _select(cond, lo, lo + len(batch))
        if num_classes and not (batch_cond and "class" in batch_cond):
            batch_cond = {**(batch_cond or {}), **draw_labels(gens, num_classes, class_label, device)}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast), full_fp32(not use_autocast):
            solution = method.solve(net, noise, steps=steps, solver=solver, cond=batch_cond,
                                    guidance=guidance, generator=gens, **(solver_options or {}))
        if counts is not None:
            counts["images"] = counts.get("images", 0) + len(batch)
            counts["evaluations"] = counts.get("evaluations", 0) + solution.nfe * len(batch)
        if on_batch is not None:
            on_batch(batch, solution.x.float())
        else:
            out.append(solution.x.float())
    return None if on_batch is not None else torch.cat(out)


def nfe_per_image(counts: dict) -> float | None:
    """Network evaluations per image from ``generate``'s ``counts`` (None before any image)."""
    return round(counts["evaluations"] / counts["images"], 2) if counts.get("images") else None


@contextmanager
def full_fp32(enabled: bool = True):
    """fp32 matmuls and convolutions without TF32 (cuDNN allows TF32 by default) inside the block."""
    if not enabled:
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.get_float32_matmul_precision()
    before = cudnn.allow_tf32
    try:
        cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        yield
    finally:
        cudnn.allow_tf32 = before
        torch.set_float32_matmul_precision(matmul)


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 with EDM's rounding: clip(127.5 x + 128, 0, 255); the one conversion used
    for PNGs, grids and FID features."""
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def save_grid(samples: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """A picture of the samples: an image grid for (N, C, H, W), one row per object for multi-view
    (N, V, C, H, W), a scatter plot for 2-D vectors, pairwise projections for other vectors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = samples.detach().cpu()  # uint8 images (read back from PNGs) are drawn as they are
    samples = samples if samples.dtype == torch.uint8 else samples.float()
    if samples.ndim in (4, 5):
        import torchvision

        if samples.ndim == 5:
            nrow = samples.shape[1]
            samples = samples.flatten(0, 1)
        nrow = nrow or max(1, int(len(samples) ** 0.5))
        images = samples if samples.dtype == torch.uint8 else to_uint8(samples)
        grid = torchvision.utils.make_grid(images, nrow=nrow, padding=1, pad_value=255)
        if grid.shape[-1] < 512:  # tiny images (8x8 digits) are upscaled so a person can see them
            scale = max(1, 512 // grid.shape[-1])
            grid = grid.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
        torchvision.io.write_png(grid, str(path))
        return path
    if samples.ndim == 2:
        from genflow.viz import agg_figure

        fig = agg_figure(figsize=(4, 4), dpi=100)
        ax = fig.subplots()
        ax.scatter(samples[:, 0], samples[:, 1 % samples.shape[1]], s=2, alpha=0.5)
        ax.set_aspect("equal")
        ax.set_title(f"{len(samples)} samples" + (" (dims 0, 1)" if samples.shape[1] > 2 else ""))
        fig.tight_layout()
        fig.savefig(path)
        return path
    raise ValueError(f"cannot draw samples of shape {tuple(samples.shape)}")
