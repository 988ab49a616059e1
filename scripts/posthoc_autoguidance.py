"""EDM2's post-hoc EMA and autoguidance on the bundled 8x8 digits, for EDM, PFGM++ D=128 and flow matching on
the kinetic-optimal path (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models",
CVPR 2024, Section 3; "Guiding a Diffusion Model with a Bad Version of Itself", NeurIPS 2024).

For each method the script trains, with the same seed (so the same raw weights at every step: an EMA never
feeds back into training),

* ``default``: net=unet_digits with genflow's default EMA (ema=edm),
* ``posthoc``: the same run with ema=posthoc (σ_rel 0.05 and 0.10, a snapshot every ``--snapshot-kimg``),
* ``guide``:   the small net=unet_tiny for a quarter of the steps (the "bad version" for autoguidance),

then scores with the digits-classifier FID (``python -m genflow.apps.evaluate``, the same seeds everywhere):
the default EMA; the post-hoc EMAs reconstructed at ``--sigma-rel`` (``python -m genflow.apps.posthoc``);
and autoguidance of the default-EMA model by the guide at each ``--w`` (``guide_ckpt=... fid.guidance=w``).

    python scripts/posthoc_autoguidance.py                       # runs in runs/posthoc_autoguidance
    python scripts/posthoc_autoguidance.py --train-only          # only the training (resumable)

Every command it runs is printed first. Finished runs and reconstructions are reused, so a second call only
evaluates. Writes ``<out>/results.json`` and the figure ``assets/posthoc_autoguidance.png``, prints a
markdown table, the CPU time spent, and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = {"EDM": ["model=edm"], "PFGM++ D=128": ["model=pfgmpp", "D=128"], "flow KO": ["model=flow", "path=ko"]}


def say(line: str) -> None:
    print(line, flush=True)


def train_run(folder: Path, overrides: list[str]) -> dict:
    from genflow.config import compose
    from genflow.apps.train import train
    from genflow.outputs import holds_run

    args = [*overrides, "logger=none", "trainer.enable_model_summary=false", "sample.num=16", f"+run_dir={folder}"]
    if holds_run(folder):
        args.append("ckpt_path=last")  # a finished run is a no-op; an interrupted one continues
    say("$ python train.py " + " ".join(map(shlex.quote, [a.replace("+run_dir=", "hydra.run.dir=") for a in args])))
    return train(compose(args))


def runs_of(args) -> dict[str, dict[str, tuple[Path, list[str]]]]:
    common = ["data=digits", f"data.batch_size={args.batch}", "seed=0", "checkpoint.every_n_steps=0"]
    out = {}
    for name, model in METHODS.items():
        slug = name.split()[0].lower().replace("+", "p")
        base = [*model, *common, f"trainer.max_steps={args.steps}"]
        out[name] = {
            "default": (args.out / slug / "default", [*base, "net=unet_digits"]),
            "posthoc": (args.out / slug / "posthoc", [*base, "net=unet_digits", "ema=posthoc",
                                                      f"ema.snapshot_kimg={args.snapshot_kimg}"]),
            "guide": (args.out / slug / "guide", [*model, *common, "net=unet_tiny",
                                                  f"trainer.max_steps={args.steps // 4}",
                                                  f"optim.warmup_steps={min(200, args.steps // 8)}"]),
        }
    return out


def fid(ckpt: Path, args, extra: list[str] = ()) -> float:
    from genflow.apps.evaluate import main as evaluate

    overrides = [f"ckpt={ckpt}", f"fid.num={args.fid_num}", f"fid.steps={args.fid_steps}", "fid.solver=heun",
                 "progress=false", *extra]
    say("$ python -m genflow.apps.evaluate " + " ".join(map(shlex.quote, overrides)))
    return float(evaluate(overrides)["fid"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/posthoc_autoguidance"))
    parser.add_argument("--steps", type=int, default=500, help="training steps of the good models")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--snapshot-kimg", type=float, default=1.6)
    parser.add_argument("--sigma-rel", default="0.02,0.035,0.05,0.07,0.10,0.14,0.20")
    parser.add_argument("--w", default="1.25,1.5,2,3")
    parser.add_argument("--fid-num", type=int, default=500)
    parser.add_argument("--fid-steps", type=int, default=10)
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure from <out>/results.json")
    args = parser.parse_args()
    if args.plot_only:
        results = json.loads((args.out / "results.json").read_text())
        figure(results, ROOT / "assets" / "posthoc_autoguidance.png")
        say(table(results))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    runs = runs_of(args)
    for method in runs.values():
        for folder, overrides in method.values():
            train_run(folder, overrides)
    cpu_train = time.process_time() - cpu0
    say(f"training: {cpu_train / 60:.1f} CPU min")
    if args.train_only:
        return

    from genflow.apps.posthoc import main as posthoc, output_path

    sigmas = [float(s) for s in args.sigma_rel.split(",")]
    ws = [float(w) for w in args.w.split(",")]
    results = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "methods": {}}
    for name, method in runs.items():
        default_ckpt = method["default"][0] / "checkpoints" / "final.ckpt"
        guide_ckpt = method["guide"][0] / "checkpoints" / "final.ckpt"
        folder = method["posthoc"][0]
        missing = [s for s in sigmas if not output_path(folder / "checkpoints", s, None).exists()]
        fits = {}
        if missing:
            cmd = [str(folder), "sigma_rel=" + ",".join(map(str, missing))]
            say("$ python -m genflow.apps.posthoc " + " ".join(cmd))
            fits = {c["sigma_rel"]: c["residual"] for c in posthoc(cmd)["checkpoints"]}
        row = {"default_ema": fid(default_ckpt, args), "posthoc": {}, "autoguidance": {}, "fit_residual": fits}
        for s in sigmas:
            row["posthoc"][s] = fid(output_path(folder / "checkpoints", s, None), args)
        row["autoguidance"][1.0] = row["default_ema"]
        for w in ws:
            row["autoguidance"][w] = fid(default_ckpt, args, [f"guide_ckpt={guide_ckpt}", f"fid.guidance={w}"])
        row["guide_alone"] = fid(guide_ckpt, args)
        results["methods"][name] = row
        say(json.dumps({name: row}))
    cpu_total = time.process_time() - cpu0
    results["cpu_min"] = {"train": round(cpu_train / 60, 2), "total": round(cpu_total / 60, 2)}
    results["wall_min"] = round((time.perf_counter() - wall0) / 60, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    figure(results, ROOT / "assets" / "posthoc_autoguidance.png")
    say(table(results))
    say(json.dumps({"results": str(args.out / "results.json"), **results["cpu_min"]}))


def table(results: dict) -> str:
    lines = ["| method | FID default EMA | best post-hoc σ_rel (FID) | best autoguidance w (FID) | guide alone |",
             "|---|---|---|---|---|"]
    for name, row in results["methods"].items():
        s, fs = min(row["posthoc"].items(), key=lambda kv: kv[1])
        w, fw = min(row["autoguidance"].items(), key=lambda kv: kv[1])
        lines.append(f"| {name} | {row['default_ema']:.2f} | {float(s):g} ({fs:.2f}) | {float(w):g} ({fw:.2f}) | "
                     f"{row['guide_alone']:.2f} |")
    return "\n".join(lines)


def figure(results: dict, path: Path) -> None:
    from genflow.viz import agg_figure

    fig = agg_figure(figsize=(10, 4), dpi=110)
    ax_s, ax_w = fig.subplots(1, 2)
    for name, row in results["methods"].items():
        (line,) = ax_s.plot([float(s) for s in row["posthoc"]], list(row["posthoc"].values()), "o-", label=name)
        ax_s.axhline(row["default_ema"], color=line.get_color(), ls=":", lw=1)
        ax_w.plot([float(w) for w in row["autoguidance"]], list(row["autoguidance"].values()), "o-", label=name)
    from matplotlib.ticker import FuncFormatter, NullFormatter

    widths = [float(s) for s in next(iter(results["methods"].values()))["posthoc"]]
    ax_s.set(xscale="log", xlabel="post-hoc EMA width σ_rel", ylabel="digits FID (log scale)",
             title="post-hoc EMA (dotted: default EMA)")
    ax_s.set_xticks(widths)
    ax_s.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_s.xaxis.set_minor_formatter(NullFormatter())
    ax_w.set(xlabel="autoguidance weight w (1 = no guidance)", ylabel="digits FID (log scale)",
             title="autoguidance by a small net, 1/4 of the steps")
    for ax in (ax_s, ax_w):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(round(v))[0] in "1235" else ""))
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()
