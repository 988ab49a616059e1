"""Plot SPD's per-frequency schedules for a dataset's estimated spectrum.

    python -m genflow.apps.plot_spd out=DIR [data=digits] [source=empirical|radial|constants] [T=1000]
                              [data.resolution=16 ...]

Writes DIR/spd_schedules.png (radial spectrum with its power-law fit; signal gain sqrt(abar_k(s));
noise variance 1 - abar_k(s); SNR = 1 crossing times per |k| for SPD and isotropic DDPM linear /
cosine on the same spectrum) and DIR/spd_schedules.json, and prints one JSON line.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from genflow.config import Int, Str, build_data, compose, plain_app
from genflow.errors import config_error, exit_on_error, strip_debug_flag
from genflow.methods import DDPM, SPD
from genflow.methods.spectrum import empirical_spectrum, fit_power_law, radial_frequency
from genflow.outputs import check_writable, write_output


def _radial_mean(values: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average the last two (spatial) dims of ``values`` over rings of equal |k| -> (radii, (..., n_radii))."""
    radii, inverse = torch.unique(k.flatten(), return_inverse=True)
    flat = values.flatten(-2)
    total = torch.zeros(*flat.shape[:-1], radii.numel(), dtype=flat.dtype).index_add_(-1, inverse, flat)
    return radii, total / torch.bincount(inverse).to(flat.dtype)


def isotropic_crossing(method: DDPM, S: torch.Tensor) -> torch.Tensor:
    """s* with abar(s) S / (1 - abar(s)) = 1, i.e. abar(s*) = 1 / (1 + S), for an isotropic schedule."""
    s = torch.linspace(0, 1, 200001, dtype=torch.float64)
    ab = method.alpha_bar(s).flip(0)                       # increasing
    idx = torch.searchsorted(ab, (1 / (1 + S)).flatten()).clamp(1, s.numel() - 1)
    return s.flip(0)[idx].reshape(S.shape)


def schedule_summary(spd: SPD, images: torch.Tensor | None = None) -> dict:
    S = spd.spectrum if spd.spectrum.ndim == 3 else spd.spectrum[None]
    k = radial_frequency(*S.shape[-2:])
    radii, S_r = _radial_mean(S, k)
    cross = spd.snr_crossing_time()
    cross = cross if cross.ndim == 3 else cross[None]
    out = {"spectrum_shape": list(spd.spectrum.shape), "T": spd.T, "source": spd.source,
           "fisher_length": float(spd.fisher_length()), "radii": radii.tolist(),
           "spectrum_radial": S_r.tolist(), "snr_crossing_spd": _radial_mean(cross, k)[1].tolist()}
    for name in ("linear", "cosine"):
        out[f"snr_crossing_ddpm_{name}"] = _radial_mean(isotropic_crossing(DDPM(name), S), k)[1].tolist()
    if images is not None:
        fit = fit_power_law(empirical_spectrum(images))
        out["power_law_fit"] = [dict(zip(("c1", "c2", "m"), row.tolist())) for row in fit]
    return out


def plot(spd: SPD, summary: dict, path: Path) -> Path:
    from matplotlib import colormaps

    from genflow.viz import agg_figure

    radii = torch.tensor(summary["radii"])
    S_r = torch.tensor(summary["spectrum_radial"])[0]
    s = torch.linspace(0, 1, 401, dtype=torch.float64)
    S = spd.spectrum if spd.spectrum.ndim == 3 else spd.spectrum[None]
    k = radial_frequency(*S.shape[-2:])
    ab = spd.alpha_bar(s)
    ab = ab if ab.ndim == 4 else ab[:, None]
    _, ab_r = _radial_mean(ab[:, 0], k)                    # (times, radii), channel 0
    colors = colormaps["viridis"]((radii / radii.max()).numpy())

    fig = agg_figure(figsize=(11, 8.5))
    axes = fig.subplots(2, 2)
    ax = axes[0, 0]
    ax.loglog(radii[1:], S_r[1:], "o", ms=3, label="estimated S (radial mean, ch 0)")
    ax.loglog([radii[1] * 0.8], [S_r[0]], "s", color="C3", label=f"DC: {float(S_r[0]):.3g}")
    fit = summary.get("power_law_fit")
    if fit:
        c1, c2, m = fit[0]["c1"], fit[0]["c2"], fit[0]["m"]
        kk = torch.linspace(float(radii[1]), float(radii[-1]), 100)
        ax.loglog(kk, c1 / (c2 + kk) ** m, "-", color="C1", label=f"fit c1={c1:.3g}, c2={c2:.3g}, m={m:.3g}")
    ax.set(xlabel="|k| (cycles per image)", ylabel="E|u_k|^2", title="Power spectrum (orthonormal FFT units)")
    ax.legend(fontsize=8)
    for j in range(radii.numel()):
        axes[0, 1].plot(s, ab_r[:, j].sqrt(), color=colors[j], lw=1)
        axes[1, 0].plot(s, 1 - ab_r[:, j], color=colors[j], lw=1)
    axes[0, 1].set(xlabel="s", ylabel="sqrt(abar_k(s))", title="Signal gain per |k| (yellow = high |k|): sharpening")
    axes[1, 0].set(xlabel="s", ylabel="1 - abar_k(s)", title="Noise variance per |k|: noise deblurring")
    ax = axes[1, 1]
    for key, label, style in (("snr_crossing_spd", "SPD", "o-"), ("snr_crossing_ddpm_linear", "DDPM linear", "s--"),
                              ("snr_crossing_ddpm_cosine", "DDPM cosine", "^:")):
        ax.plot(radii, summary[key][0], style, ms=3, label=label)
    ax.set(xlabel="|k|", ylabel="s* (SNR_k = 1)", title="SNR crossing time per frequency", ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.suptitle(f"SPD schedules, spectrum {tuple(spd.spectrum.shape)}, source={spd.source}, "
                 f"Fisher length {summary['fisher_length']:.2f}")
    fig.tight_layout()
    return write_output(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def main(argv=None) -> dict:
    schema = {"out": Str(null=True), "source": Str(choices=("empirical", "radial", "constants")), "T": Int(2)}
    args, data = plain_app("plot_spd", sys.argv[1:] if argv is None else argv, __doc__, schema=schema,
                           passthrough=("data",))
    if args.out is None:
        raise config_error("out= is missing", "the plot and its numbers are written into a folder",
                           "python -m genflow.apps.plot_spd out=DIR")
    check_writable(args.out, "out")  # before the spectrum is estimated
    cfg = compose(data)
    dm = build_data(cfg)
    spd = SPD(T=args.T, source=args.source)
    spd.prepare(dm)
    images = dm.train_tensor()
    summary = schedule_summary(spd, images)
    out = Path(args.out)
    png = plot(spd, summary, out / "spd_schedules.png")
    write_output(out / "spd_schedules.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
    line = {"plot": str(png), "json": str(out / "spd_schedules.json"), "data": cfg.data._target_.rsplit(".", 1)[-1],
            "spectrum_shape": summary["spectrum_shape"], "fisher_length": summary["fisher_length"],
            "snr_crossing_spd_range": [min(summary["snr_crossing_spd"][0]), max(summary["snr_crossing_spd"][0])],
            "power_law_fit": summary.get("power_law_fit")}
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    strip_debug_flag()
    exit_on_error(main)
