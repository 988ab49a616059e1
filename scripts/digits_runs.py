"""What the digits FID-vs-NFE scripts share: the command-line options of a training run and the run itself
(genflow's own training, configs/train.yaml + overrides, in OUT/<name>, reused with --reuse)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

from genflow.apps.train import train
from genflow.config import compose


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seed-start", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="reuse OUT/<model>/checkpoints/final.ckpt if present")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra training overrides")


def train_model(name: str, overrides: list[str], args, out: Path) -> Path:
    """Train ``overrides`` on digits for ``args.train_steps`` steps in OUT/<name>; the final checkpoint's path."""
    run_dir = out / name
    ckpt = run_dir / "checkpoints" / "final.ckpt"
    if args.reuse and ckpt.is_file():
        return ckpt
    cfg = compose([*overrides, "data=digits", f"trainer.max_steps={args.train_steps}", f"seed={args.seed}",
                   "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", *args.set])
    OmegaConf.update(cfg, "run_dir", str(run_dir), force_add=True)
    return Path(train(cfg)["checkpoint"])
