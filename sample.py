"""Sample a trained model:
    python sample.py ckpt=PATH num=64 seeds=0-63 steps=18 solver=heun out=DIR [guidance=w] [batch=256] [device=cuda]

Writes one PNG per seed (images), grid.png and samples.npz, and ends with one JSON line. Image i depends
only on seed i, never on the batch size. The checkpoint is read with weights_only=True: no code is unpickled.
"""
from genflow.sample_cli import cli

if __name__ == "__main__":
    cli()
