"""Train a generative model: python train.py model=pfgmpp D=128 data=digits [trainer.max_steps=N] [hydra.run.dir=DIR]

The same app as ``genflow-train`` and ``python -m genflow.apps.train`` (genflow/apps/train.py), from a checkout.
"""
from genflow.apps.train import cli

if __name__ == "__main__":
    cli()
