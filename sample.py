"""Sample a trained model: python sample.py ckpt=PATH num=64 steps=18 solver=heun out=DIR [guidance=w]

The same app as ``genflow-sample`` and ``python -m genflow.apps.sample`` (genflow/apps/sample.py), from a checkout.
"""
from genflow.apps.sample import cli

if __name__ == "__main__":
    cli()
