"""FID of a generative model with the protocol of EDM / PFGM++ (``fid.py``).

- Image i is generated from seed i (``genflow.sampling.generate`` seeds every image with its own
  generator), seeds 0..N-1 for the first set, N..2N-1 for the second, ...; the reported FID is the
  minimum over ``seed_sets`` sets (EDM reports the minimum of three).
- Seeds are sharded over ranks (rank r takes seeds r, r+W, ...); feature statistics are float64 sums
  all-reduced across ranks, so the FID does not depend on the batch size or the number of processes.
- The reference is the full training split by default (statistics cached by content hash, see
  ``reference.py``); an EDM / clean-fid ``.npz`` or ``cleanfid:<name>`` can be given instead.
- With ``extractor="dinov2"`` the Fréchet distance is EDM2's FD_DINOv2 and is also reported as ``fd_dinov2``;
  ``kid=True`` adds KID and ``pr=True`` improved precision and recall (``precision_recall.py``, k = 3), both
  from up to ``pr_num`` kept features per side (the best seed set's).

``FIDEvaluator`` holds the extractor and reference once (the training callback reuses it every N
steps); ``evaluate_fid`` is the one-call form used by train.py, evaluate.py and the leaderboard.
"""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch
from torch import Tensor

from genflow.errors import config_error
from genflow.metrics.features import build_feature_extractor
from genflow.metrics.fid import FeatureStats, frechet_distance, kernel_distance
from genflow.metrics.precision_recall import precision_recall
from genflow.metrics.reference import ReferenceStats, load_reference, reference_stats


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


class FIDEvaluator:
    """Feature extractor + reference statistics, and the seeded, sharded generation loop.

    ``extractor``: "inception", "digits", a ``{_target_: ...}`` config or an nn.Module; None takes the
    datamodule's ``feature_extractor``. ``ref``: "train" (default), "val", or a statistics file.
    """

    def __init__(self, datamodule=None, *, extractor: Any = None, mode: str = "clean", inception_path=None,
                 download: bool = False, ref: str = "train", cache_dir=None, kid: bool = False,
                 kid_subset_size: int = 1000, kid_subsets: int = 100, batch_size: int = 256, progress: bool = False,
                 pr: bool = False, pr_num: int = 10000, pr_k: int = 3, dinov2_path=None):
        self.datamodule = datamodule
        spec = extractor if extractor is not None else getattr(datamodule, "feature_extractor", None)
        if spec is None:
            raise config_error("no FID feature extractor", "neither fid.extractor nor the datamodule names one",
                               "pass fid.extractor=inception (images) or fid.extractor=digits")
        self.spec, self.mode, self.inception_path, self.download = spec, mode, inception_path, download
        self.ref, self.cache_dir, self.kid = str(ref), cache_dir, kid
        self.pr, self.pr_num, self.pr_k, self.dinov2_path = pr, int(pr_num), int(pr_k), dinov2_path
        self.kid_subset_size, self.kid_subsets = kid_subset_size, kid_subsets
        self.batch_size, self.progress = batch_size, progress
        if self.ref in ("train", "val") and datamodule is None:
            raise config_error(f"fid.ref={self.ref} needs a datamodule", "the reference set comes from the data",
                               "pass the datamodule, or fid.ref=/path/to/stats.npz")
        for flag, on in (("kid", kid), ("pr", pr)):
            if on and self.ref not in ("train", "val"):
                raise config_error(f"fid.{flag}=true with fid.ref={self.ref}",
                                   f"{'KID' if flag == 'kid' else 'precision/recall'} needs reference features, and "
                                   "a statistics file holds only mu and sigma",
                                   f"use fid.ref=train (or val) with it, or fid.{flag}=false")
        self.extractor = None
        self.reference: ReferenceStats | None = None
        self.ref_features: Tensor | None = None
        self.device = None

    # --- one-time setup -------------------------------------------------------------------------
    def build_extractor(self, device=None):
        """The extractor alone (cheap): resolves weights so a missing file fails before any training."""
        if self.extractor is None:
            self.extractor = build_feature_extractor(self.spec, mode=self.mode, inception_path=self.inception_path,
                                                     download=self.download, dinov2_path=self.dinov2_path)
        if device is not None:
            self.extractor = self.extractor.to(device)
            self.device = torch.device(device)
        return self.extractor

    def setup(self, device=None) -> "FIDEvaluator":
        self.build_extractor(device)
        if self.reference is not None:
            return self
        dist, rank, world = _dist()
        if self.ref in ("train", "val"):
            dm = self.datamodule
            images = dm.train_tensor() if self.ref == "train" else dm.val_tensor()
            if images.shape[0] < 2:
                raise config_error(f"fid.ref={self.ref}: the {self.ref} split has {images.shape[0]} images",
                                   "a covariance needs at least two", "use fid.ref=train or a statistics file")
            name = getattr(dm, "name", type(dm).__name__.lower())
            # rank 0 computes and caches; the others wait and read the cache
            if dist is not None and rank != 0:
                dist.barrier()
            self.reference = reference_stats(self.extractor, images, dataset=name, split=self.ref,
                                             directory=self.cache_dir, batch_size=self.batch_size,
                                             progress=self.progress and rank == 0)
            if dist is not None and rank == 0:
                dist.barrier()
            if self.kid or self.pr:
                sub = images[: self.kept_count()]
                self.ref_features = torch.cat([self.extractor(sub[i:i + self.batch_size]).cpu()
                                               for i in range(0, sub.shape[0], self.batch_size)])
        else:
            self.reference = load_reference(self.ref, download=self.download)
        dim = getattr(self.extractor, "dim", None)
        if dim is not None and self.reference.mu.shape[0] != dim:
            raise config_error(
                f"reference {self.reference.source} has {self.reference.mu.shape[0]}-d features but the "
                f"{getattr(self.extractor, 'name', 'extractor')} extractor gives {dim}-d",
                "reference statistics must come from the same feature network",
                "use statistics made with this extractor, or fid.ref=train to compute them")
        return self

    def kept_count(self) -> int:
        """Raw features kept per side: KID's subsets draw from ten subsets' worth, precision/recall use pr_num."""
        return max(self.kid_subset_size * 10 if self.kid else 0, self.pr_num if self.pr else 0)

    # --- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample_stats(self, method, net, seeds: Sequence[int], shape: Sequence[int], *, steps: int = 18,
                     solver: str = "heun", guidance: float | None = None, batch_size: int | None = None,
                     device=None, time_limit: float | None = None, precision: str = "fp32",
                     counts: dict | None = None, solver_options: dict | None = None, partial=None,
                     seed_set: int = 0) -> FeatureStats:
        """Generate images for this rank's share of ``seeds`` and accumulate their feature statistics
        (all-reduced over ranks); ``precision`` is the network's arithmetic (fp32, the papers' protocol,
        or bf16). With ``time_limit`` (seconds) generation stops early on every rank
        once it is exceeded; the statistics then cover the images made so far. ``counts`` accumulates this
        rank's images and network evaluations and ``solver_options`` are the sampler's settings
        (``genflow.sampling.generate``). A class-conditional model's labels are drawn from each seed's
        generator, as EDM's generate.py draws them. ``partial`` (a ``PartialFID``, one process only) keeps the
        progress of seed set ``seed_set`` as it goes and continues it from the batches already done."""
        from genflow.sampling import generate, sample_conditions

        device = torch.device(device or self.device or "cpu")
        self.setup(device)
        dist, rank, world = _dist()
        mine = list(seeds)[rank::world]
        batch = int(batch_size or self.batch_size)
        num_batches = math.ceil(math.ceil(len(seeds) / world) / batch)  # equal on every rank
        keep = self.kept_count()
        stats = FeatureStats(getattr(self.extractor, "dim", None), keep_features=keep, device=device)
        done = partial.resume(seed_set, stats) if partial is not None else 0
        start = time.perf_counter()
        chunks = range(done, num_batches)
        if self.progress and rank == 0:
            from genflow.progress import track

            chunks = track(chunks, description=f"FID: generating {len(seeds) - min(done * batch, len(seeds))} "
                           f"images" + (f" ({done * batch} kept from before)" if done else ""))
        for b in chunks:
            part = mine[b * batch:(b + 1) * batch]
            if part:
                dm = self.datamodule
                cond = sample_conditions(dm, part, device) if dm is not None else None
                images = generate(method, net, part, shape, steps=steps, solver=solver, cond=cond,
                                  guidance=guidance, batch_size=batch, device=device, precision=precision,
                                  counts=counts, solver_options=solver_options,
                                  num_classes=getattr(dm, "num_classes", 0) or 0)
                stats.update(self.extractor(images))
            if partial is not None:
                partial.after_batch(seed_set, b + 1, min((b + 1) * batch, len(mine)), stats)
            if time_limit is not None:
                over = torch.tensor([float(time.perf_counter() - start > time_limit)], device=device)
                if dist is not None:
                    dist.all_reduce(over, op=dist.ReduceOp.MAX)
                if over.item() > 0:
                    break
        return stats.all_reduce()

    def score(self, stats: FeatureStats, generator: torch.Generator | None = None) -> dict:
        self.setup()
        out = {"fid": frechet_distance(stats.mean, stats.cov, self.reference.mu, self.reference.sigma)}
        if self.kid:
            feats = stats.kept_features()
            m = min(self.kid_subset_size, feats.shape[0], self.ref_features.shape[0])
            out["kid"] = kernel_distance(feats, self.ref_features, num_subsets=self.kid_subsets,
                                         max_subset_size=m, generator=generator)
        if self.pr:
            got = precision_recall(self.ref_features[: self.pr_num], stats.kept_features()[: self.pr_num], k=self.pr_k)
            out["pr_precision"], out["pr_recall"] = got["precision"], got["recall"]
        return out


def evaluate_fid(module=None, datamodule=None, *, method=None, net=None, num: int = 50000, seed_start: int = 0,
                 seed_sets: int = 1, steps: int = 18, solver: str = "heun", guidance: float | None = None,
                 batch_size: int = 256, device=None, time_limit: float | None = None, evaluator: FIDEvaluator | None = None,
                 prefix: str = "fid", shape: Sequence[int] | None = None, precision: str = "fp32",
                 solver_options: dict | None = None, partial=None, **evaluator_kwargs) -> dict:
    """FID (min over ``seed_sets`` sets of ``num`` seeds each) of ``module`` (a GenerativeModule, or
    ``method`` + ``net``) against the reference; returns a flat dict for the final JSON line.

    ``evaluator_kwargs`` go to ``FIDEvaluator`` (extractor, mode, inception_path, download, ref, cache_dir,
    kid, pr, pr_num, dinov2_path, progress). ``precision`` (fp32 | bf16) is the network's arithmetic while generating: fp32 is
    EDM's protocol and the default wherever a number is compared with a paper; it is part of the result.
    ``solver_options``: the sampler's settings (e.g. EDM's churn, dpmpp_2m's ``schedule``), checked against the
    solver before any work. ``partial``: a ``genflow.metrics.partial.PartialFID`` that keeps the progress in
    a file as it goes and continues from it (one process; the caller removes the file once the result is out).
    """
    from genflow.sampling import check_precision, nfe_per_image

    check_precision(precision)
    if num < 2:
        raise config_error(f"fid.num={num}", "FID needs at least two generated images (a covariance)",
                           "use fid.num=50000 for paper numbers, or a few hundred for a quick check")
    if seed_sets < 1:
        raise config_error(f"fid.seed_sets={seed_sets}", "at least one set of seeds is needed",
                           "use fid.seed_sets=1, or 3 for EDM's minimum over three sets")
    method = method if method is not None else module.method
    net = net if net is not None else module.net
    method.check_solver(solver, "fid.solver", solver_options)
    if device is None:
        device = module.device if module is not None else next(net.parameters()).device
    device = torch.device(device)
    if datamodule is not None and hasattr(datamodule, "setup"):
        datamodule.setup()
    evaluator = evaluator or FIDEvaluator(datamodule, batch_size=batch_size, **evaluator_kwargs)
    evaluator.setup(device)
    if shape is None:
        if datamodule is None:
            raise config_error("evaluate_fid got neither a datamodule nor shape=", "it must know what to generate",
                               "pass the datamodule (which also gives the reference) or shape=(C, H, W)")
        shape = datamodule.data_shape
    shape = tuple(shape)
    was_training = net.training
    net.eval()
    values, extra, counts, generated = [], [], [], {}
    if partial is not None:  # seed sets finished before a stop, and the generator's counts of them
        generated = partial.counts
        for done in partial.sets:
            values.append(done["fid"])
            counts.append(done["images"])
            extra.append({k: v for k, v in done.items() if k not in ("fid", "images")})
    made_before = sum(counts) + (partial.images_kept if partial is not None else 0)
    start = time.perf_counter()
    for s in range(len(values), seed_sets):
        seeds = range(seed_start + s * num, seed_start + (s + 1) * num)
        stats = evaluator.sample_stats(method, net, seeds, shape, steps=steps, solver=solver, guidance=guidance,
                                       batch_size=batch_size, device=device, time_limit=time_limit,
                                       precision=precision, counts=generated, solver_options=solver_options,
                                       partial=partial, seed_set=s)
        scored = evaluator.score(stats)
        values.append(scored["fid"])
        counts.append(stats.n)
        extra.append({k: v for k, v in scored.items() if k != "fid"})
        if partial is not None:
            partial.after_set(scored, stats.n)
    wall = time.perf_counter() - start
    net.train(was_training)
    best = min(range(seed_sets), key=lambda i: values[i])
    out = {
        prefix: round(values[best], 6),
        f"{prefix}_images": counts[best],
        f"{prefix}_extractor": getattr(evaluator.extractor, "name", type(evaluator.extractor).__name__),
        f"{prefix}_precision": precision,
        f"{prefix}_ref": evaluator.ref if evaluator.ref in ("train", "val") else evaluator.reference.source,
        # the images generated by this call (a continued evaluation's share), over its wall time
        f"{prefix}_img_per_s": round((sum(counts) - made_before) / max(wall, 1e-9), 2),
        # measured (this process's share): an adaptive solver's NFE is known only after the solves
        f"{prefix}_nfe": nfe_per_image(generated),
        f"{prefix}_wall_s": round(wall, 2),
    }
    if seed_sets > 1:
        out[f"{prefix}_sets"] = [round(v, 6) for v in values]
    for key, value in extra[best].items():  # KID, precision and recall of the reported (best) seed set
        out[key] = round(value, 8)
    if out[f"{prefix}_extractor"] == "dinov2":
        out["fd_dinov2"] = out[prefix]  # EDM2's name for the Fréchet distance in DINOv2 features
    return out
