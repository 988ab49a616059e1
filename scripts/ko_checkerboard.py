"""KO vs Cond-OT flow matching on the 2-D checkerboard at low Euler NFE (Shaul et al. 2023, Fig. 2).

Trains one small MLP flow per path and seed on CPU (fixed seeds, data normalised as Eqs. 7-8 require),
samples with Euler at NFE 2, 6, 10, 16 and scores sliced Wasserstein-2 against held-out points.
Prints a markdown table (mean +- std over seeds) and one JSON line.

    python scripts/ko_checkerboard.py [--seeds 3] [--steps 3000]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from genflow.data.toy import sample_toy2d
from genflow.methods import CondOT, FlowMatching, KineticOptimal, kinetic_energy
from genflow.methods.kinetic import estimate_separation, normalize
from genflow.metrics.sliced import sliced_wasserstein
from genflow.nets.mlp import MLP

NFES = (2, 6, 10, 16)


def train(method: FlowMatching, data: torch.Tensor, *, steps: int, batch: int, seed: int) -> MLP:
    torch.manual_seed(seed)
    net = MLP(data_shape=(2,), hidden=64, num_blocks=2)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = data[torch.randint(data.shape[0], (batch,), generator=g)]
        loss = method.loss(net, x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
    return net.eval()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-eval", type=int, default=10000)
    args = p.parse_args(argv)
    start = time.perf_counter()

    train_x = sample_toy2d("checkerboard", args.n_train, torch.Generator().manual_seed(0))
    test_x = sample_toy2d("checkerboard", args.n_eval, torch.Generator().manual_seed(1))
    z, mean, scale = normalize(train_x)
    test_z = (test_x - mean) / scale
    t0 = time.perf_counter()
    sep = estimate_separation(z[:8192], generator=torch.Generator().manual_seed(0))
    lam_s = time.perf_counter() - t0
    paths = {"condot": CondOT(), "ko": KineticOptimal.from_separation(sep.s, sep.lam)}
    energy = {k: float(kinetic_energy(v, sep)) for k, v in paths.items()}

    sw = {k: {n: [] for n in NFES} for k in paths}
    for seed in range(args.seeds):
        for name, path in paths.items():
            method = FlowMatching(path)
            net = train(method, z, steps=args.steps, batch=args.batch, seed=seed)
            print(f"seed {seed} {name}: trained ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
            noise = method.prior_sample((args.n_eval, 2), generator=torch.Generator().manual_seed(1000 + seed))
            with torch.no_grad():
                for n in NFES:
                    out = method.sample(net, noise, steps=n, solver="euler")
                    val = sliced_wasserstein(out, test_z, projections=256,
                                             generator=torch.Generator().manual_seed(7))
                    sw[name][n].append(float(val))

    def fmt(v):
        t = torch.tensor(v)
        return f"{float(t.mean()):.4f} ± {float(t.std()) if len(v) > 1 else 0.0:.4f}"

    lines = ["| path | KE | " + " | ".join(f"SW2 @ NFE {n}" for n in NFES) + " |",
             "|---|---|" + "---|" * len(NFES)]
    for name in paths:
        lines.append(f"| {name} | {energy[name]:.3f} | " + " | ".join(fmt(sw[name][n]) for n in NFES) + " |")
    print("\n".join(lines))
    result = {"experiment": "ko_checkerboard", "seeds": args.seeds, "train_steps": args.steps,
              "phi1": float(paths["ko"].phi1), "kinetic_energy": energy, "lambda_seconds": round(lam_s, 2),
              "sliced_w2": {k: {str(n): v for n, v in d.items()} for k, d in sw.items()},
              "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
