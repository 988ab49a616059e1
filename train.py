"""Train a generative model: python train.py model=pfgmpp D=128 data=digits [trainer.max_steps=N] [hydra.run.dir=DIR]

Composes configs/train.yaml with Hydra, builds (module, datamodule) through genflow.config.build, fits with
Lightning, writes the EMA checkpoint, a sample grid and (where configured) FID, and ends with one JSON line.
"""
import sys

import hydra
from omegaconf import DictConfig

from genflow.config import check_choices
from genflow.errors import exit_on_error
from genflow.run import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    exit_on_error(train, cfg)  # genflow's errors inside the Hydra job: what/why/fix and exit 2, no traceback


if __name__ == "__main__":
    exit_on_error(check_choices, [a for a in sys.argv[1:] if not a.startswith("-")])
    main()
