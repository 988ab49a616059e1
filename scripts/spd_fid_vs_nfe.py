"""FID vs NFE on digits: SPD and the isotropic DDPM baseline, trained at equal budget, sampled with the
paper's ancestral sampler (T steps) and with the probability-flow ODE at NFE <= 100.

    python scripts/spd_fid_vs_nfe.py --out outputs/spd_fid_vs_nfe [--train-steps 3000] [--T 1000]
        [--num 2000] [--ode-steps 5 10 25 50] [--solvers heun euler] [--models spd ddpm]
        [--ode-grid uniform|karras] [--set trainer.accelerator=gpu ...]

Each model is trained with genflow's own training run (configs/train.yaml + overrides, same net, data,
optimiser, seed and number of steps), then scored with the digits FID (the datamodule's feature
extractor, reference = training set). Prints a markdown table and one JSON line, writes
OUT/fid_vs_nfe.{json,png}. The acceptance check: for SPD, the best ODE FID at NFE <= 100 is within
10% of the ancestral FID.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from genflow.config import module_from_checkpoint
from genflow.metrics import evaluate_fid

from digits_runs import add_run_arguments, train_model

MODELS = {"spd": ["model=spd"], "ddpm": ["model=ddpm", "model.schedule=linear"],
          "ddpm_cosine": ["model=ddpm", "model.schedule=cosine"]}


def score(module, dm, *, solver: str, steps: int, args) -> dict:
    start = time.perf_counter()
    fid = evaluate_fid(module, dm, num=args.num, steps=steps, solver=solver, batch_size=args.batch_size,
                       seed_start=args.seed_start)
    nfe = module.method.nfe(steps, solver)  # an adaptive solver's is measured by the FID run itself
    return {"solver": solver, "steps": steps, "nfe": nfe if nfe is not None else fid["fid_nfe"], "fid": fid["fid"], "images": fid["fid_images"],
            "wall_s": round(time.perf_counter() - start, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/spd_fid_vs_nfe")
    p.add_argument("--models", nargs="+", default=["spd", "ddpm"], choices=sorted(MODELS))
    p.add_argument("--train-steps", type=int, default=3000)
    p.add_argument("--T", type=int, default=1000)
    p.add_argument("--num", type=int, default=2000, help="generated images per FID")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--ode-steps", type=int, nargs="+", default=[5, 10, 25, 50])
    p.add_argument("--solvers", nargs="+", default=["heun", "euler"], choices=["heun", "euler", "dopri5"])
    p.add_argument("--ode-grid", default=None, choices=["uniform", "karras"])
    add_run_arguments(p)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for name in args.models:
        ckpt = train_model(name, [*MODELS[name], f"model.T={args.T}",
                                  *(["model.ode_grid=" + args.ode_grid] if args.ode_grid else [])], args, out)
        # the ODE grid is a sampling choice: it can differ from the one stored with the checkpoint
        grid = [f"model.ode_grid={args.ode_grid}"] if args.ode_grid else []
        module, dm, _ = module_from_checkpoint(ckpt, grid, device=args.device)
        rows.append({"model": name, **score(module, dm, solver="ancestral", steps=args.T, args=args)})
        for solver in args.solvers:
            for steps in ([1] if solver == "dopri5" else args.ode_steps):
                if (module.method.nfe(steps, solver) or 0) > 100:
                    continue
                rows.append({"model": name, **score(module, dm, solver=solver, steps=steps, args=args)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    checks = {}
    for name in args.models:
        anc = next(r["fid"] for r in rows if r["model"] == name and r["solver"] == "ancestral")
        ode = [r for r in rows if r["model"] == name and r["solver"] != "ancestral" and r["nfe"] <= 100]
        best = min(ode, key=lambda r: r["fid"]) if ode else None
        checks[name] = {"ancestral_fid": anc, "best_ode": best,
                        "ode_within_10pct": bool(best and best["fid"] <= 1.1 * anc)}

    print("| model | sampler | steps | NFE | FID |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['solver']} | {r['steps']} | {r['nfe']} | {r['fid']:.3f} |")
    plot_path = plot(rows, out / "fid_vs_nfe.png")
    result = {"rows": rows, "checks": checks, "plot": str(plot_path), "train_steps": args.train_steps, "T": args.T,
              "num": args.num, "device": args.device}
    (out / "fid_vs_nfe.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


def plot(rows: list[dict], path: Path) -> Path:
    from genflow.viz import agg_figure

    fig = agg_figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    for i, name in enumerate(dict.fromkeys(r["model"] for r in rows)):
        color = f"C{i}"
        anc = next(r for r in rows if r["model"] == name and r["solver"] == "ancestral")
        ax.axhline(anc["fid"], color=color, ls="--", lw=1, label=f"{name} ancestral (NFE {anc['nfe']})")
        ax.axhspan(anc["fid"], 1.1 * anc["fid"], color=color, alpha=0.08)
        for solver, marker in (("heun", "o"), ("euler", "s"), ("dopri5", "*")):
            pts = sorted((r["nfe"], r["fid"]) for r in rows if r["model"] == name and r["solver"] == solver)
            if pts:
                ax.plot(*zip(*pts), marker=marker, color=color, label=f"{name} {solver} (PF-ODE)")
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="digits FID",
           title="FID vs NFE (shaded: within 10% of the ancestral FID)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    main()
