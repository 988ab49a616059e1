"""Reference statistics: computed once per (dataset, split, resolution, extractor), cached by content hash.

A cache file is an ``.npz`` with ``mu``, ``sigma`` (the layout of EDM's ``fid-refs/*.npz`` and of
clean-fid's stats files, so either can be passed as a reference) plus ``n`` and the key it was made for.
The key holds the extractor's fingerprint (hash of its weights and mode) and a SHA-256 of the image
tensor itself, so changed data or weights can never reuse stale statistics.

Reference sources understood by ``load_reference``:
- a path to an ``.npz`` with ``mu`` and ``sigma`` (EDM ``cifar10-32x32.npz``, clean-fid
  ``cifar10_legacy_tensorflow_train_32.npz``, or a genflow cache file);
- ``cleanfid:<name>``, e.g. ``cleanfid:cifar10_legacy_tensorflow_train_32``: a file in clean-fid's
  stats folder or in $GENFLOW_METRICS_HOME (downloaded there only with ``download=True``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from genflow.cache import cached, content_hash
from genflow.errors import config_error
from genflow.metrics.features import extract_features, metrics_home


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int = 0
    source: str = ""


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    return Path(path).expanduser() if path else metrics_home() / "fid-refs"


def load_reference(source: str | os.PathLike, download: bool = False) -> ReferenceStats:
    """Load (mu, sigma) from an .npz path or a ``cleanfid:<name>`` statistics name."""
    s = str(source)
    if s.startswith("cleanfid:"):
        import cleanfid

        name = s.split(":", 1)[1].lower().removesuffix(".npz") + ".npz"
        places = [Path(cleanfid.__file__).parent / "stats" / name, metrics_home() / "fid-refs" / name]
        found = next((p for p in places if p.is_file()), None)
        if found is None and download:
            from cleanfid.downloads_helper import check_download_url

            found = Path(check_download_url(str(places[1].parent), f"https://www.cs.cmu.edu/~clean-fid/stats/{name}"))
        if found is None:
            raise config_error(
                f"clean-fid statistics {name} not found (looked at: {', '.join(map(str, places))})",
                "reference statistics are never downloaded unless asked",
                f"copy {name} from https://www.cs.cmu.edu/~clean-fid/stats/ into {places[1].parent}, "
                "or pass fid.download=true on a networked machine",
            )
        path = found
    else:
        path = Path(s).expanduser()
        if not path.is_file():
            raise config_error(
                f"reference statistics {path} not found",
                "FID needs the mean and covariance of the reference set's features",
                "pass fid.ref=/path/to/stats.npz (EDM fid-refs/*.npz or clean-fid stats), or fid.ref=train "
                "to compute them from the training set once",
            )
    with np.load(path) as z:
        if "mu" not in z or "sigma" not in z:
            raise config_error(f"{path} has no mu/sigma arrays (keys: {list(z.keys())})",
                               "a reference file must hold the feature mean 'mu' and covariance 'sigma'",
                               "use an EDM fid-refs .npz, a clean-fid stats .npz, or fid.ref=train")
        n = int(z["n"]) if "n" in z else 0
        return ReferenceStats(np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64), n, str(path))


def reference_stats(extractor, images: Tensor, *, dataset: str, split: str = "train", directory=None,
                    batch_size: int = 256, progress: bool = False) -> ReferenceStats:
    """Statistics of ``extractor`` features over ``images``, cached on disk under a content-hash key."""
    res = "x".join(str(s) for s in images.shape[1:])
    key = f"{dataset}_{split}_{res}_{extractor.fingerprint()}_{content_hash(images, length=16)}"
    path = cache_dir(directory) / f"{key}.npz"

    def compute() -> ReferenceStats:
        stats = extract_features(extractor, images, batch_size=batch_size, progress=progress)
        mu, sigma = stats.stats()
        return ReferenceStats(mu, sigma, stats.n, str(path))

    def save(ref: ReferenceStats, tmp) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez(f, mu=ref.mu, sigma=ref.sigma, n=np.int64(ref.n), key=np.array(json.dumps({"key": key})))

    return cached(path, compute, load=load_reference, save=save)
