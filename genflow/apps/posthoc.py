"""Post-hoc EMA reconstruction (Karras et al. 2024, EDM2 Section 3): ``python -m genflow.apps.posthoc --help``.

    python -m genflow.apps.posthoc RUN sigma_rel=0.05,0.08,0.12 [step=N] [out=DIR]

For each width, the least-squares combination of the run's snapshots (``genflow.training.posthoc``) is written
as ``<out>/posthoc_sigma<sigma_rel>.ckpt`` (weights only, the run's config; ``out`` defaults to the run's
``checkpoints/``), atomically and never over an existing file. Everything is checked before any snapshot
is combined. Ends with one JSON line.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from genflow.config import CONFIG_DIR, Int, Spec, Str, check_output_dir, check_schema, run_app
from genflow.errors import config_error, reported
from genflow.config.entry import one_line_on_stop
from genflow.outputs import check_writable
from genflow.progress import Phase

POSTHOC_SCHEMA = {"run": Str(), "sigma_rel": Spec(object), "step": Int(1, null=True), "out": Str(null=True)}


def widths(cfg: DictConfig) -> list[float]:
    """The asked widths as floats, each checked (a list, or one number)."""
    from genflow.training.posthoc import check_sigma_rel

    value = cfg.sigma_rel
    if value is None:
        raise config_error("no sigma_rel given", "posthoc reconstructs the EMAs of the asked relative widths",
                           "pass sigma_rel=0.05,0.08,0.12 (one or more widths, 0 < sigma_rel < 0.2887)")
    values = OmegaConf.to_container(value) if not isinstance(value, (int, float, str)) else [value]
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise config_error(f"sigma_rel={value}", "sigma_rel is one number or a list of numbers",
                           "write sigma_rel=0.05,0.08,0.12") from err
    return [check_sigma_rel(v) for v in values]


def output_path(out: Path, sigma_rel: float, step: int | None) -> Path:
    return out / (f"posthoc_sigma{sigma_rel:.3f}" + ("" if step is None else f"_step{step:09d}") + ".ckpt")


def plan(cfg: DictConfig) -> tuple[list[dict], list[tuple[float, Path]]]:
    """The snapshots and (width, output file) pairs, every argument checked; nothing is written."""
    from genflow.training.posthoc import check_step, run_snapshots

    if cfg.get("run") is None:
        raise config_error("no run given", "posthoc reconstructs from the snapshots of a run folder",
                           "pass the folder of a run trained with ema=posthoc: python -m genflow.apps.posthoc RUN "
                           "sigma_rel=0.05,0.08")
    check_schema(cfg, POSTHOC_SCHEMA, app="posthoc", open_keys=("hydra",))
    asked = widths(cfg)
    run = Path(str(cfg.run)).expanduser()
    if not run.is_dir():
        raise config_error(f"run={run} is not a folder", "a run folder holds posthoc/snapshot_*.pt",
                           "pass the hydra.run.dir of a run trained with ema=posthoc")
    snaps = run_snapshots(run)
    check_step(snaps, cfg.step)
    out = Path(str(cfg.out)).expanduser() if cfg.out else run / "checkpoints"
    check_output_dir(out, "out")
    files = [(s, output_path(out, s, cfg.step)) for s in asked]
    # before any snapshot is combined: each checkpoint holds one average's tensors (the snapshots are memory-mapped)
    average = sum(t.numel() * t.element_size() for t in snaps[-1]["state_dicts"][0].values())
    check_writable(out, "out", need_bytes=len(files) * (average + (1 << 20)))
    existing = [str(p) for _, p in files if p.exists()]
    if existing:
        raise config_error(f"{', '.join(existing)} already exist(s)", "posthoc never overwrites a checkpoint",
                           "remove it, leave that width out, or choose another folder with out=DIR")
    return snaps, files


def main(cfg: DictConfig | list[str], phase: Phase | None = None) -> dict:
    """Reconstruct as ``python -m genflow.apps.posthoc`` does; ``cfg`` is the composed config or its overrides.
    ``phase``: told what is written (for the line a stop prints)."""
    from genflow.cache import save_checkpoint
    from genflow.config import compose
    from genflow.training.module import check_finite_weights
    from genflow.training.posthoc import posthoc_checkpoint

    if not isinstance(cfg, DictConfig):
        cfg = compose(command_line(list(cfg)), "posthoc", validator=False)
    snaps, files = plan(cfg)
    written, phase = [], phase or Phase()
    for sigma_rel, path in files:
        phase.at(f"reconstructing sigma_rel={sigma_rel}", f"{len(written)} of {len(files)} checkpoints were written "
                 "(each whole or not at all)", "run it again with sigma_rel= the widths not written yet")
        ckpt = posthoc_checkpoint(snaps, sigma_rel, cfg.step)
        check_finite_weights(ckpt["state_dict"], f"the reconstruction at sigma_rel={sigma_rel}")
        save_checkpoint(ckpt, path)
        info = ckpt["posthoc"]
        written.append({"sigma_rel": sigma_rel, "gamma": round(info["gamma"], 4), "step": info["step"],
                        "residual": float(f"{info['residual']:.3g}"), "averages_used": info["averages_used"],
                        "ckpt": str(path)})
    result = {"run": str(cfg.run), "checkpoints": written}
    print(json.dumps(result), flush=True)
    return result


def command_line(args: list[str]) -> list[str]:
    """The app's grammar in Hydra's: a first bare argument is ``run=``, and ``sigma_rel=a,b,c`` (which Hydra
    reads as a sweep) is the list ``sigma_rel=[a,b,c]``."""
    out = []
    for i, arg in enumerate(args):
        if i == 0 and "=" not in arg and not arg.startswith("-"):
            arg = f"run={arg}"
        key, _, value = arg.partition("=")
        if key == "sigma_rel" and "," in value and not value.startswith("["):
            arg = f"sigma_rel=[{value}]"
        out.append(arg)
    return out


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="posthoc")
@reported
def app(cfg: DictConfig) -> None:
    with one_line_on_stop(Phase()) as phase:
        main(cfg, phase)


def cli() -> None:
    """The console script ``genflow-posthoc``."""
    sys.argv[1:] = command_line(sys.argv[1:])
    run_app(app, "posthoc", lambda cfg: plan(cfg))


if __name__ == "__main__":
    cli()
