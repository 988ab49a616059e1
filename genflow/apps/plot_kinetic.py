"""Plot lambda-hat(s) of a dataset and its kinetic-optimal (alpha_t, sigma_t) against Cond-OT.

    python -m genflow.apps.plot_kinetic [data=digits|checkerboard] [out=DIR] [n=N] [queries=1024]

Writes DIR/lambda_<data>.png and DIR/ko_path_<data>.png and prints one JSON line (paths, Phi_1, kinetic
energies of KO / Cond-OT / cosine / VP on the data's normalisation, estimator time).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from genflow.config import Int, Str, plain_app
from genflow.errors import config_error, exit_on_error, strip_debug_flag
from genflow.outputs import check_writable, write_output


def load(name: str, n: int | None) -> torch.Tensor:
    if name == "checkerboard":
        from genflow.data.toy import sample_toy2d

        return sample_toy2d("checkerboard", n or 8192, torch.Generator().manual_seed(0))
    if name == "digits":
        try:
            from genflow.data.images import Digits

            dm = Digits()
            dm.setup("fit")
            x = dm.train_tensor()
        except ImportError:
            from sklearn.datasets import load_digits

            x = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 8 - 1
        return x[:n] if n else x
    raise config_error(f"unknown --data {name!r}", "the plot command knows two datasets", "use digits or checkerboard")


def main(argv=None) -> dict:
    schema = {"data": Str(choices=("digits", "checkerboard")), "out": Str(), "n": Int(2, null=True), "queries": Int(1)}
    args, _ = plain_app("plot_kinetic", sys.argv[1:] if argv is None else argv, __doc__, schema=schema)

    from genflow.viz import agg_figure

    from genflow.methods import CondOT, Cosine, KineticOptimal, VP, kinetic_energy
    from genflow.methods.flow import cached_separation
    from genflow.methods.kinetic import normalize

    check_writable(args.out, "out")  # before the separation is computed
    z, _, _ = normalize(load(args.data, args.n))
    start = time.perf_counter()
    sep = cached_separation(z, queries=args.queries)
    seconds = time.perf_counter() - start
    ko = KineticOptimal.from_separation(sep.s, sep.lam)
    out = Path(args.out)
    d = z[0].numel()

    s = sep.s[1:]
    fig = agg_figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.semilogx(s, sep.lam[1:], label=r"$\hat\lambda(s)$")
    ax.semilogx(s, s ** 2 / (1 + s ** 2), "--", label=r"$s^2/(1+s^2)$ (isotropic Gaussian)")
    ax.set(xlabel="SNR s = alpha/sigma", ylabel="lambda", title=f"{args.data} (n={z.shape[0]}, d={d})")
    ax.legend()
    fig.tight_layout()
    lam_png = out / f"lambda_{args.data}.png"
    write_output(lam_png, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))

    t = torch.linspace(0, 1, 501, dtype=torch.float64)
    o = ko(t)
    fig = agg_figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.plot(t, o.alpha_t, label=r"KO $\alpha_t$")
    ax.plot(t, o.sigma_t, label=r"KO $\sigma_t$")
    ax.plot(t, t, "--", color="gray", label=r"Cond-OT $\alpha_t = t$")
    ax.plot(t, 1 - t, ":", color="gray", label=r"Cond-OT $\sigma_t = 1-t$")
    ax.set(xlabel="t (0 = noise, 1 = data)", title=f"kinetic-optimal path, {args.data}")
    ax.legend()
    fig.tight_layout()
    path_png = out / f"ko_path_{args.data}.png"
    write_output(path_png, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))

    energies = {sch.name: round(float(kinetic_energy(sch, sep)), 5) for sch in (ko, CondOT(), Cosine(), VP())}
    result = {"data": args.data, "n": int(z.shape[0]), "d": int(d), "phi1": round(float(ko.phi1), 5),
              "kinetic_energy": energies, "lambda_seconds": round(seconds, 2),
              "plots": [str(lam_png), str(path_png)]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    strip_debug_flag()
    exit_on_error(main)
