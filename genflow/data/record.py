"""What a checkpoint records about its data, so that sampling and evaluation need nothing but the file.

A network is built from the data's shape and number of classes, and results name the data and its FID
features; all of that is known when a checkpoint is written (by training or by ``genflow.apps.convert``) and is
stored there as ``hyper_parameters["data_record"]`` (``checkpoint_hparams``, the one writer both use):

    {"name": "cifar10", "data_shape": [3, 32, 32], "num_classes": 0, "conditional": false,
     "feature_extractor": "inception", "levels": 256}

``RecordedData`` stands in for the datamodule when a checkpoint is loaded: it answers from the record and
builds the real datamodule (which reads, checks or downloads the data) only when a job asks for data the
record does not hold: training images for FID reference statistics (``fid.ref=train``), held-out images
for a likelihood, the conditions a multi-view model is sampled with. Checkpoints written before the
record existed hold none; they are loaded with the datamodule built as before.
"""
from __future__ import annotations

from typing import Callable, Sequence

from genflow.errors import checkpoint_error

RECORD_KEY = "data_record"


def data_record(source, data_shape: Sequence[int] | None = None, num_classes: int | None = None,
                conditional: bool | None = None) -> dict:
    """The record of a datamodule (``source``), or of a datamodule class with the shape and classes of the
    network given (a converted network: no data is built)."""
    shape = tuple(source.data_shape) if data_shape is None else tuple(data_shape)
    classes = int(source.num_classes) if num_classes is None else int(num_classes)
    levels = getattr(source, "levels", None)
    return {"name": str(getattr(source, "name", "data")), "data_shape": [int(s) for s in shape],
            "num_classes": classes,
            "conditional": bool(getattr(source, "conditional", classes > 0) if conditional is None else conditional),
            "feature_extractor": str(getattr(source, "feature_extractor", "inception")),
            "levels": None if levels is None else int(levels)}


def checkpoint_hparams(config: dict, record: dict | None) -> dict:
    """A checkpoint's ``hyper_parameters``: the run's config and its data record (the one layout that
    ``GenerativeModule`` and ``genflow.apps.convert`` write)."""
    return {"config": config, RECORD_KEY: record} if record is not None else {"config": config}


def read_record(ckpt: dict, path="") -> dict | None:
    """The data record of a loaded checkpoint, checked; None for a checkpoint written before records."""
    record = ckpt.get("hyper_parameters", {}).get(RECORD_KEY)
    if record is None:
        return None
    types = {"name": str, "data_shape": list, "num_classes": int, "conditional": bool, "feature_extractor": str}
    bad = [k for k, t in types.items() if not isinstance(record.get(k) if isinstance(record, dict) else None, t)]
    if not bad:
        shape, classes, levels = record["data_shape"], record["num_classes"], record.get("levels")
        if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
            bad.append("data_shape")
        if classes < 0 or isinstance(classes, bool):
            bad.append("num_classes")
        if levels is not None and (not isinstance(levels, int) or isinstance(levels, bool) or levels < 2):
            bad.append("levels")
    if bad:
        raise checkpoint_error(f"checkpoint {path} has a malformed data record ({', '.join(bad)}: {record!r})",
                               "the record gives the data shape and classes the network is built with",
                               "use an unmodified checkpoint written by genflow's train.py or genflow.apps.convert")
    return dict(record)


class RecordedData:
    """The datamodule as a checkpoint records it (see the module docstring). ``data_class`` is the class its
    config names (imported, not instantiated); ``build`` makes the real datamodule, once, when needed."""

    def __init__(self, record: dict, data_class: type, build: Callable[[], object]):
        self.record, self.data_class, self._build, self._datamodule = record, data_class, build, None
        self.name, self.num_classes = record["name"], record["num_classes"]
        self.data_shape = tuple(record["data_shape"])
        self.conditional, self.feature_extractor = record["conditional"], record["feature_extractor"]
        self.levels = record.get("levels")

    @property
    def datamodule(self):
        """The real datamodule, built on first use (here the data's root is checked, or its download starts)."""
        if self._datamodule is None:
            self._datamodule = self._build()
        return self._datamodule

    def setup(self, stage: str | None = None) -> None:
        """Nothing to do: the record holds what sampling needs; the data is set up when it is read."""

    def __getattr__(self, name: str):
        # only what the data's class offers (train_tensor, sample_cond, ...); hasattr() never builds the data
        if name.startswith("_") or not hasattr(self.data_class, name):
            raise AttributeError(name)
        return getattr(self.datamodule, name)


__all__ = ["RECORD_KEY", "RecordedData", "checkpoint_hparams", "data_record", "read_record"]
