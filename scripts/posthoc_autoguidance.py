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
    python scripts/posthoc_autoguidance.py --methods "flow KO"   # one method; the others' rows kept from --keep

Every command it runs is printed first. Finished runs and reconstructions are reused, so a second call only
evaluates. With ``--methods`` only the named methods are trained and scored; the rows of the other methods
are kept from ``--keep`` (a results.json of the same settings; by default ``<out>/results.json`` if it exists,
else the committed ``assets/posthoc_autoguidance.json``). Each row records the commit that measured it and its
CPU minutes. Writes ``<out>/results.json`` (and a copy to ``assets/posthoc_autoguidance.json``) and the figure ``assets/posthoc_autoguidance.png``, prints a
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


CODE_PATHS = ("genflow", "configs", "scripts", "train.py", "sample.py", "pyproject.toml")
SETTINGS_THAT_MATTER = ("steps", "batch", "snapshot_kimg", "sigma_rel", "w", "fid_num", "fid_steps")


def fail(what: str, why: str, fix: str) -> None:
    print(f"error: {what}\n  why: {why}\n  fix: {fix}", file=sys.stderr)
    raise SystemExit(2)


def commit_of_tree() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        # "+dirty" when code that decides the numbers differs from the commit (not docs or assets)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--",
                                *CODE_PATHS], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out + ("+dirty" if dirty else "")


def kept_rows(args, names: list[str]) -> dict:
    """The rows of the methods not rerun, from a results.json measured with the same settings."""
    if set(names) == set(METHODS):
        return {}
    keep = args.keep
    if keep is None:
        keep = args.out / "results.json"
        if not keep.exists():
            keep = ROOT / "assets" / "posthoc_autoguidance.json"
    if not keep.exists():
        fail(f"no results to keep the other methods' rows from ({keep})", "--methods reruns only some methods",
             "pass --keep RESULTS.json, or run every method")
    old = json.loads(keep.read_text())
    ours = {k: str(getattr(args, k)) for k in SETTINGS_THAT_MATTER}
    theirs = {k: str(old.get("settings", {}).get(k)) for k in SETTINGS_THAT_MATTER}
    if ours != theirs:
        diff = {k: (theirs[k], ours[k]) for k in ours if ours[k] != theirs[k]}
        fail(f"{keep} was measured with other settings: {diff}", "rows of one table must share one protocol",
             "pass the same settings, or run every method")
    missing = [m for m in METHODS if m not in names and m not in old.get("methods", {})]
    if missing:
        fail(f"{keep} has no rows for {missing}", "the table and figure show every method",
             "add them to --methods")
    return {"rows": {m: row for m, row in old["methods"].items() if m not in names},
            "cpu_min": old.get("cpu_min"), "from": shown(keep)}


def shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (results.json is committed as an asset)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


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


def runs_of(args, names: list[str]) -> dict[str, dict[str, tuple[Path, list[str]]]]:
    common = ["data=digits", f"data.batch_size={args.batch}", "seed=0", "checkpoint.every_n_steps=0"]
    out = {}
    for name in names:
        model = METHODS[name]
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
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {', '.join(METHODS)} (default: all)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="results.json whose rows of the other methods are kept (with --methods)")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure from <out>/results.json")
    args = parser.parse_args()
    if args.plot_only:
        results = json.loads((args.out / "results.json").read_text())
        figure(results, ROOT / "assets" / "posthoc_autoguidance.png")
        say(table(results))
        return
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        fail(f"unknown methods {unknown}", f"the study knows {list(METHODS)}", 'e.g. --methods "flow KO"')
    kept = {} if args.train_only else kept_rows(args, names)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    runs = runs_of(args, names)
    cpu_train_of = {}
    for name, method in runs.items():
        start = time.process_time()
        for folder, overrides in method.values():
            train_run(folder, overrides)
        cpu_train_of[name] = time.process_time() - start
    cpu_train = time.process_time() - cpu0
    say(f"training: {cpu_train / 60:.1f} CPU min")
    if args.train_only:
        return

    from genflow.apps.posthoc import main as posthoc, output_path

    sigmas = [float(s) for s in args.sigma_rel.split(",")]
    ws = [float(w) for w in args.w.split(",")]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("methods", "keep", "plot_only")}
    results = {"settings": settings, "methods": {}}
    if kept:
        results["kept_from"] = kept["from"]
        results["kept_cpu_min"] = kept["cpu_min"]
    commit = commit_of_tree()
    for name in METHODS:
        if name not in runs:
            results["methods"][name] = kept["rows"][name]
            continue
        method = runs[name]
        eval0 = time.process_time()
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
        row["measured"] = {"commit": commit, "cpu_min": {"train": round(cpu_train_of[name] / 60, 2),
                                                         "eval": round((time.process_time() - eval0) / 60, 2)}}
        results["methods"][name] = row
        say(json.dumps({name: row}))
    cpu_total = time.process_time() - cpu0
    results["cpu_min"] = {"train": round(cpu_train / 60, 2), "total": round(cpu_total / 60, 2)}
    results["wall_min"] = round((time.perf_counter() - wall0) / 60, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=1) + "\n"
    for path in (args.out / "results.json", ROOT / "assets" / "posthoc_autoguidance.json"):
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        tmp.replace(path)
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
        # label every minor tick when the axis spans less than a decade (else only 2, 3, 5 x 10^k)
        low, high = ax.get_ylim()
        lead = "123456789" if high / low < 10 else "1235"
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _, lead=lead: f"{v:g}" if f"{v:g}"[0] in lead else ""))
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()
