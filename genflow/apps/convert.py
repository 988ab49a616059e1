"""Import NVlabs EDM / PFGM++ network pickles as genflow checkpoints, without running code from them.

    python -m genflow.apps.convert src=SRC.pkl out=OUT.ckpt [D=2048] [data=cifar10] [data.root=...]

EDM (Karras et al. 2022) publishes ``edm-*.pkl`` files and its training loop writes
``network-snapshot-*.pkl``: ``pickle.dump(dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...))``
whose ``ema`` entry is the trained network. PFGM++ (Xu et al. 2023) saves
``torch.save(dict(optimizer_state=..., step=..., ema=..., net=...))`` as ``training-state-*.pt``. Their
classes are "persistent": each object is pickled as a call of
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` where ``meta`` holds the class's module
source, its name and the instance state (for an ``nn.Module``: ``_parameters``, ``_buffers``, ``_modules``
and the recorded constructor arguments ``_init_kwargs``). Tensors are pickled as
``torch._utils._rebuild_tensor_v2`` over storages (serialised by ``torch.storage._load_from_bytes`` in a
pickle, stored as files next to the pickle in a ``torch.save`` archive).

Loading such a file with ``pickle`` executes the stored module source. Here ``SafeUnpickler`` resolves only
a fixed list of globals, each of which only builds data:

- the persistence entry point -> ``Record`` (class name + state; the module source is never read);
- torch's container modules (``ModuleDict`` ...) -> ``Record`` too (their state is data);
- storages -> ``torch.load(..., weights_only=True)`` of the stored bytes, or an archive's storage bytes;
  tensors and parameters -> ``torch._utils._rebuild_tensor`` over such a storage;
- numpy scalars (``numpy._core.multiarray.scalar`` under numpy 2.x, ``numpy.core.multiarray.scalar`` under
  1.x; EDM keeps e.g. ``skip_scale = np.sqrt(0.5)``) -> the Python number read from their bytes with
  ``np.frombuffer``, for bool/integer/float/complex dtypes only (``numpy.dtype`` is checked before numpy
  sees it: object, string, structured and datetime dtypes are refused);
- ``OrderedDict``, ``set``, ``dnnlib.util.EasyDict`` (a dict), torch dtypes, ``torch.Size``, ``torch.device``.

Anything else (``os.system``, ``builtins.exec``, ...) is refused with a ``CheckpointError`` before it can be
called. The records are then mapped onto genflow's networks (``SongUNet`` -> ``UNet``, ``DhariwalUNet`` ->
``ADMUNet``) and methods (``EDMPrecond`` -> EDM, or PFGM++ when D is known; ``VPPrecond`` -> DDPM with
the linear schedule), with the attention weights reshaped (1x1 convolutions -> linear layers, EDM's
per-channel interleaved q/k/v rows -> genflow's stacked [q; k; v]) and the constant resampling filters
dropped. The result is a checkpoint ``sample.py``, ``genflow.apps.evaluate`` and ``train.py init_from=`` read
with ``torch.load(weights_only=True)``.

``converted_checkpoint(src)`` converts once per file content (cached by SHA-256, written atomically), for
the leaderboard's published-checkpoint rows.
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from genflow.cache import cached_checkpoint_problem, content_hash, file_sha256, save_checkpoint
from genflow.config import Bool, Spec, Str, compose, instantiate, plain_app, run_plain, target_class, to_container
from genflow.data.record import checkpoint_hparams, data_record
from genflow.errors import CheckpointError, config_error
from genflow.methods.pfgmpp import _parse_D
from genflow.outputs import check_writable
from genflow.progress import Phase

#: bump when the conversion changes, so cached conversions are redone
CONVERTER_VERSION = 1
USAGE = "python -m genflow.apps.convert src=SRC.pkl out=OUT.ckpt [D=N] [overwrite=true] [data=NAME] [key=value ...]"
# the keys that belong to the stored training config rather than to convert (configs/convert.yaml)
TRAIN_KEYS = ("data", "net", "model", "sample", "fid", "optim", "ema", "trainer", "seed", "allow_heavy_tails")
CONVERT_SCHEMA = {"src": Str(null=True), "out": Str(null=True), "D": Spec(object, null=True), "overwrite": Bool()}


# ---------------------------------------------------------------------------------------------------------
# Safe unpickling: records instead of objects
class Record:
    """A persistent object or torch module from the pickle, as data: its class name and its state."""

    def __init__(self, class_name: str, state: dict | None = None):
        self.class_name = class_name
        self.state = dict(state or {})

    def __setstate__(self, state: Any) -> None:  # BUILD of a pickled torch module
        if not isinstance(state, dict):
            raise CheckpointError(f"the pickled {self.class_name} has a state of type {type(state).__name__}, "
                                  "not a dict\n  fix: convert an EDM/PFGM++ network pickle")
        self.state = {**self.state, **state}

    @property
    def kwargs(self) -> dict:
        """The constructor's keyword arguments as the persistence decorator recorded them."""
        return dict(self.state.get("_init_kwargs") or {})

    @property
    def children(self) -> dict[str, "Record"]:
        return {k: v for k, v in (self.state.get("_modules") or {}).items() if isinstance(v, Record)}

    @property
    def tensors(self) -> dict[str, Tensor]:
        found = {**(self.state.get("_parameters") or {}), **(self.state.get("_buffers") or {})}
        return {k: v for k, v in found.items() if v is not None}

    def child(self, name: str) -> "Record":
        found = self.children.get(name)
        if not isinstance(found, Record):
            raise CheckpointError(f"the pickled {self.class_name} has no sub-module {name!r}\n"
                                  "  why: the network does not have the layout of EDM's networks\n"
                                  "  fix: convert an EDM/PFGM++ network pickle")
        return found

    def __repr__(self) -> str:
        return f"Record({self.class_name})"


_MODULE_RECORDS: dict[str, type] = {}


def _module_record(name: str) -> type:
    """A Record subclass standing for torch.nn class ``name``: pickle creates it with ``cls.__new__(cls)``
    and hands it the module's state, which it keeps as data."""
    if name not in _MODULE_RECORDS:
        def new(cls, *args, **kwargs):
            obj = object.__new__(cls)
            Record.__init__(obj, name)
            return obj

        _MODULE_RECORDS[name] = type(name, (Record,), {"__new__": new})
    return _MODULE_RECORDS[name]


def _persistent_record(meta: Any) -> Record:
    """Stands for EDM's persistence hook: the class name and state as data; the source is never read."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise CheckpointError("a persistent-object record of the pickle is malformed (expected a dict with "
                              "type='class', class_name and state)\n  fix: convert an EDM/PFGM++ network pickle")
    return Record(meta["class_name"], meta.get("state") or {})


def _storage(data: Any):
    if not isinstance(data, bytes):
        raise CheckpointError("a tensor storage record of the pickle does not hold bytes\n"
                              "  fix: convert an EDM/PFGM++ network pickle")
    storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise CheckpointError(f"a tensor storage record holds a {type(storage).__name__}, not a storage")
    return storage


def _tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> Tensor:
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise CheckpointError(f"a tensor record of the pickle refers to a {type(storage).__name__}, not a storage")
    return torch._utils._rebuild_tensor(storage, offset, tuple(size), tuple(stride))


def _parameter(data, requires_grad=True, hooks=None, state=None) -> Tensor:
    if not isinstance(data, Tensor):
        raise CheckpointError(f"a parameter record of the pickle holds a {type(data).__name__}, not a tensor")
    return data


class _EasyDict(dict):
    """dnnlib.util.EasyDict (a dict with attribute access) read as a plain dict."""


#: numpy dtypes a pickled scalar may have: bool, signed/unsigned integers, floats, complex numbers
_NUMERIC_KINDS = "biufc"


class _NumpyDtype:
    """A pickled ``numpy.dtype``, checked to be numeric or bool before numpy sees it.

    numpy pickles a dtype as ``numpy.dtype(typestr, False, True)`` followed by a BUILD with its state
    (version, byte order, subarray, names, fields, ...). Only a plain numeric type string is accepted; the
    state may set nothing but the byte order, so object, string, structured and datetime dtypes are refused."""

    def __init__(self, typestr, align=False, copy=True):
        if not (isinstance(typestr, str) and len(typestr) >= 2 and typestr[0] in _NUMERIC_KINDS
                and typestr[1:].isdigit()):
            raise _numpy_refused(f"numpy.dtype({typestr!r})")
        self.dtype = np.dtype(typestr)
        if self.dtype.kind not in _NUMERIC_KINDS:
            raise _numpy_refused(f"numpy.dtype({typestr!r})")

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) >= 8 and state[1] in ("<", ">", "|", "=")
                and all(part is None for part in state[2:5])):
            raise _numpy_refused(f"a numpy dtype with the state {str(state)[:80]}")
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])

    def __repr__(self) -> str:
        return f"_NumpyDtype({self.dtype})"


def _numpy_scalar(dtype, data=None):
    """numpy's scalar reconstructor: a numeric scalar read from its bytes (``np.frombuffer``), returned as the
    Python number it holds (EDM keeps e.g. ``skip_scale = np.sqrt(0.5)`` in a module's state)."""
    if not isinstance(dtype, _NumpyDtype):
        raise _numpy_refused(f"a numpy scalar of {type(dtype).__name__}")
    if not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise _numpy_refused(f"a {dtype.dtype} scalar whose data is not {dtype.dtype.itemsize} bytes")
    return np.frombuffer(data, dtype=dtype.dtype)[0].item()


def _latin1_bytes(text, encoding="utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError("the pickle asks for _codecs.encode on something other than text in latin1, which "
                              "genflow refuses to load\n  why: pickle protocol 2 writes bytes only as "
                              "encode(str, 'latin1')\n  fix: convert an EDM or PFGM++ network snapshot")
    return text.encode("latin1")


def _numpy_refused(what: str) -> CheckpointError:
    return CheckpointError(
        f"the pickle asks for {what}, which genflow refuses to load\n"
        "  why: genflow reads numpy values in network pickles only as numbers (bool, integer, float, complex "
        "scalars rebuilt from their bytes); other numpy types can hold arbitrary Python objects\n"
        "  fix: convert an EDM or PFGM++ network snapshot; if this is one, please report the type above")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("torch.storage", "_load_from_bytes"): _storage,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,  # plain values, in case a module's state holds them
    ("torch", "device"): torch.device,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("builtins", "set"): set,  # pickle protocol 2 (torch.save's) writes a set as a call of set(list)
    ("__builtin__", "set"): set,
    ("_codecs", "encode"): _latin1_bytes,  # and bytes (a numpy scalar's) as a call of _codecs.encode(str, 'latin1')
    ("numpy", "dtype"): _NumpyDtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,  # the module's name under numpy 1.x
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # and under numpy 2.x
}


class SafeUnpickler(pickle.Unpickler):
    """Resolves only the globals in ``_ALLOWED`` (all data builders), torch dtypes and torch.nn module
    classes (as ``Record``s); any other global is refused before anything can call it.

    ``storages``: for a ``torch.save`` archive, its tensor storages' bytes by key (``.get(key)``; the archive's
    pickle refers to them by persistent id); None for a plain pickle, where a persistent id is refused."""

    def __init__(self, file, storages=None):
        super().__init__(file)
        self._storages = storages
        self._loaded: dict[str, Any] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module.startswith("torch.nn.modules.") and name.isidentifier():
            return _module_record(name)
        raise CheckpointError(
            f"the pickle asks for {module}.{name}, which genflow refuses to load\n"
            "  why: unpickling can call any Python function it names; genflow reads EDM/PFGM++ network pickles "
            "as data and allows only the tensor-rebuilding functions, numeric numpy scalars and EDM's "
            "persistent-class records (whose stored source code is never run)\n"
            "  fix: convert an EDM or PFGM++ network-snapshot pickle; if this is one, it holds an object "
            "genflow does not know: please report the name above")

    def persistent_load(self, pid):
        # torch.save's archives name each storage as ('storage', storage type, key, location, numel)
        if self._storages is None or not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                                          and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise CheckpointError(f"the pickle refers to an outside object {str(pid)[:80]}\n"
                                  "  fix: convert an EDM network-snapshot-*.pkl or a PFGM++ training-state-*.pt")
        kind, key = pid[1], pid[2]
        if key not in self._loaded:
            data = self._storages.get(key)
            if data is None:
                raise CheckpointError(f"the archive lacks the tensor storage {key!r}\n"
                                      "  fix: pass a complete download of the checkpoint")
            untyped = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage(0)
            self._loaded[key] = torch.TypedStorage(wrap_storage=untyped, dtype=kind.dtype, _internal=True)
        return self._loaded[key]


#: torch's legacy storage classes, which torch.save's archives name as the type of each storage
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _StorageType:
    """A storage class named in a torch.save archive, kept as its dtype."""

    def __init__(self, name: str):
        self.dtype = _STORAGE_DTYPES[name]


def _load(path: Path):
    """Unpickle an EDM pickle, or the pickle inside a ``torch.save`` archive (PFGM++'s training-state-*.pt)."""
    if not zipfile.is_zipfile(path):
        with path.open("rb") as f:
            return SafeUnpickler(f).load()
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{path} is a zip archive but not one written by torch.save\n"
                                  "  fix: pass an EDM network-snapshot-*.pkl or a PFGM++ training-state-*.pt")
        root = pickles[0].split("/")[0]
        if f"{root}/byteorder" in names and archive.read(f"{root}/byteorder").strip() != b"little":
            raise CheckpointError(f"{path} was saved on a big-endian machine, which genflow does not read\n"
                                  "  fix: re-save it with torch.save on a little-endian machine")
        prefix = f"{root}/data/"
        # each storage is read when the pickle first refers to it (a training state also holds the optimizer's)
        storages = _ArchiveStorages(archive, {n[len(prefix):]: n for n in names if n.startswith(prefix)})
        with archive.open(pickles[0]) as f:
            return SafeUnpickler(io.BytesIO(f.read()), storages).load()


class _ArchiveStorages:
    """key -> bytes of a torch.save archive's storage files, read on request."""

    def __init__(self, archive: zipfile.ZipFile, files: dict[str, str]):
        self.archive, self.files = archive, files

    def get(self, key: str) -> bytes | None:
        return self.archive.read(self.files[key]) if key in self.files else None


def read_pickle(path: str | os.PathLike) -> dict:
    """The top-level dict of an EDM-format network pickle, with every persistent object as a ``Record``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise config_error(f"{path} does not exist", "convert reads an EDM/PFGM++ network pickle",
                           "pass the path of a network-snapshot-*.pkl (e.g. edm-cifar10-32x32-uncond-vp.pkl)")
    try:
        with warnings.catch_warnings():
            # storages saved by torch's legacy format come back as TypedStorage, whose use torch flags
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            data = _load(path)
    except CheckpointError:
        raise
    except Exception as err:  # truncated, not a pickle, ...
        raise CheckpointError(f"cannot read {path} as a network pickle: {type(err).__name__}: {str(err)[:200]}\n"
                              "  fix: pass an EDM/PFGM++ network-snapshot-*.pkl (a complete download)") from err
    if isinstance(data, Record):
        data = {"ema": data}
    if not isinstance(data, dict) or not isinstance(data.get("ema"), Record):
        raise CheckpointError(f"{path} holds no 'ema' network\n  why: EDM/PFGM++ snapshots are dicts whose "
                              "'ema' entry is the network\n  fix: pass a network-snapshot-*.pkl")
    return data


# ---------------------------------------------------------------------------------------------------------
# Architecture: EDM's recorded hyperparameters -> genflow nets
#: SongUNet's constructor defaults (EDM networks.py); the decorator records only what was passed
SONG_DEFAULTS = dict(model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4,
                     attn_resolutions=[16], dropout=0.10, label_dropout=0.0, augment_dim=0,
                     embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                     decoder_type="standard", resample_filter=[1, 1])
#: DhariwalUNet's constructor defaults (EDM networks.py)
ADM_DEFAULTS = dict(model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
                    attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0.0, augment_dim=0)
_SHAPE_KEYS = ("img_resolution", "in_channels", "out_channels", "label_dim")
#: what PFGM++'s fork of EDM passes on to the backbone besides EDM's arguments (read for D, not architecture)
_PFGMPP_KEYS = ("pfgm", "pfgmpp", "D")


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _backbone_hparams(unet: Record, defaults: dict) -> tuple[dict, dict]:
    """(genflow hyperparameters, image facts) from the backbone's recorded constructor arguments."""
    kwargs = unet.kwargs
    if unet.state.get("_init_args"):
        raise CheckpointError(f"the pickled {unet.class_name} was built with positional arguments, which "
                              "this converter cannot name\n  fix: convert a network saved by EDM/PFGM++'s train.py")
    missing = [k for k in ("img_resolution", "in_channels", "out_channels") if k not in kwargs]
    if missing:
        raise CheckpointError(f"the pickled {unet.class_name} does not record {missing}\n"
                              "  fix: convert a network saved by EDM/PFGM++'s train.py")
    if kwargs.get("pfgm"):
        raise _pfgm_error()
    unknown = set(kwargs) - set(defaults) - set(_SHAPE_KEYS) - set(_PFGMPP_KEYS)
    if unknown:
        raise CheckpointError(f"the pickled {unet.class_name} has constructor arguments genflow does not map: "
                              f"{sorted(unknown)}\n  fix: convert an unmodified EDM/PFGM++ network")
    hp = {k: _plain(kwargs.get(k, v)) for k, v in defaults.items()}
    facts = {"resolution": int(kwargs["img_resolution"]), "channels": int(kwargs["in_channels"]),
             "label_dim": int(kwargs.get("label_dim", 0))}
    if int(kwargs["out_channels"]) != facts["channels"]:
        raise CheckpointError(f"the pickled {unet.class_name} maps {facts['channels']} to {kwargs['out_channels']} "
                              "channels\n  why: genflow's denoisers output as many channels as they take\n"
                              "  fix: convert an image denoiser (in_channels == out_channels)")
    return hp, facts


#: hyperparameters that do not change the architecture: a preset still matches, with them overridden
_TRAINING_ONLY = {"dropout", "label_dropout"}


def _pfgm_error() -> CheckpointError:
    return CheckpointError("the pickle holds a PFGM network (pfgm=True: D = 1, trained to predict the normalised "
                           "field with an extra output), not a PFGM++ denoiser\n  why: genflow's PFGM++ needs "
                           "an EDM-style denoiser\n  fix: convert a PFGM++ (pfgmpp) or EDM network pickle")


def _net_config(target: str, resolve, presets: Sequence[str], hp: dict, fixed: dict) -> dict:
    """{_target_, preset, overrides}: the preset with this architecture if there is one, else explicit.
    ``fixed``: genflow-only hyperparameters the EDM network implies (e.g. num_heads=1)."""
    for name in presets:
        resolved = resolve(name, {})
        if any(not _same(resolved[k], v) for k, v in fixed.items()):
            continue
        diff = {k: v for k, v in hp.items() if not _same(resolved[k], v)}
        if set(diff) <= _TRAINING_ONLY:
            return {"_target_": target, "preset": name, **diff}
    return {"_target_": target, "preset": None, **hp, **fixed}


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b) and \
            all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _song_net(unet: Record) -> tuple[dict, dict]:
    from genflow.nets.unet import PRESETS, resolve_hparams

    hp, facts = _backbone_hparams(unet, SONG_DEFAULTS)
    # EDM's SongUNet: one attention head, additive embedding injection
    fixed = {"num_heads": 1, "adaptive_scale": False}
    return _net_config("genflow.nets.UNet", resolve_hparams, PRESETS, hp, fixed), facts


def _adm_net(unet: Record) -> tuple[dict, dict]:
    from genflow.nets.adm import PRESETS, resolve_hparams

    hp, facts = _backbone_hparams(unet, ADM_DEFAULTS)
    return _net_config("genflow.nets.ADMUNet", resolve_hparams, PRESETS, hp, {}), facts


# ---------------------------------------------------------------------------------------------------------
# Weights: EDM names and layouts -> genflow's
def _attention_qkv(weight: Tensor) -> Tensor:
    """EDM's qkv rows interleave (q, k, v) per channel: row 3c + j. genflow stacks [q; k; v]: row j C + c."""
    channels = weight.shape[0] // 3
    return weight.reshape(channels, 3, *weight.shape[1:]).transpose(0, 1).reshape(weight.shape[0], -1)


def _tensors(block: Record, prefix: str, out: dict) -> None:
    """One EDM module (UNetBlock, Conv2d, GroupNorm, Linear, ...) -> genflow names under ``prefix``."""
    for name, child in block.children.items():
        if name == "qkv":
            t = child.tensors
            out[f"{prefix}attn.qkv.weight"] = _attention_qkv(t["weight"].reshape(t["weight"].shape[0], -1))
            out[f"{prefix}attn.qkv.bias"] = _attention_qkv(t["bias"].reshape(-1, 1)).reshape(-1)
        elif name == "proj":
            t = child.tensors
            out[f"{prefix}attn.proj.weight"] = t["weight"].reshape(t["weight"].shape[0], -1)
            out[f"{prefix}attn.proj.bias"] = t["bias"]
        else:
            _tensors(child, f"{prefix}{name}.", out)
    for name, t in block.tensors.items():
        # the FIR resampling filter is a constant of the architecture; genflow rebuilds it
        if name != "resample_filter":
            out[f"{prefix}{name}"] = t


def _song_state(unet: Record, net) -> dict[str, Tensor]:
    """SongUNet's named modules -> UNet's flat encoder/decoder lists (same order of construction)."""
    out: dict[str, Tensor] = {}
    for name in ("map_noise", "map_label", "map_augment", "map_layer0", "map_layer1"):
        if name in unet.children:
            _tensors(unet.children[name], f"{name}.", out)
    enc_kind = {"conv": "conv", "down": "block", "aux_down": "aux_down", "aux_skip": "aux_skip",
                "aux_residual": "aux_res"}
    enc = list(unet.child("enc").children.items())
    if len(enc) != len(net._enc_kinds):
        raise _layout_error("encoder", len(enc), len(net._enc_kinds))
    for i, ((key, module), kind) in enumerate(zip(enc, net._enc_kinds)):
        suffix = key.split("_", 1)[1]
        expected = "block" if suffix.startswith("block") else enc_kind.get(suffix)
        if expected != kind:
            raise _layout_error(f"encoder entry {key}", expected, kind)
        _tensors(module, f"enc.{i}.", out)
    dec = list(unet.child("dec").children.items())
    i = 0
    for key, module in dec:
        suffix = key.split("_", 1)[1]
        if i >= len(net._dec_kinds):
            raise _layout_error("decoder", len(dec), len(net._dec_kinds))
        kind = net._dec_kinds[i]
        if suffix in ("in0", "in1", "up") or suffix.startswith("block"):
            expected, target = "block", f"dec.{i}."
        elif suffix == "aux_up":
            expected, target = "aux_up", f"dec.{i}."
        elif suffix == "aux_norm":
            expected, target = "out", f"dec.{i}.0."
        elif suffix == "aux_conv":
            expected, target = "out", f"dec.{i}.2."
        else:
            expected, target = suffix, ""
        if expected != kind:
            raise _layout_error(f"decoder entry {key}", expected, kind)
        _tensors(module, target, out)
        if suffix != "aux_norm":
            i += 1
    return out


def _adm_state(unet: Record, net) -> dict[str, Tensor]:
    """DhariwalUNet -> ADMUNet: the same module names, ModuleDict keys -> list positions."""
    out: dict[str, Tensor] = {}
    for name in ("map_noise", "map_augment", "map_layer0", "map_layer1", "map_label", "out_norm", "out_conv"):
        if name in unet.children:
            _tensors(unet.children[name], f"{name}.", out)
    for part in ("enc", "dec"):
        entries = list(unet.child(part).children.values())
        if len(entries) != len(getattr(net, part)):
            raise _layout_error(part, len(entries), len(getattr(net, part)))
        for i, module in enumerate(entries):
            _tensors(module, f"{part}.{i}.", out)
    return out


def _layout_error(what: str, found, expected) -> CheckpointError:
    return CheckpointError(f"the pickled network's {what} does not match genflow's rebuilt network "
                           f"(pickle: {found}, genflow: {expected})\n  why: the recorded hyperparameters "
                           "describe a different layout than the stored modules\n"
                           "  fix: convert an unmodified EDM/PFGM++ network pickle")


BACKBONES = {"SongUNet": (_song_net, _song_state), "DhariwalUNet": (_adm_net, _adm_state)}


# ---------------------------------------------------------------------------------------------------------
# Preconditioning -> method
def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _find_D(data: dict) -> tuple[float | None, bool]:
    """(D, decided) from the snapshot. PFGM++'s code records ``pfgmpp`` (on or off) and ``D`` with the network
    or its training options: then D is decided (inf when pfgmpp is off). Its loss object carries a D even
    in EDM runs (a default of 128), so a D found only there is not decided: the user must say."""
    places = [data["ema"].kwargs, data["ema"].state]
    loss = data.get("loss_fn")
    if isinstance(loss, Record):
        places += [loss.kwargs, loss.state]
        places += [loss.state[k] for k in ("opts", "kwargs") if isinstance(loss.state.get(k), dict)]
    for place in places:
        if isinstance(place.get("pfgmpp"), bool):
            if not place["pfgmpp"]:
                return math.inf, True
            found = next((_number(p.get(k)) for p in places for k in ("D", "aug_dim") if _number(p.get(k))), None)
            return found, found is not None
    undecided = any(_number(p.get(k)) is not None for p in places for k in ("D", "aug_dim"))
    return None, not undecided


def _method(precond: Record, data: dict, D) -> tuple[list[str], dict]:
    """(compose overrides for the method, facts for the checkpoint) from the preconditioning record."""
    kwargs = precond.kwargs
    name = precond.class_name
    if name == "EDMPrecond":
        if kwargs.get("pfgm"):
            raise _pfgm_error()
        if kwargs.get("small"):
            # PFGM++'s fork: small=True switches this class to the VE preconditioning
            raise CheckpointError("the pickle's EDMPrecond was built with small=True, which PFGM++'s code runs "
                                  "with the VE preconditioning\n  why: genflow has no VE method\n"
                                  "  fix: convert a network trained with EDM's preconditioning")
        recorded, decided = _find_D(data)
        wanted = None if D is None else _parse_D(D)
        if not decided and wanted is None:
            raise config_error("the pickle comes from PFGM++'s code but does not record D",
                               "its loss carries a D in PFGM++ and EDM runs alike, so the converter cannot tell "
                               "which noise the network was trained with; sampling with the wrong D is wrong",
                               "pass D=<the run's --aug_dim> (e.g. D=2048), or D=inf for an EDM run")
        if recorded is not None and wanted is not None and recorded != wanted:
            raise config_error(f"D={D} given, but the pickle records D={recorded:g}",
                               "the converted model must sample with the D it was trained with",
                               "drop D= (the recorded value is used)")
        D_value = recorded if recorded is not None else wanted
        sigma_data = float(kwargs.get("sigma_data", 0.5))
        ov = [f"model.sigma_data={sigma_data}"]
        if D_value is None or math.isinf(D_value):
            return ["model=edm", *ov], {"D": "inf", "D_source": "pickle" if recorded is not None else
                                        ("argument" if wanted is not None else "none (EDM)")}
        return ["model=pfgmpp", f"D={D_value:g}", *ov], {"D": D_value,
                                                        "D_source": "pickle" if recorded is not None else "argument"}
    if D is not None:
        raise config_error(f"D={D} given for a {name} network", "D belongs to PFGM++ (EDMPrecond networks)",
                           "drop D=")
    if name == "VPPrecond":
        beta_d, beta_min, M = float(kwargs.get("beta_d", 19.9)), float(kwargs.get("beta_min", 0.1)), int(kwargs.get("M", 1000))
        # VP preconditioning: F(sqrt(abar) y + sqrt(1 - abar) n, (M-1) t) predicts n with abar = 1/(1 + sigma^2)
        # = exp(-beta_min t - beta_d t^2 / 2): DDPM's linear schedule with beta_max = beta_min + beta_d
        return ["model=ddpm", "model.schedule=linear", f"model.beta_min={beta_min}",
                f"model.beta_max={beta_min + beta_d}", f"model.label_scale={M - 1}"], {"precond": "VPPrecond"}
    if name in ("VEPrecond", "iDDPMPrecond"):
        raise CheckpointError(f"the pickle's network uses {name}, which genflow has no method for\n"
                              f"  why: {name} needs its own noise schedule ({'variance exploding' if name == 'VEPrecond' else 'improved-DDPM discrete'}), "
                              "which genflow does not implement; a conversion would sample a different model\n"
                              "  fix: convert EDM's main networks (edm-*.pkl, EDMPrecond), PFGM++'s, or "
                              "the VP baselines (VPPrecond)")
    raise CheckpointError(f"the pickle's 'ema' entry is a {name}, not one of EDM's preconditioned networks\n"
                          "  fix: convert an EDM/PFGM++ network-snapshot pickle (EDMPrecond, VPPrecond)")


# ---------------------------------------------------------------------------------------------------------
def _data_overrides(facts: dict) -> list[str]:
    """Data overrides matching the network's images: CIFAR-10 at 32x32x3, the bundled digits at 8x8x1, otherwise
    an image folder (FFHQ / ImageNet at 64) with no root: sampling needs only the checkpoint's data record, and a
    job that reads the images (``fid.ref=train``) names their folder with ``data.root=``."""
    res, ch, labels = facts["resolution"], facts["channels"], facts["label_dim"]
    conditional = f"data.conditional={str(labels > 0).lower()}"
    if (res, ch) == (32, 3) and labels in (0, 10):
        return ["data=cifar10", conditional]
    if (res, ch) == (8, 1) and labels in (0, 10):
        return ["data=digits", conditional]
    return ["data=imagefolder", f"data.resolution={res}", f"data.channels={ch}", conditional]


def convert_records(data: dict, *, D=None, overrides: Sequence[str] = (), source: str = "") -> dict:
    """A genflow checkpoint dict (state_dict + stored config) from ``read_pickle``'s records."""
    precond = data["ema"]
    backbone = precond.child("model") if "model" in precond.children else None
    if backbone is None or backbone.class_name not in BACKBONES:
        found = backbone.class_name if backbone is not None else "none"
        raise CheckpointError(f"the pickle's {precond.class_name} wraps a {found} backbone, which genflow has no "
                              f"network for\n  fix: convert a network with one of {sorted(BACKBONES)}")
    method_ov, method_facts = _method(precond, data, D)  # an unsupported preconditioning says so first
    net_from, state_from = BACKBONES[backbone.class_name]
    net_cfg, facts = net_from(backbone)
    pre = precond.kwargs
    for key, fact in (("img_resolution", "resolution"), ("img_channels", "channels"), ("label_dim", "label_dim")):
        if key in pre and int(pre[key]) != facts[fact]:
            raise CheckpointError(f"the pickle's {precond.class_name} records {key}={pre[key]} but its backbone "
                                  f"{facts[fact]}\n  fix: convert an unmodified EDM/PFGM++ network pickle")

    data_ov = _data_overrides(facts)
    if any(o.startswith("data=") for o in overrides):  # the user's choice of data config wins
        data_ov = [o for o in data_ov if not o.startswith("data=")]
    # environment=False: the data set is not read here (nor by sampling: the checkpoint records its data)
    cfg = compose([*data_ov, *method_ov, *overrides], environment=False)
    config = to_container(cfg)
    config["net"] = net_cfg

    # genflow's network is built on the meta device: only its names, shapes and dtypes, so hyperparameters
    # that disagree with the stored weights (a recorded model_channels=200000 over small tensors) fail here
    # without allocating the network they describe
    with torch.device("meta"):
        net = instantiate(net_cfg, data_shape=(facts["channels"], facts["resolution"], facts["resolution"]),
                          num_classes=facts["label_dim"])
    state = state_from(backbone, net)
    _check_filters(backbone, net)
    expected = net.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(f"the pickled {backbone.class_name}'s weights do not fill genflow's network: "
                              f"missing {missing[:4]}, unexpected {unexpected[:4]}, wrong shape {wrong[:4]}\n"
                              "  fix: convert an unmodified EDM/PFGM++ network pickle")
    method = instantiate(cfg.model)
    state_dict = {f"net.{k}": state[k].detach().to(expected[k].dtype).clone().contiguous() for k in expected}
    state_dict.update({f"method.{k}": v for k, v in method.state_dict().items()})
    # provenance sits next to the config, not in it: the stored config stays one train.py accepts
    provenance = {"source": source, "backbone": backbone.class_name, "precond": precond.class_name,
                  "use_fp16": bool(pre.get("use_fp16", False)), "converter_version": CONVERTER_VERSION,
                  **method_facts}
    record = data_record(target_class(cfg.data), net.data_shape, facts["label_dim"], facts["label_dim"] > 0)
    return {"state_dict": state_dict, "hyper_parameters": checkpoint_hparams(config, record),
            "converted_from": provenance, "epoch": 0, "global_step": 0, "pytorch-lightning_version": _lightning_version()}


def _check_filters(backbone: Record, net) -> None:
    """The dropped resampling-filter buffers must be the ones genflow rebuilds."""
    from genflow.nets.layers import _fir_kernel

    taps = backbone.kwargs.get("resample_filter", [1, 1])
    want = _fir_kernel(taps)

    def walk(rec: Record):
        f = rec.tensors.get("resample_filter")  # EDM keeps it as (1, 1, k, k)
        if f is not None and (f.numel() != want.numel() or not torch.allclose(f.float().reshape(want.shape), want,
                                                                                atol=1e-7)):
            raise CheckpointError(f"a resampling filter in the pickle is {f.tolist()}, not the FIR {list(taps)} "
                                  "its hyperparameters name\n  fix: convert an unmodified EDM/PFGM++ network pickle")
        for child in rec.children.values():
            if isinstance(child, Record):
                walk(child)

    walk(backbone)


def _lightning_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pytorch-lightning")
    except PackageNotFoundError:
        return "unknown"


def convert(src: str | os.PathLike, out: str | os.PathLike, D=None, overrides: Sequence[str] = (),
            overwrite: bool = False, sha256: str | None = None, key: str = "out") -> Path:
    """Convert the EDM/PFGM++ network pickle ``src`` into the genflow checkpoint ``out``.

    ``D``: PFGM++'s augmented dimensions where the pickle does not record them (``inf``: EDM).
    ``overrides``: config overrides for the stored configuration (e.g. ``data.root=/data/cifar10``).
    An existing ``out`` is replaced only with ``overwrite=True``. ``sha256``: the pickle's digest when the
    caller has it already (it is recorded in the checkpoint). ``key``: how the messages name ``out``.
    """
    target = Path(out).expanduser()
    if target.exists() and not overwrite:
        raise config_error(f"{out} already exists", "convert does not replace files unasked",
                           "choose another OUT path, or pass overwrite=true")
    check_writable(target.parent if target.exists() else target, key)  # before the pickle is read
    if D is not None:
        _parse_D(D)  # a bad D fails before the pickle is read
    src = Path(src).expanduser()
    if Path(out).expanduser().resolve() == src.resolve():
        raise config_error(f"OUT {out} is the source pickle", "the conversion would overwrite its input",
                           "write the checkpoint to another path, e.g. edm-cifar10.ckpt")
    ckpt = convert_records(read_pickle(src), D=D, overrides=overrides, source=str(src))
    ckpt["converted_from"]["sha256"] = sha256 or file_sha256(src)
    size = sum(t.numel() * t.element_size() for t in ckpt["state_dict"].values() if isinstance(t, Tensor))
    check_writable(target.parent, key, need_bytes=size + (1 << 20))  # the checkpoint's tensors and its records
    return save_checkpoint(ckpt, target)


def converted_checkpoint(src: str | os.PathLike, *, D=None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The genflow checkpoint of pickle ``src``, converted once per content (SHA-256) into ``cache_dir``
    (default ``$GENFLOW_METRICS_HOME/converted``); later calls return the cached file."""
    from genflow.metrics.features import metrics_home

    src = Path(src).expanduser()
    if not src.is_file():
        raise config_error(f"published checkpoint {src} does not exist",
                           "published-checkpoint entries convert a local EDM/PFGM++ pickle (nothing is downloaded)",
                           "point the entry's environment variable at the .pkl file")
    sha256 = file_sha256(src)  # read once: published pickles reach a gigabyte
    folder = Path(cache_dir).expanduser() if cache_dir else metrics_home() / "converted"
    out = folder / f"{src.stem}-{content_hash(sha256, f'D={D}', f'v{CONVERTER_VERSION}', length=16)}.ckpt"
    why = cached_checkpoint_problem(out) if out.is_file() else ""
    if why:
        print(f"genflow: cached conversion {out} not used, {why}; converting again", file=sys.stderr, flush=True)
    if why or not out.is_file():
        # several processes (DDP ranks) may convert at once: each writes atomically the same content
        convert(src, out, D=D, overwrite=True, sha256=sha256, key="GENFLOW_METRICS_HOME")
    return out


def published_checkpoint(entry: dict, cache_dir: str | os.PathLike | None = None) -> str | None:
    """The checkpoint of a leaderboard entry that names a published pickle (``pickle: PATH``, usually
    from the runner's environment), converted once and cached; None when the runner does not provide it.
    The entry's ``D`` is used where the pickle does not record PFGM++'s D."""
    path = entry.get("pickle")
    if path in (None, "", "null"):
        return None
    return str(converted_checkpoint(path, D=entry.get("D"), cache_dir=cache_dir))


# ---------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str]) -> dict:
    import json

    cfg, train_overrides = plain_app("convert", argv, __doc__.split("\n\n")[0] + "\n\n    " + USAGE,
                                     schema=CONVERT_SCHEMA, passthrough=TRAIN_KEYS)
    for key, what in (("src", "SRC.pkl, the network pickle"), ("out", "OUT.ckpt, the checkpoint to write")):
        if cfg[key] is None:
            raise config_error(f"{key}= is missing", f"convert reads one pickle and writes one checkpoint: {key} is "
                               f"{what}", f"usage: {USAGE}")
    out = convert(cfg.src, cfg.out, D=cfg.D, overrides=train_overrides, overwrite=cfg.overwrite)
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    config = ckpt["hyper_parameters"]["config"]
    from genflow.results.records import absolute, config_names

    names = config_names(config)  # the names every JSON line uses (docs/RECORDS.md)
    result = {"checkpoint": absolute(out), "net": names["net"], "model": names["model"], "data": names["data"],
              "D": ckpt["converted_from"].get("D"),
              "parameters": sum(v.numel() for k, v in ckpt["state_dict"].items() if k.startswith("net."))}
    print(json.dumps(result), flush=True)
    return result


def cli() -> None:
    """The ``genflow-convert`` console script and ``python -m genflow.apps.convert``."""
    run_plain(main, sys.argv[1:], phase=Phase("converting", "nothing was written (the checkpoint is written whole "
                                                 "or not at all)"))


if __name__ == "__main__":
    cli()
