"""FID vs NFE on digits for every method and the few-step solvers: Euler, Heun, DPM-Solver++(2M) and UniPC
at NFE 5, 10, 20, 35 on the same checkpoints and the same seeds.

    python scripts/fid_vs_nfe_solvers.py --out outputs/fid_nfe [--train-steps 800] [--num 500]
        [--models edm pfgmpp128 flow_condot flow_ko ddpm spd] [--nfe 5 10 20 35]
        [--solvers euler heun dpmpp_2m unipc] [--cached-only] [--schedules model logsnr] [--extra-schedules karras]
        [--schedule-nfe 10] [--settings unipc/logsnr:order=2,variant=bh1 ...] [--seed-start 0] [--reuse]

Each model is trained by genflow's own training run (configs/train.yaml with the overrides in MODELS:
``python train.py <overrides> data=digits trainer.max_steps=N seed=0 hydra.run.dir=OUT/<model>``), then
scored with the digits FID (the shipped digits classifier's features, reference = the training set) on
seeds 0..num-1. A solver's steps are the most whose NFE (``method.nfe``) does not exceed the target
(Heun with EDM's Algorithm 1 has odd NFE 2 steps - 1, elsewhere even 2 steps): each row reports its own
NFE. The exponential integrators (dpmpp_2m, unipc) run on each grid of ``--schedules``
(``genflow.solvers.exponential_grid``; ``model`` is the model's own) and on ``--extra-schedules`` at
``--schedule-nfe``, where also each ``--settings`` row runs (a solver, a grid and sampler settings, e.g.
``unipc/logsnr:order=2,variant=bh1``); the figure plots the grid each method takes by default
(``Method.solver_options``). Prints a markdown table and one JSON line; writes OUT/fid_vs_nfe.{json,png} and each
model's rows to OUT/<model>/fid_rows.json (read back by --reuse when the settings match).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from genflow.config import SAMPLER_SCHEMA, module_from_checkpoint
from genflow.metrics import evaluate_fid
from genflow.solvers import EXPONENTIAL_SOLVERS

from digits_runs import add_run_arguments, train_model

MODELS = {"edm": ["model=edm"], "pfgmpp128": ["model=pfgmpp", "D=128"],
          "flow_condot": ["model=flow", "path=condot"], "flow_ko": ["model=flow", "path=ko"],
          "ddpm": ["model=ddpm"], "spd": ["model=spd"]}
MARKERS = {"euler": "s", "heun": "o", "dpmpp_2m": "D", "unipc": "^"}


def steps_for(method, solver: str, nfe: int) -> int | None:
    """The most steps whose NFE is at most ``nfe`` (None if even one step costs more)."""
    best = None
    for steps in range(1, nfe + 1):
        if method.nfe(steps, solver) <= nfe:
            best = steps
    return best


def parse_setting(text: str) -> tuple[str, str, dict]:
    """``solver/schedule:key=value,...`` -> (solver, schedule, sampler settings typed by SAMPLER_SCHEMA)."""
    head, _, tail = text.partition(":")
    solver, schedule = head.split("/")
    options = {}
    for item in filter(None, tail.split(",")):
        key, value = item.split("=")
        kind = SAMPLER_SCHEMA[key].kind
        options[key] = value.lower() == "true" if kind is bool else kind(value)
    return solver, schedule, options


def label(solver: str, schedule: str | None, options: dict) -> str:
    return (solver + (f"/{schedule}" if schedule else "")
            + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else ""))


def score(module, dm, *, solver: str, steps: int, args, schedule: str | None = None, options=None) -> dict:
    start = time.perf_counter()
    # explicit: the row says which grid it ran
    options = {**({"schedule": schedule} if schedule else {}), **(options or {})} or None
    fid = evaluate_fid(module, dm, num=args.num, steps=steps, solver=solver, batch_size=args.batch_size,
                       seed_start=args.seed_start, solver_options=options)
    return {"solver": label(solver, schedule, {k: v for k, v in (options or {}).items() if k != "schedule"}),
            "steps": steps,
            "nfe": module.method.nfe(steps, solver), "fid": fid["fid"], "images": fid["fid_images"],
            "wall_s": round(time.perf_counter() - start, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/fid_nfe")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--train-steps", type=int, default=800)
    p.add_argument("--num", type=int, default=500, help="generated images per FID (seeds seed_start..)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 35])
    p.add_argument("--solvers", nargs="+", default=["euler", "heun", "dpmpp_2m", "unipc"])
    p.add_argument("--cached-only", action="store_true",
                   help="tabulate the rows saved in OUT/<model>/fid_rows.json with --num, --seed-start and --nfe; "
                        "compute nothing")
    p.add_argument("--schedules", nargs="*", default=["model", "logsnr"],
                   help="the exponential integrators' time grids at every NFE (model: the model's own grid)")
    p.add_argument("--extra-schedules", nargs="*", default=["karras"], help="more grids, at --schedule-nfe only")
    p.add_argument("--schedule-nfe", type=int, nargs="*", default=[10])
    p.add_argument("--settings", nargs="*", default=[], metavar="SOLVER/GRID:KEY=VALUE,...",
                   help="more rows at --schedule-nfe: a solver on a grid with sampler settings")
    add_run_arguments(p)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for name in args.models:
        if args.cached_only:
            saved = out / name / "fid_rows.json"
            stored = json.loads(saved.read_text())["rows"] if saved.is_file() else []
            rows += [r for r in stored if r["solver"].split("/")[0] in args.solvers and r["images"] == args.num
                     and r["seed_start"] == args.seed_start and r["target_nfe"] in args.nfe]
        else:
            rows += model_rows(name, args, out)

    # the grid each exponential integrator takes when none is given (Method.solver_options): the figure plots it
    defaults = {}
    for name in args.models:
        method = module_from_checkpoint(out / name / "checkpoints" / "final.ckpt")[0].method
        defaults[name] = {s: method.solver_options(s).get("schedule", "model") for s in EXPONENTIAL_SOLVERS}
    print(table(rows))
    checks = goal(rows)
    result = {"rows": rows, "goal": checks, "default_schedule": defaults,
              "plot": str(plot(rows, out / "fid_vs_nfe.png", defaults)),
              "train_steps": args.train_steps, "num": args.num, "device": args.device}
    (out / "fid_vs_nfe.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


def model_rows(name: str, args, out: Path) -> list[dict]:
    """One model's rows. With --reuse, rows saved by an earlier run (OUT/<model>/fid_rows.json) with the same
    solver, steps, grid, number of images and seeds are read back and only the missing ones are computed."""
    saved = out / name / "fid_rows.json"
    done = {}
    if args.reuse and saved.is_file():
        stored = json.loads(saved.read_text())
        for r in stored["rows"]:
            done[(r["solver"], r["steps"], r["target_nfe"], r["images"], r["seed_start"])] = r
    wanted = []
    module = None
    for nfe in args.nfe:
        jobs = [(solver, None, {}) for solver in args.solvers if solver not in EXPONENTIAL_SOLVERS]
        for solver in (s for s in args.solvers if s in EXPONENTIAL_SOLVERS):
            jobs += [(solver, schedule, {}) for schedule in args.schedules]
            if nfe in args.schedule_nfe:
                jobs += [(solver, schedule, {}) for schedule in args.extra_schedules]
        if nfe in args.schedule_nfe:
            jobs += [parse_setting(text) for text in args.settings]
        for solver, schedule, options in jobs:
            if module is None:
                module, dm, _ = module_from_checkpoint(train_model(name, MODELS[name], args, out), device=args.device)
            steps = nfe if schedule else steps_for(module.method, solver, nfe)
            if steps is None:
                continue
            key = (label(solver, schedule, options), steps, nfe, args.num, args.seed_start)
            if key not in done:
                done[key] = {"model": name, "target_nfe": nfe, "seed_start": args.seed_start,
                             **score(module, dm, solver=solver, steps=steps, args=args, schedule=schedule,
                                     options=options)}
                print(json.dumps(done[key]), file=sys.stderr, flush=True)
                tmp = saved.with_suffix(".tmp")  # saved after every row: an interrupted run resumes
                tmp.write_text(json.dumps({"rows": list(done.values())}, indent=1))
                tmp.replace(saved)
            wanted.append(done[key])
    return wanted


def goal(rows: list[dict]) -> dict:
    """Per model: each exponential solver's FID at NFE 10 against Heun's at NFE 20 (19 for EDM's Heun, whose NFE
    is odd) and against Heun's best at NFE >= 20: [fid, no worse than Heun at 20, no worse than its best]."""
    out = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        heun = [r for r in rows if r["model"] == name and r["solver"] == "heun" and r["nfe"] >= 19]
        if not heun:
            continue
        at20 = min(heun, key=lambda r: r["nfe"])
        best = min(heun, key=lambda r: r["fid"])
        out[name] = {"heun_nfe_20": [at20["nfe"], at20["fid"]], "heun_best_nfe_ge_20": [best["nfe"], best["fid"]]}
        for r in rows:
            if r["model"] == name and r["solver"].split("/")[0] in EXPONENTIAL_SOLVERS and r["nfe"] == 10:
                out[name][r["solver"]] = [r["fid"], r["fid"] <= at20["fid"], r["fid"] <= best["fid"]]
    return out


def table(rows: list[dict]) -> str:
    """Markdown: one row per model and solver, one column per target NFE (FID, with the NFE if different)."""
    nfes = sorted(dict.fromkeys(r["target_nfe"] for r in rows))
    lines = ["| model | solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---|" + "---|" * len(nfes)]
    for name in dict.fromkeys(r["model"] for r in rows):
        for solver in dict.fromkeys(r["solver"] for r in rows if r["model"] == name):
            cells = []
            for n in nfes:
                r = next((r for r in rows if r["model"] == name and r["solver"] == solver and r["target_nfe"] == n), None)
                cells.append("" if r is None else f"{r['fid']:.2f}" + ("" if r["nfe"] == n else f" ({r['nfe']})"))
            lines.append(f"| {name} | {solver} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, defaults: dict) -> Path:
    import matplotlib.ticker

    from genflow.viz import agg_figure

    names = list(dict.fromkeys(r["model"] for r in rows))
    fig = agg_figure(figsize=(3.2 * min(len(names), 3), 2.8 * ((len(names) + 2) // 3)))
    axes = fig.subplots((len(names) + 2) // 3, min(len(names), 3), squeeze=False).flatten()
    for ax, name in zip(axes, names):
        for i, solver in enumerate(MARKERS):
            shown = f"{solver}/{defaults[name][solver]}" if solver in EXPONENTIAL_SOLVERS else solver
            pts = sorted((r["nfe"], r["fid"]) for r in rows if r["model"] == name and r["solver"] == shown)
            if pts:
                ax.plot(*zip(*pts), marker=MARKERS[solver], color=f"C{i}", label=solver)
        ax.set(xscale="log", yscale="log", title=name, xlabel="NFE")
        ax.set_xticks([5, 10, 20, 35], labels=["5", "10", "20", "35"])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axes[0].set_ylabel("digits FID")
    axes[0].legend(fontsize=7)
    for ax in axes[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
