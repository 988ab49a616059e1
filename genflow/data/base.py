"""The datamodule contract: batches are ``(x, cond)`` with ``cond`` a dict (possibly empty).

Subclasses build tensors once (``_load``) and the base class turns them into loaders. Images are
float32 NCHW in [-1, 1]; vectors (B, d). ``instance_noise`` perturbs the training points with
N(0, sigma^2) (the noise-perturbed likelihood paper's regulariser): ``instance_noise_mode=fixed`` (the
paper, Chae et al.: each training point perturbed once, Y_i = X_i + sigma eps_i, eps_i drawn from the
data seed) or ``fresh`` (a new draw on every batch, on the batch's device).
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Literal

import torch
import pytorch_lightning as pl
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from genflow.data.augment import AugmentPipe
from genflow.errors import config_error


class Preloaded(Dataset):
    """A dataset over preloaded tensors ``x`` (and others, alone or in dicts), read a whole batch at a time
    (``__getitems__``). ``to(device)`` moves every one of them (``data.on_device``)."""

    x: Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        x, cond = self.__getitems__([i])
        return x[0], {k: v[0] for k, v in cond.items()}

    def to(self, device) -> "Preloaded":
        moved = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(moved, name, value.to(device))
            elif isinstance(value, dict):
                setattr(moved, name, {k: v.to(device) if isinstance(v, Tensor) else v for k, v in value.items()})
        return moved

    def batch_index(self, indices: list[int]) -> Tensor:
        """The indices as a tensor on the data's device (a pinned, asynchronous copy: no wait for the GPU)."""
        idx = torch.as_tensor(indices)
        return idx.pin_memory().to(self.x.device, non_blocking=True) if self.x.is_cuda else idx


class TensorPairs(Preloaded):
    """(x_i, {"class": onehot_i}) pairs over preloaded tensors."""

    def __init__(self, x: Tensor, labels: Tensor | None, num_classes: int):
        self.x, self.labels, self.num_classes = x, labels, num_classes

    def __getitems__(self, indices: list[int]):
        """A whole batch in one indexing op (the DataLoader calls this instead of one item at a time)."""
        idx = self.batch_index(indices)
        if self.labels is None or self.num_classes == 0:
            return self.x[idx], {}
        return self.x[idx], {"class": torch.nn.functional.one_hot(self.labels[idx], self.num_classes).float()}


def _as_is(batch):
    return batch


def _batched_collate(dataset: Dataset):
    """Datasets that build whole batches (``__getitems__``) need no per-item collation."""
    return _as_is if hasattr(dataset, "__getitems__") else None


class ResumableSampler(Sampler[int]):
    """An endless stream of reshuffled passes over the data whose order is a function of
    (seed, position) only, sharded by rank: a run resumed at step k sees exactly the batches an
    uninterrupted run sees from step k on, on any number of processes."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        per_pass = self.n // global_batch  # whole global batches per pass; the remainder is dropped
        if per_pass == 0:
            raise ValueError(f"{self.n} examples cannot fill one global batch of {global_batch}")
        step = self.start_step
        while True:
            p, b = divmod(step, per_pass)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + p))
            lo = b * global_batch + self.rank * self.batch_size
            yield from perm[lo:lo + self.batch_size].tolist()
            step += 1


INSTANCE_NOISE_MODES = ("fixed", "fresh")


class GenerativeDataModule(pl.LightningDataModule, ABC):
    #: name of the FID feature extractor that fits this data (see genflow.metrics)
    feature_extractor: str = "inception"
    #: default name used for cached reference statistics
    name: str = "data"
    #: number of quantization levels of the raw data (256 for 8-bit images), None for continuous data;
    #: likelihood evaluation dequantizes with it
    levels: int | None = None

    def __init__(self, batch_size: int = 128, num_workers: int = 0, conditional: bool = False,
                 instance_noise: float = 0.0, val_fraction: float = 0.1, seed: int = 0, augment_p: float = 0.0,
                 instance_noise_mode: Literal["fixed", "fresh"] = "fixed", on_device: bool = False):
        super().__init__()
        if batch_size < 1:
            raise config_error(f"data.batch_size={batch_size} is not positive", "a batch needs at least one item",
                               "set data.batch_size to a positive integer")
        if instance_noise < 0:
            raise config_error(f"data.instance_noise={instance_noise} is negative", "it is a standard deviation",
                               "use data.instance_noise=0 (off) or a positive value such as 0.05")
        if instance_noise_mode not in INSTANCE_NOISE_MODES:
            raise config_error(f"data.instance_noise_mode={instance_noise_mode!r} is unknown",
                               "instance noise perturbs each training point once (fixed, the paper's estimator) "
                               "or anew on every batch (fresh)", "use data.instance_noise_mode=fixed or fresh")
        self.instance_noise_mode = instance_noise_mode
        self.batch_size, self.num_workers, self.conditional = batch_size, num_workers, conditional
        self.instance_noise, self.val_fraction, self.seed = instance_noise, val_fraction, seed
        self._train = self._val = None
        # on_device: the training split is copied once to the training GPU and batches are gathered there
        # (no loader workers, no host-to-device copies per step); for data sets that fit (CIFAR-10: 0.6 GB)
        self.on_device, self._train_on_device = on_device, None
        # EDM's non-leaky augmentation (genflow/data/augment.py): images plus a 9-dim label in cond["augment"]
        self.augment = AugmentPipe.edm(augment_p) if augment_p != 0 else None

    # --- subclasses --------------------------------------------------------------------------
    @abstractmethod
    def _load(self) -> tuple[Tensor, Tensor | None]:
        """All examples (float32, normalised) and integer labels or None."""

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.train_tensor().shape[1:])

    @property
    def num_classes(self) -> int:
        return self._num_classes if self.conditional else 0

    _num_classes: int = 0

    # --- shared ------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        x, labels = self._load()
        if self.augment is not None and x.ndim != 4:
            raise config_error(f"data.augment_p={self.augment.p} was set for data of shape {tuple(x.shape[1:])}",
                               "the augmentation pipe transforms images (C, H, W)", "set data.augment_p=0")
        if self.conditional and labels is None:
            raise config_error(f"data={self.name} has no class labels", "data.conditional=true needs labels",
                               "set data.conditional=false or use a labelled dataset")
        # a fixed permutation keeps the held-out split identical across runs and processes
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1234))
        n_val = self.held_out(x.shape[0])
        val, train = perm[:n_val], perm[n_val:]
        pick = (lambda idx: None) if labels is None else (lambda idx: labels[idx])
        self._train = TensorPairs(x[train], pick(train), self._num_classes)
        self._val = TensorPairs(x[val], pick(val), self._num_classes)

    def train_tensor(self) -> Tensor:
        self.setup()
        return self._train.x

    def val_tensor(self) -> Tensor:
        self.setup()
        return self._val.x

    def train_labels(self) -> Tensor | None:
        self.setup()
        return self._train.labels

    def fit_dataset(self) -> Dataset:
        """What training draws from: the training set, each point perturbed once with
        ``instance_noise_mode=fixed`` (noise drawn from the data seed, so identical on every rank and resume)."""
        self.setup()
        if not (self.instance_noise > 0 and self.instance_noise_mode == "fixed"):
            return self._train
        if getattr(self, "_fit", None) is None:
            import copy

            x = self._train.x
            eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + 7), dtype=x.dtype)
            self._fit = copy.copy(self._train)
            self._fit.x = x + self.instance_noise * eps
        return self._fit

    def held_out(self, total: int) -> int:
        """How many of ``total`` examples the validation split holds (the rest is trained on)."""
        return int(round(self.val_fraction * total))

    def examples(self) -> int | None:
        """How many examples the data set holds, known without loading it (None when it must be loaded to
        tell): lets the batch size be checked before a run starts."""
        return None

    def check_batch_size(self, world: int = 1, *, loaded: bool = True) -> None:
        """Refuse a batch larger than each process's share of the training set (rather than train on a
        smaller one while the settings, the JSON line and ``train_img_per_s`` report the requested size).
        ``loaded=False``: from ``examples()`` alone, before anything is loaded (nothing checked if unknown)."""
        if loaded:
            self.setup()
            train = len(self.fit_dataset())
        else:
            total = self.examples()
            if total is None:
                return
            train = total - self.held_out(total)
        per_process = train // world
        if self.batch_size > per_process:
            share = f" ({per_process} per process of {world})" if world > 1 else ""
            raise config_error(
                f"data.batch_size={self.batch_size} is larger than the training set: {train} "
                f"points{share}", "a batch is drawn without replacement from one pass over the data",
                f"use data.batch_size={max(per_process, 1)} or less, or more training data")

    def train_dataloader(self) -> DataLoader:
        self.setup()
        fit = self.fit_dataset()
        trainer = self.trainer
        rank, world, step = (trainer.global_rank, trainer.world_size, trainer.global_step) if trainer else (0, 1, 0)
        self.check_batch_size(world)
        batch = self.batch_size
        sampler = ResumableSampler(len(fit), batch, self.seed, start_step=step, rank=rank, world_size=world)
        data, workers = fit, self.num_workers
        if self.on_device and trainer is not None and trainer.strategy.root_device.type == "cuda":
            if self._train_on_device is None:
                self._train_on_device = fit.to(trainer.strategy.root_device)
            data, workers = self._train_on_device, 0
        return DataLoader(data, batch_size=batch, sampler=sampler, drop_last=True,
                          collate_fn=_batched_collate(data),
                          num_workers=workers, persistent_workers=workers > 0,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self._val, batch_size=self.batch_size, num_workers=self.num_workers,
                          collate_fn=_batched_collate(self._val))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.augment is not None and self.trainer is not None and self.trainer.training:
            x, cond = batch
            x, aug = self.augment(x)
            batch = (x, {**(cond or {}), "augment": aug})
        if (self.instance_noise > 0 and self.instance_noise_mode == "fresh" and self.trainer is not None
                and self.trainer.training):
            x, cond = batch
            batch = (x + self.instance_noise * torch.randn_like(x), cond)
        return batch
