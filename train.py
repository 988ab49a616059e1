"""Train a generative model: python train.py model=pfgmpp D=128 data=digits [trainer.max_steps=N] [hydra.run.dir=DIR]

Composes configs/train.yaml with Hydra, builds (module, datamodule) through genflow.config.build, fits with
Lightning, writes the EMA checkpoint, a sample grid and (where configured) FID, and ends with one JSON line.
A bad input ends in `error: what / why / fix` and exit 2 before anything is built (--debug: the traceback).
"""
import hydra
from omegaconf import DictConfig

from genflow.config import run_app
from genflow.errors import reported
from genflow.apps.train import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@reported
def main(cfg: DictConfig) -> None:
    train(cfg, validated=True)  # run_app checked this command line (every job of a sweep) before Hydra ran


if __name__ == "__main__":
    run_app(main, "train")
