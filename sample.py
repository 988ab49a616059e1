"""Sample a trained model (a Hydra app, configs/sample.yaml; `python sample.py --help`):
    python sample.py ckpt=PATH num=64 seeds=0-63 steps=18 solver=heun out=DIR [guidance=w] [batch=256] [device=cuda]
    python sample.py -m ckpt=PATH guidance=1,1.5,2 out=DIR      # one sub-folder of DIR per guidance

Writes one PNG per seed (images), grid.png and samples.npz, and ends with one JSON line. Image i depends
only on seed i, never on the batch size. The checkpoint is read with weights_only=True: no code is unpickled, and
its stored config may name only genflow's registry of classes (genflow.registry).
"""
import hydra
from omegaconf import DictConfig

from genflow.config import run_app
from genflow.errors import reported
from genflow.sample_cli import main as sample, validate


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
@reported
def main(cfg: DictConfig) -> None:
    sample(cfg, validated=True)


if __name__ == "__main__":
    run_app(main, "sample", validate)
