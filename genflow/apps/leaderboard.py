"""FID leaderboard: train (or load) every entry of a suite, evaluate it, write a table.
A Hydra app with configs/leaderboard/leaderboard.yaml (``python -m genflow.apps.leaderboard --help``):

    python -m genflow.apps.leaderboard suite=smoke [out=DIR] [only=[NAME,NAME]] [device=cuda] [num=N]
        [precision=fp32|bf16] [history=PATH] [gate=true|false] [suite.fid.<key>=value]

A suite is ``configs/leaderboard/suite/<suite>.yaml``::

    fid: {num: 50000, seed_sets: 3, mode: legacy_tensorflow, ref: train, batch_size: 256}  # FID_SCHEMA keys
    overrides: [trainer=gpu]                # config overrides for every entry
    gate: {k: 3, tolerance: 0.1}            # regression gate (genflow.results.gate)
    entries:
      - name: pfgmpp-D2048
        method: pfgmpp                      # model=<method>
        D: 2048                             # PFGM++ only; "path: ko" for flow matching
        dataset: cifar10                    # data=<dataset>
        nfe: 35                             # or steps: 18 (NFE = method.nfe(steps, solver)); a list
                                            # [9, 17, 35] sweeps NFE on one model (rows <name>-nfe<N>)
        seeds: 0-49999                      # FID seeds (image i from seed i); num = their count
        budget: {steps: 390625}             # or {minutes: 60}; or ckpt: PATH to skip training
        posthoc: [0.05, 0.08, 0.12]         # optional: one row per post-hoc EMA width (a run with ema=posthoc)
        guide_ckpt: PATH                    # optional: autoguidance by this checkpoint, weight fid.guidance
        overrides: [experiment=pfgmpp_cifar10_uncond]
      - name: edm-published
        pickle: ${oc.env:GENFLOW_PKL_EDM_CIFAR10_UNCOND,null}   # a published EDM/PFGM++ network pickle,
        paper_fid: 1.97                     # converted once (genflow.apps.convert); skipped when not given
        nfe: 35
      - name: edm-imagenet64-stochastic     # EDM's Algorithm 2, as generate.py --S_churn=40 ...
        pickle: ${oc.env:GENFLOW_PKL_EDM_IMAGENET64,null}
        solver: stochastic
        steps: 256
        S_churn: 40                         # S_churn, S_tmin, S_tmax, S_noise: the solver's settings
        S_tmin: 0.05
        S_tmax: 50
        S_noise: 1.003

Every row records model, D or path, dataset, solver and its settings, NFE, FID (per seed set, mean, std), images, sampling img/s,
wall time, the commit, the device and the sampling precision; ``leaderboard.md``, ``leaderboard.json``, the
web page ``index.html`` and the sample grids go to ``out`` (default ``leaderboard/<suite>``), and one record
per entry is appended to the history (``history=``, default ``leaderboard/history.jsonl``; docs/RECORDS.md).
Each entry is then compared with its last record of the same settings: a worse FID beyond the suite's
``gate`` ends the run with exit status 3, naming the entry and both figures. Rerunning a suite into the
same ``out`` continues its entries' training runs (or reuses them when finished). Ends with one JSON line.
Weights, data and reference statistics come from the environment on CI runners (GENFLOW_INCEPTION,
GENFLOW_DATA, GENFLOW_METRICS_HOME; see the suite file).
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from genflow import registry
from genflow.config import (CONFIG_DIR, FID_SCHEMA, PRECISION, SAMPLER_SCHEMA, Int, Spec, Str, check_device,
                            check_output_dir, check_schema, compose_config, declared_knobs, options, run_app,
                            sampler_options)
from genflow.devices import device_name
from genflow.errors import RegressionFound, config_error, reported
from genflow.outputs import check_writable, write_output
from genflow.results.gate import DEFAULT_K, DEFAULT_TOLERANCE, compare
from genflow.results.history import SCHEMA, append_records, last_matching, read_history, seed_set_summary
from genflow.results.page import write_page
from genflow.results.records import absolute, config_names

APP_DIR = CONFIG_DIR / "leaderboard"
SUITE_DIR = APP_DIR / "suite"
# an entry's own keys; any other key is a knob of its method (D: 2048 for pfgmpp), checked against the declaration
ENTRY_KEYS = {"name", "method", "dataset", "nfe", "steps", "solver", "seeds", "seed_sets", "budget",
              "ckpt", "overrides", "train_seed", "fid", "pickle", "paper_fid", "sweep", "guide_ckpt",
              "posthoc", *SAMPLER_SCHEMA}
PICKLE_KEYS = {"D"}  # genflow.apps.convert's: PFGM++'s D where a published pickle does not record it
SUITE_KEYS = {"name", "fid", "overrides", "entries", "gate"}
GATE_KEYS = {"k", "tolerance"}
# the markdown table: (row key, header)
COLUMNS = [("name", "entry"), ("model", "model"), ("settings", "settings"), ("dataset", "dataset"), ("nfe", "NFE"),
           ("solver", "solver"), ("fid", "FID"), ("fid_std", "± std"), ("paper_fid", "paper"),
           ("precision", "precision"), ("images", "images"), ("img_per_s", "img/s"), ("wall_s", "wall_s"),
           ("train_steps", "train_steps"), ("commit", "commit"), ("device", "device")]
# further metrics evaluate_fid reports when the suite asks for them, carried into rows, records and the page
METRIC_KEYS = ("kid", "fd_dinov2", "pr_precision", "pr_recall")
GRID_IMAGES = 36  # samples in each entry's grid on the page (seeds 0..35, the FID's first seeds)
LEADERBOARD_SCHEMA = {"out": Str(null=True), "only": Spec(object, null=True), "device": Str(null=True),
                      "num": Int(2, null=True, example=200), "precision": PRECISION,
                      "history": Str(null=True), "gate": Spec(bool)}


def suites() -> list[str]:
    return options("suite", "leaderboard")


def load_suite(name: str) -> dict:
    """A suite by name (configs/leaderboard/suite/<name>.yaml) or yaml path, checked."""
    path = Path(name) if name.endswith(".yaml") else SUITE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise config_error(f"leaderboard suite {name!r} not found ({path})", "a suite is a yaml file of entries",
                           f"use suite=one of: {', '.join(suites())}")
    return check_suite(OmegaConf.to_container(OmegaConf.load(path), resolve=True), path.stem, str(path))


def check_suite(suite: dict, name: str, path: str) -> dict:
    """Entries name known keys and either a checkpoint or method + dataset; the FID options fit FID_SCHEMA."""
    unknown = set(suite) - SUITE_KEYS - {"path"}
    if unknown:
        raise config_error(f"suite {name!r} has unknown key(s) {sorted(unknown)}", f"a suite takes {sorted(SUITE_KEYS)}",
                           f"fix {path}")
    gate = suite.get("gate") or {}
    bad = {k: v for k, v in gate.items() if k not in GATE_KEYS or isinstance(v, bool)
           or not isinstance(v, (int, float)) or v < 0}
    if bad:
        raise config_error(f"suite {name!r}: gate {bad} is not valid",
                           "the gate fails an entry worse than max(k * pooled std, tolerance): two numbers >= 0",
                           f"use gate: {{k: 3, tolerance: 0.1}} in {path}")
    entries = suite.get("entries") or []
    if not entries:
        raise config_error(f"suite {name!r} has no entries", "the leaderboard evaluates each entry",
                           f"add an entries: list to {path}")
    for i, e in enumerate(entries):
        unknown = set(e) - ENTRY_KEYS - (PICKLE_KEYS if "pickle" in e else set())
        knobs = set(declared_knobs(compose_config([f"model={e['method']}", f"data={e['dataset']}"]))) \
            if unknown and "method" in e and "dataset" in e else set()
        if unknown - knobs:
            raise config_error(f"suite {name!r} entry {i} has unknown key(s) {sorted(unknown - knobs)}",
                               f"entries take {sorted(ENTRY_KEYS)} and the knobs of their method "
                               f"({', '.join(sorted(knobs)) or 'none'})", f"fix {path}")
        if "ckpt" not in e and "pickle" not in e and ("method" not in e or "dataset" not in e):
            raise config_error(f"suite {name!r} entry {i} names neither ckpt nor method+dataset",
                               "an entry is trained from method/dataset/budget or loaded from a checkpoint",
                               f"fix {path}")
        e.setdefault("name", e.get("method", Path(str(e.get("ckpt", f"entry{i}"))).stem))
        check_entry_ema_guide(e, suite, name, i, path)
    suite["entries"] = [width for e in entries for swept in expand_sweep(e, name, path)
                        for width in expand_posthoc(swept)]
    entries = suite["entries"]
    for i, e in enumerate(entries):  # an entry's sampler settings (solver: stochastic, S_churn: 40, ...)
        check_schema(OmegaConf.create({k: e[k] for k in SAMPLER_SCHEMA if k in e}), SAMPLER_SCHEMA,
                     prefix=f"suite.entries[{i}].", app="leaderboard", open_keys=())
    sections = [("fid", suite.get("fid"))] + [(f"entries[{i}].fid", e.get("fid")) for i, e in enumerate(entries)]
    for where, fid in sections:
        if fid:
            check_schema(OmegaConf.create(fid), FID_SCHEMA, prefix=f"suite.{where}.", app="leaderboard", open_keys=())
    suite["path"] = path
    suite["name"] = suite.get("name", name)
    return suite


def check_entry_ema_guide(e: dict, suite: dict, name: str, i: int, path: str) -> None:
    """``posthoc: [σ_rel, ...]`` (one row per width, reconstructed from the entry's run trained with
    ema=posthoc) and ``guide_ckpt: PATH`` (autoguidance, weight ``fid.guidance`` of the entry or suite)."""
    from genflow.training.posthoc import check_sigma_rel

    widths = e.get("posthoc")
    if widths is not None:
        e["posthoc"] = [check_sigma_rel(s, f"suite {name!r} entry {i} posthoc") for s in
                        (widths if isinstance(widths, list) else [widths])]
    if e.get("guide_ckpt") is not None and {**(suite.get("fid") or {}), **(e.get("fid") or {})}.get("guidance") is None:
        raise config_error(f"suite {name!r} entry {i} has guide_ckpt but no fid.guidance",
                           "autoguidance needs its weight w (w = 1 is the model alone)",
                           f"add fid: {{guidance: 2}} to the entry in {path}")


def expand_posthoc(entry: dict) -> list[dict]:
    """An entry with ``posthoc`` widths becomes one entry per width (``<name>-sigma<σ_rel>``) sharing the
    entry's training run (``posthoc_of``); each is scored on its reconstruction (``posthoc_ckpt``)."""
    widths = entry.get("posthoc")
    if not isinstance(widths, list):
        return [entry]
    return [{**entry, "posthoc": s, "name": f"{entry['name']}-sigma{s:.3f}", "posthoc_of": entry["name"]}
            for s in widths]


def run_name(entry: dict) -> str:
    """The training run an entry is scored from: its own, its NFE sweep's or its post-hoc widths' shared one."""
    return entry.get("sweep") or entry.get("posthoc_of") or entry["name"]


def posthoc_ckpt(ckpt: str, sigma_rel: float, entry: str) -> str:
    """The reconstruction of width ``sigma_rel`` from the snapshots of the run that wrote ``ckpt`` (written once
    beside it, atomically, and reused afterwards while it matches its checksum)."""
    from genflow.cache import cached_checkpoint_problem, save_checkpoint
    from genflow.training.posthoc import posthoc_checkpoint, run_snapshots

    run_dir = Path(ckpt).resolve().parent.parent
    path = run_dir / "checkpoints" / f"posthoc_sigma{sigma_rel:.3f}.ckpt"
    why = cached_checkpoint_problem(path) if path.exists() else ""
    if why:
        print(f"genflow: reconstruction {path} not used, {why}; reconstructing it", file=sys.stderr, flush=True)
    if why or not path.exists():
        made = posthoc_checkpoint(run_snapshots(run_dir, key=f"entry {entry}: run"), sigma_rel)
        save_checkpoint(made, path)
    return str(path)


def expand_sweep(entry: dict, suite: str, path: str) -> list[dict]:
    """An entry whose ``nfe`` is a list becomes one entry per NFE (``<name>-nfe<N>``) on the same model: they
    share the training run and are drawn as one FID-vs-NFE curve (their ``sweep`` is the entry's name)."""
    nfe = entry.get("nfe")
    if not isinstance(nfe, (list, tuple)):
        return [entry]
    if not nfe or len(set(nfe)) != len(nfe) or entry.get("steps") is not None:
        raise config_error(f"suite {suite!r} entry {entry['name']!r}: nfe={nfe}",
                           "an NFE sweep is a list of distinct NFEs (and no steps:, which would fix one)",
                           f"use e.g. nfe: [7, 15, 35] in {path}")
    return [{**entry, "nfe": int(n), "name": f"{entry['name']}-nfe{int(n)}", "sweep": entry["name"]} for n in nfe]


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        if rev.returncode == 0 and rev.stdout.strip():
            return rev.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("GITHUB_SHA", "unknown")[:12]


def entry_overrides(entry: dict, suite: dict, run_dir: Path) -> list[str]:
    ov = [f"model={entry['method']}", f"data={entry['dataset']}"]
    ov += [f"{key}={value}" for key, value in entry.items() if key not in ENTRY_KEYS and value is not None]
    ov += list(suite.get("overrides") or []) + list(entry.get("overrides") or [])
    budget = entry.get("budget") or {}
    if "steps" in budget:
        ov.append(f"trainer.max_steps={int(budget['steps'])}")
    if "minutes" in budget:
        ov.append(f"+trainer.max_time={{minutes: {float(budget['minutes'])}}}")
        if "steps" not in budget:
            ov.append("trainer.max_steps=-1")
    if "train_seed" in entry:
        ov.append(f"seed={int(entry['train_seed'])}")
    ov += ["fid.num=0", f"+run_dir={run_dir}"]
    return ov


def entry_config(entry: dict, suite: dict, run_dir: Path, **compose_options) -> DictConfig:
    """The training config of an entry, composed from the suite's overrides and checked like any config read
    from a file: it may name only genflow's registry (or the user's own search path), never other code."""
    from genflow.config import compose

    for where, overrides in (("overrides", suite.get("overrides")), (f"{entry['name']}.overrides", entry.get("overrides"))):
        for item in overrides or []:
            if str(item).lstrip("+~").startswith("hydra."):
                raise config_error(f"suite {suite['path']}: {where} holds {item!r}",
                                   "a suite is data; where configs are read from (hydra.searchpath) and how Hydra "
                                   "runs are the command line's to choose", "drop the override; pass hydra.* "
                                   "options on the leaderboard's command line")
    with registry.composing_a_file():  # the suite's overrides extend nothing the registry allows
        cfg = compose(entry_overrides(entry, suite, run_dir), **compose_options)
    registry.check_stored(cfg, f"suite {suite['path']} entry {entry['name']!r}")
    return cfg


def check_entry_code(suite: dict) -> None:
    """Before anything is trained: every entry's config and checkpoint names only code genflow may build."""
    from genflow.config import read_checkpoint

    for entry in suite["entries"]:
        if "pickle" in entry:
            continue  # converted by genflow.apps.convert, which writes its own config
        if entry.get("ckpt"):
            if Path(str(entry["ckpt"])).expanduser().is_file():
                read_checkpoint(entry["ckpt"], key=f"suite entry {entry['name']!r} ckpt")
            continue
        entry_config(entry, suite, Path("leaderboard") / "runs" / entry["name"], validator=False)


def continued_config(entry: dict, suite: dict, run_dir: Path) -> DictConfig:
    """The training config of an entry (``entry_config``). A run already in ``run_dir`` (an earlier run of this
    suite into the same ``out``) is continued, or reused when it finished, provided it was trained with the
    entry's model, net and data; otherwise the suite refuses before any work, saying how to go on."""
    from genflow.config import check_resume, newest_valid
    from genflow.errors import CheckpointError
    from genflow.apps.run_folder import holds_run

    if not entry.get("budget"):
        raise config_error(f"entry {entry['name']!r} has no budget", "training needs a length",
                           "add budget: {steps: N} or budget: {minutes: M}, or ckpt: PATH to skip training")
    cfg = entry_config(entry, suite, run_dir)
    if not holds_run(run_dir):
        return cfg
    try:
        path, ckpt, _ = newest_valid(run_dir)
        check_resume(cfg, ckpt["hyper_parameters"]["config"], path, None)
    except CheckpointError as err:
        raise config_error(
            f"entry {entry['name']!r}: {run_dir} holds a training run the suite's entry cannot continue "
            f"({str(err).splitlines()[0]})",
            "the entry's model, net or data changed since that run (or its checkpoints are unreadable); "
            "continuing it would mix two experiments",
            f"run the suite into a new folder (out=ANOTHER_DIR), or move {run_dir} away to retrain the entry") from None
    cfg.ckpt_path = "last"  # prepare_run resumes it, or reports it finished (nothing trained again)
    return cfg


def train_entry(cfg: DictConfig) -> dict:
    """Train (or continue) an entry's run; stopped, it is continued by the same leaderboard command."""
    import shlex

    from genflow.apps.run_folder import job_overrides
    from genflow.apps.train import train

    overrides = job_overrides()
    again = " ".join(["python -m genflow.apps.leaderboard",
                      *map(shlex.quote, overrides if overrides is not None else sys.argv[1:])])
    return train(cfg, continue_with=again)


def resolve_steps(method, entry: dict, solver: str) -> int:
    """Sampler steps for the entry: given directly, or the smallest count whose NFE is the requested one."""
    if entry.get("steps") is not None:
        return int(entry["steps"])
    if entry.get("nfe") is None:
        return 18
    nfe = int(entry["nfe"])
    for steps in range(1, nfe + 2):
        if method.nfe(steps, solver) == nfe:
            return steps
    raise config_error(f"entry {entry['name']!r}: NFE {nfe} is not reachable with solver={solver}",
                       f"{type(method).__name__}'s {solver} sampler uses nfe(steps) evaluations",
                       "give steps: N instead, or an NFE the sampler can produce (heun: 2*steps-1, e.g. 35)")


def seed_range(entry: dict, fid: dict) -> tuple[int, int]:
    from genflow.sampling import parse_seeds

    if entry.get("seeds") is None:
        return 0, int(fid.get("num", 50000))
    seeds = parse_seeds(entry["seeds"])
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise config_error(f"entry {entry['name']!r}: seeds={entry['seeds']} is not a contiguous range",
                           "seed sets are consecutive ranges (0-49999, 50000-99999, ...)", "use seeds: 0-49999")
    return seeds[0], len(seeds)


def evaluate_entry(entry: dict, suite: dict, ckpt: str, device: torch.device, num: int | None = None,
                   precision: str = "fp32", grid: Path | None = None) -> dict:
    """FID (and the suite's further metrics) of a checkpoint with the entry's sampler; with ``grid``, also
    a picture of its first ``GRID_IMAGES`` samples (seeds 0.., the FID's own) for the page."""
    from genflow.config import fid_options, module_from_checkpoint
    from genflow.metrics import evaluate_fid
    from genflow.sampling import generate, sample_conditions, save_grid

    fid = {**(suite.get("fid") or {}), **(entry.get("fid") or {}),
           **{k: entry[k] for k in SAMPLER_SCHEMA if k in entry}, "precision": precision}
    if device.type == "cuda" and _rank_world()[1] > 1:
        device = torch.device("cuda", torch.cuda.current_device())  # each DDP rank samples on its own GPU
    module, dm, cfg = module_from_checkpoint(ckpt, device=device)
    dm.setup()
    solver = str(entry.get("solver", fid.get("solver") or "heun"))
    steps = resolve_steps(module.method, entry, solver)
    start, count = seed_range(entry, fid)
    fid.update(num=count if num is None else int(num), seed_start=start, steps=steps, solver=solver,
               seed_sets=int(entry.get("seed_sets", fid.get("seed_sets", 1))))
    fid.setdefault("progress", False)
    options = fid_options(fid, device=device)
    if entry.get("guide_ckpt") is not None:  # autoguidance: a weaker checkpoint of the same method and data
        from genflow.config.guide import check_guide, sampling_net

        check_guide(cfg, entry["guide_ckpt"], key=f"entry {entry['name']}: guide_ckpt")
        options["net"], options["guidance"] = sampling_net(module.net, options["guidance"], entry["guide_ckpt"],
                                                           device)
    out = evaluate_fid(module, dm, **options)
    out["nfe"] = module.method.nfe(steps, solver)
    out["steps"] = steps
    out["solver"] = solver
    out["sampler"] = sampler_options(fid)
    out["config"] = cfg
    out["describe"] = module.method.describe()
    out["dataset"] = getattr(dm, "name", type(dm).__name__.lower())
    out["seed_sets"] = fid["seed_sets"]
    if grid is not None and _rank_world()[0] == 0 and len(dm.data_shape) == 3:
        seeds = list(range(GRID_IMAGES))
        with torch.no_grad():
            images = generate(module.method, options.get("net", module.net), seeds, dm.data_shape, steps=steps,
                              solver=solver, cond=sample_conditions(dm, seeds, device), device=device,
                              precision=precision, solver_options=out["sampler"] or None,
                              guidance=options.get("guidance"))
        out["grid"] = save_grid(images, grid)
    return out


def _settings(describe: dict):
    """The method's own settings for the row (``Method.describe`` minus its name): PFGM++'s D (EDM is
    D = inf), a flow's path, ...; one setting is shown as its value."""
    rest = {k: v for k, v in describe.items() if k != "method"}
    if not rest:
        return None
    if len(rest) == 1:
        return next(iter(rest.values()))
    return ", ".join(f"{k}={v}" for k, v in rest.items())


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def suite_file(name: str) -> str:
    """Where a suite was read from: genflow's own folder, else a user's folder on hydra.searchpath."""
    own = SUITE_DIR / f"{name}.yaml"
    return str(own) if own.is_file() else f"suite/{name}.yaml on hydra.searchpath"


def markdown(suite: dict, rows: list[dict], num: int | None = None, precision: str | None = None) -> str:
    """The table, headed by the suite's file and the FID settings the rows were computed with (``num`` and
    ``precision`` as given on the command line)."""
    fid = {**(suite.get("fid") or {}), **({"num": num} if num is not None else {}),
           **({"precision": precision} if precision is not None else {})}
    lines = [f"# FID leaderboard: {suite['name']}", "",
             f"Suite `{suite['path']}`; FID settings: `{json.dumps(fid)}`.", "",
             "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def validate(cfg: DictConfig) -> dict:
    """The leaderboard's checks before anything is trained: its own keys, the output folder, the suite
    (returned, checked)."""
    check_schema(cfg, LEADERBOARD_SCHEMA, app="leaderboard", open_keys=("hydra", "suite"))
    check_device(cfg.device)
    check_output_dir(cfg.out, "out")
    suite = composed_suite(cfg)
    check_suite_in_place(cfg, suite)
    check_entry_code(suite)
    # where the tables, grids, runs and the history go, writable before the first entry is trained
    check_writable(cfg.out or Path("leaderboard") / suite["name"], "out")
    check_writable(Path(str(cfg.history or Path("leaderboard") / "history.jsonl")).parent, "history")
    return suite


def _flat(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix: node}
    return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def check_suite_in_place(cfg: DictConfig, suite: dict) -> None:
    """A suite file fills the `suite` section only. With a ``# @package _global_`` header or a defaults list it
    could set ``hydra.callbacks`` or the logging handlers, which Hydra builds before the leaderboard starts: the
    app config (with Hydra's part, as the command line is checked) must equal the one composed with genflow's
    own smoke suite in its place."""
    from genflow.config import compose

    if cfg.get("hydra") is None:
        return  # composed without Hydra's part: Hydra does not run this config
    given = [*cfg.hydra.overrides.hydra, *cfg.hydra.overrides.task]
    plain = [o for o in given if not o.lstrip("+~").startswith("suite")] + ["suite=smoke"]
    bare = compose(plain, "leaderboard", return_hydra_config=True, validator=False)
    ignored = ("suite.", "hydra.overrides.", "hydra.runtime.", "hydra.job.override_dirname.")
    mine, theirs = (_flat(OmegaConf.to_container(c, resolve=False)) for c in (cfg, bare))
    for key in sorted(set(mine) | set(theirs)):
        if not key.startswith(ignored) and mine.get(key, "<absent>") != theirs.get(key, "<absent>"):
            raise config_error(f"suite {suite['path']} sets {key.rstrip('.')}, outside its own section",
                               "a suite is data for the leaderboard's suite section; Hydra builds what "
                               "hydra.callbacks and the logging configs name", "remove the `# @package` line "
                               "and any defaults list from the suite file; pass hydra.* options on the command line")


def composed_suite(cfg: DictConfig) -> dict:
    """The suite the app config composed (suite=NAME), checked, with its entries' default names."""
    name = str(cfg.suite.get("name") or "suite")
    return check_suite(OmegaConf.to_container(cfg.suite, resolve=True), name, suite_file(name))


def run(cfg: DictConfig | Sequence[str] | None = None, *, validated: bool = False) -> dict:
    """Run a suite; ``cfg`` is the composed app config (or its command-line overrides, composed here).
    ``validated``: ``validate`` already ran on it (the Hydra app, after ``run_app``'s check)."""
    if not isinstance(cfg, DictConfig):
        from genflow.config import compose

        cfg, validated = compose(list(sys.argv[1:] if cfg is None else cfg), "leaderboard", validator=False), False
    suite = composed_suite(cfg) if validated else validate(cfg)
    entries = suite["entries"]
    if cfg.only is not None:
        wanted = {str(cfg.only)} if isinstance(cfg.only, (str, int)) else set(map(str, cfg.only))
        entries = [e for e in entries if e["name"] in wanted or e.get("sweep") in wanted]  # a sweep by its name
        if not entries:
            raise config_error(f"only={cfg.only} matches no entry", "names are the entries' name fields",
                               f"use some of: {', '.join(e['name'] for e in suite['entries'])}")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(cfg.out or Path("leaderboard") / suite["name"]).absolute()
    history_path = Path(cfg.history or Path("leaderboard") / "history.jsonl").absolute()
    history = read_history(history_path)  # a bad history is an error before any training
    # every training run is checked (new, continued or finished) before the first one starts
    trained = {}
    for entry in entries:
        if "pickle" not in entry and not entry.get("ckpt"):
            run_dir = out / "runs" / run_name(entry)
            if run_dir not in trained:
                trained[run_dir] = continued_config(entry, suite, run_dir)
    out.mkdir(parents=True, exist_ok=True)
    revision, dev = git_revision(), device_name(device)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rank0 = _rank_world()[0] == 0
    gate = {**{"k": DEFAULT_K, "tolerance": DEFAULT_TOLERANCE}, **(suite.get("gate") or {})}

    rows, records, verdicts, results = [], [], [], {}
    for entry in entries:
        start = time.perf_counter()
        train_steps = None
        if "pickle" in entry:  # a published EDM/PFGM++ network, converted once (genflow.apps.convert)
            from genflow.apps.convert import published_checkpoint

            ckpt = published_checkpoint(entry)
            if ckpt is None:
                print(f"skipping {entry['name']}: no published pickle on this machine (see {suite['path']})",
                      file=sys.stderr, flush=True)
                continue
        elif entry.get("ckpt"):
            ckpt = str(entry["ckpt"])
        else:
            run_dir = out / "runs" / run_name(entry)
            if run_dir not in results:
                results[run_dir] = train_entry(trained[run_dir])
            ckpt, train_steps = results[run_dir]["checkpoint"], results[run_dir].get("steps")
        if entry.get("posthoc") is not None:  # a post-hoc EMA width of the entry's run (ema=posthoc)
            ckpt = posthoc_ckpt(ckpt, entry["posthoc"], entry["name"])
        ev = evaluate_entry(entry, suite, ckpt, device, cfg.num, cfg.precision, grid=out / "grids" / f"{entry['name']}.png")
        names = config_names(ev.pop("config"))
        sets = ev.get("fid_sets") or [ev["fid"]]
        mean, std = seed_set_summary(sets)
        paper = entry.get("paper_fid")
        row = {
            "name": entry["name"], "sweep": entry.get("sweep"), "model": names.get("model", "?"),
            "settings": _settings(ev.pop("describe")), "dataset": ev["dataset"], "nfe": ev["nfe"],
            "steps": ev["steps"], "solver": ev["solver"], **ev["sampler"], "precision": ev["fid_precision"],
            "fid": ev["fid"], "fid_sets": sets, "fid_mean": round(mean, 6),
            "fid_std": None if std is None else round(std, 6), "paper_fid": paper,
            "delta_paper": None if paper is None else round(ev["fid"] - paper, 6),
            **{k: ev[k] for k in METRIC_KEYS if k in ev},
            "images": ev["fid_images"], "seed_sets": ev["seed_sets"], "img_per_s": ev["fid_img_per_s"],
            "extractor": ev["fid_extractor"], "ref": ev["fid_ref"], "wall_s": round(time.perf_counter() - start, 1),
            "train_steps": train_steps, "checkpoint": absolute(ckpt), "commit": revision, "device": dev,
            "date": date, "grid": str(Path(ev["grid"]).relative_to(out)) if ev.get("grid") else None,
            "grid_count": GRID_IMAGES if ev.get("grid") else None,
        }
        record = history_record(suite["name"], row)
        before = last_matching(history + records, record)
        if before is not None:
            verdict = compare(before, record, **gate)
            row["previous_fid"] = verdict.before
            verdicts.append(verdict)
        rows.append(row)
        records.append(record)
        if rank0:  # under DDP training every rank runs this loop; one writes
            atomic_json(out / "leaderboard.json", {"suite": suite["name"], "rows": rows})
    regressions = [v for v in verdicts if v.regressed]
    if rank0:
        append_records(history_path, records)
        table = markdown(suite, rows, cfg.num, cfg.precision)
        write_output(out / "leaderboard.md", lambda tmp: tmp.write_text(table))
        page_rows = [{**r, "record": rec} for r, rec in zip(rows, records)]
        write_page(out, suite, page_rows, read_history(history_path),
                   {"suite file": _shown(suite["path"]), "date": date, "commit": revision, "device": dev,
                    "history": history_path.name})
    result = {"suite": suite["name"], "entries": len(rows), "markdown": str(out / "leaderboard.md"),
              "json": str(out / "leaderboard.json"), "page": str(out / "index.html"), "history": str(history_path),
              "fid": {r["name"]: r["fid"] for r in rows}, "commit": revision, "device": dev,
              "precision": cfg.precision, "regressions": [v.entry for v in regressions]}
    if rank0:
        print(json.dumps(result), flush=True)
    if regressions and cfg.gate:
        raise RegressionFound(
            "FID regression: " + "; ".join(v.describe() for v in regressions) +
            f"\n  why: the gate allows max(k * pooled std over seed sets, tolerance) with k={gate['k']}, "
            f"tolerance={gate['tolerance']} (suite {suite['path']}); the records are in {history_path}"
            "\n  fix: find the change that made the entry worse; if the new figure is right (a changed protocol), "
            "rerun with gate=false once to record it as the new reference")
    return result


def _shown(path: str) -> str:
    """A suite file as a reader of the page knows it: relative to genflow's configs when it is one of them."""
    try:
        return str(Path(path).relative_to(CONFIG_DIR.parent))
    except ValueError:
        return path


def history_record(suite: str, row: dict) -> dict:
    """The row as a history record (genflow.results.history's schema)."""
    keep = ("model", "settings", "dataset", "precision", "solver", "nfe", "steps", "images", "seed_sets", "fid_sets",
            "fid", "fid_mean", "fid_std", "paper_fid", "extractor", "ref", "wall_s", "train_steps", "checkpoint",
            "commit", "date", "device", *SAMPLER_SCHEMA, *METRIC_KEYS)
    return {"schema": SCHEMA, "suite": suite, "entry": row["name"], **{k: row.get(k) for k in keep}}


def atomic_json(path: Path, value) -> None:
    write_output(path, lambda tmp: tmp.write_text(json.dumps(value, indent=1) + "\n"))


@hydra.main(version_base="1.3", config_path=str(APP_DIR), config_name="leaderboard")
@reported
def app(cfg: DictConfig) -> None:
    run(cfg, validated=True)  # run_app validated the command line before Hydra started


def cli() -> None:
    """The ``genflow-leaderboard`` console script and ``python -m genflow.apps.leaderboard``."""
    run_app(app, "leaderboard", validate)


if __name__ == "__main__":
    cli()
