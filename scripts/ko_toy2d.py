"""KO against Cond-OT flow matching on toy2d moons, checkerboard and circle, through the train and sample apps.

For each shape and path it runs what a user types (in-process, the same apps and configs):

    python train.py model=flow path=<ko|condot> data=toy2d data.shape=<shape> trainer.max_steps=1000 \\
        hydra.run.dir=OUT/<path>_<shape>
    python sample.py ckpt=OUT/<path>_<shape>/checkpoints/final.ckpt num=2000 solver=<s> steps=<n> \\
        out=OUT/<path>_<shape>/<s><n>

then scores the 2000 samples against 2000 fresh points of the shape (seed 12345): energy distance
(Szekely-Rizzo, 2 E|X-Y| - E|X-X'| - E|Y-Y'|) and sliced Wasserstein-2 (256 fixed directions), at Euler
NFE 4 and 8 and dopri5 (converged). Writes OUT/ko_toy2d.{json,png} (the figure: Euler NFE 4 samples),
prints a markdown table and one JSON line. A run whose final.ckpt exists is not trained again.

    python scripts/ko_toy2d.py --out outputs/ko_toy2d [--steps 1000] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from genflow.apps.sample import main as sample
from genflow.apps.train import train
from genflow.config import compose
from genflow.data.toy import sample_toy2d
from genflow.metrics.sliced import sliced_wasserstein

SHAPES = ("checkerboard", "moons", "circle")
PATHS = ("ko", "condot")
SOLVES = (("euler", 4), ("euler", 8), ("dopri5", 1))


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def run(path: str, shape: str, args) -> Path:
    run_dir = Path(args.out) / f"{path}_{shape}"
    ckpt = run_dir / "checkpoints" / "final.ckpt"
    if not ckpt.is_file():
        cfg = compose(["model=flow", f"path={path}", "data=toy2d", f"data.shape={shape}",
                       f"trainer.max_steps={args.steps}", f"seed={args.seed}", "trainer.enable_progress_bar=false"])
        OmegaConf.update(cfg, "run_dir", str(run_dir), force_add=True)
        train(cfg)
    return ckpt


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/ko_toy2d")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=int, default=2000)
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows, figure = [], {}
    for shape in SHAPES:
        fresh = sample_toy2d(shape, args.num, torch.Generator().manual_seed(12345))
        for path in PATHS:
            ckpt = run(path, shape, args)
            row = {"shape": shape, "path": path}
            for solver, steps in SOLVES:
                out = ckpt.parent.parent / f"{solver}{steps}"
                res = sample([f"ckpt={ckpt}", f"num={args.num}", f"solver={solver}", f"steps={steps}", f"out={out}"])
                x = torch.from_numpy(np.load(res["npz"])["samples"]).float()
                key = f"{solver}@{res['nfe']}" if solver != "dopri5" else "dopri5"
                row[key] = {"energy": round(energy_distance(x, fresh), 4),
                            "sw2": round(float(sliced_wasserstein(x, fresh, projections=256,
                                                                  generator=torch.Generator().manual_seed(3))), 4)}
                if (solver, steps) == SOLVES[0]:
                    figure[(shape, path)] = (x, row[key]["energy"])
            rows.append(row)
    # data against data: the floor of the distance at this sample size
    floor = {s: round(energy_distance(sample_toy2d(s, args.num, torch.Generator().manual_seed(999)),
                                      sample_toy2d(s, args.num, torch.Generator().manual_seed(12345))), 4)
             for s in SHAPES}
    keys = [k for k in rows[0] if k not in ("shape", "path")]
    lines = ["| data | path | " + " | ".join(f"energy dist., {k}" for k in keys) + " | data vs data |",
             "|---|---|" + "---|" * (len(keys) + 1)]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['path']} | " + " | ".join(f"{r[k]['energy']:.4f}" for k in keys)
                     + f" | {floor[r['shape']]:.4f} |")
    print("\n".join(lines))
    png = plot(figure, Path(args.out) / "ko_toy2d.png", args)
    result = {"experiment": "ko_toy2d", "train_steps": args.steps, "seed": args.seed, "num": args.num,
              "rows": rows, "data_vs_data_energy": floor, "figure": str(png),
              "seconds": round(time.perf_counter() - start, 1)}
    (Path(args.out) / "ko_toy2d.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


def plot(figure: dict, png: Path, args) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PATHS), len(SHAPES), figsize=(3 * len(SHAPES), 3 * len(PATHS)))
    names = {"ko": "kinetic-optimal", "condot": "Cond-OT"}
    for j, shape in enumerate(SHAPES):
        for i, path in enumerate(PATHS):
            x, dist = figure[(shape, path)]
            ax = axes[i, j]
            ax.scatter(x[:, 0], x[:, 1], s=0.5)
            ax.set(xlim=(-1.4, 1.4), ylim=(-1.4, 1.4), xticks=[], yticks=[], aspect="equal")
            ax.set_title(f"{names[path]}, {shape}\nenergy distance {dist:.4f}", fontsize=9)
    fig.suptitle(f"Euler, 4 steps, after {args.steps} training steps (train.py / sample.py defaults)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png


if __name__ == "__main__":
    main()
