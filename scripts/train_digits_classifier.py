"""Train the digits classifier whose penultimate features define digits-FID.

Reproduces ``assets/digits_classifier.safetensors`` (plus a ``.json`` with its accuracies):

    python scripts/train_digits_classifier.py [--epochs 60] [--seed 0] [--out assets/digits_classifier]

It trains on exactly the training split of ``genflow.data.Digits`` (scikit-learn's 8x8 digits, fixed
permutation, 10% held out) so that digits-FID of the held-out split against the training split
measures generalisation, not memorisation by the feature network. Augmentation (1-pixel shifts and
small Gaussian noise) keeps the features smooth around the data, which FID of imperfect samples needs.
Deterministic on CPU: same seed, same file.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from genflow.data import Digits
from genflow.metrics.features import DIGITS_WEIGHTS, DigitsClassifier


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (b,), generator=gen)
    dy = torch.randint(0, 3, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(8))[:, None, :, None].expand(b, 1, 8, 10)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(8))[:, None, None, :].expand(b, 1, 8, 8)
    shifted = shifted.gather(3, cols)
    return (shifted + 0.1 * torch.randn(shifted.shape, generator=gen)).clamp(-1, 1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DIGITS_WEIGHTS.with_suffix("")))
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    dm = Digits(resolution=8, conditional=True)
    x, y = dm.train_tensor(), dm.train_labels()
    xv = dm.val_tensor()
    yv = dm._val.labels
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * ((x.shape[0] + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    for _ in range(args.epochs):
        model.train()
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], args.batch_size):
            idx = perm[i : i + args.batch_size]
            loss = F.cross_entropy(model(augment(x[idx], gen)), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc_train = (model(x).argmax(1) == y).float().mean().item()
        acc_val = (model(xv).argmax(1) == yv).float().mean().item()

    from safetensors.torch import save_file

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out.with_suffix(".safetensors")))
    info = {"train_accuracy": round(acc_train, 4), "val_accuracy": round(acc_val, 4), "epochs": args.epochs,
            "seed": args.seed, "n_train": int(x.shape[0]), "n_val": int(xv.shape[0]),
            "weights": out.with_suffix(".safetensors").name}
    out.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info))
    return info


if __name__ == "__main__":
    main()
