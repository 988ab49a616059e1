"""genflow.apps.convert: EDM / PFGM++ network pickles -> genflow checkpoints, safely and exactly.

Two writers of EDM's snapshot format:

- Always run: a test-side writer of the format from its description (never EDM's code). A snapshot is
  ``pickle.dump(dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...))``; each of EDM's persistent
  classes is pickled as a call of ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with
  meta = {type, version, module_src, class_name, state}; tensors by torch's own reducers; numpy scalars
  (``skip_scale = sqrt(0.5)``, attention ``init_weight``, ...) as ``scalar(dtype, bytes)`` under numpy 2.x's
  module name ``numpy._core.multiarray`` or 1.x's ``numpy.core.multiarray``. The networks are tiny SongUNets
  (DDPM++, NCSN++) and DhariwalUNets (ADM) whose weights are those of a genflow network laid out the EDM way.
- With ``EDM_DIR`` / ``PFGMPP_DIR`` pointing at a checkout (extract) of NVlabs/edm / the PFGM++ repository:
  ``tests/edm_reference_writer.py`` builds networks with that checkout's own classes and writes snapshots
  the way its training loop does, in a subprocess; they are converted with ``python -m genflow.apps.convert`` and
  genflow's denoiser is compared with the checkout's own forward. The always-run writer's pickle stream is
  checked against the real one (the globals it asks for, the modules and tensors it holds)::

      EDM_DIR=/path/to/edm PFGMPP_DIR=/path/to/pfgmpp pytest tests/test_convert.py
"""
from __future__ import annotations

import json
import math
import os
import pickle
import pickletools
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from genflow.errors import CheckpointError, ConfigError
from genflow.methods import EDM
from genflow.nets import ADMUNet, UNet

EDM_DIR = os.environ.get("EDM_DIR")
PFGMPP_DIR = os.environ.get("PFGMPP_DIR")


# ---------------------------------------------------------------------------------------------------
# Test-side writer of EDM's pickle layout
def _stand_in(module: str, name: str):
    """A function pickle names ``module.name`` (EDM's and numpy's reconstructors); never called."""

    def stand_in(*args):
        raise AssertionError(f"the converter must never call {module}.{name}")

    stand_in.__module__, stand_in.__qualname__, stand_in.__name__ = module, name, name
    return stand_in


class EasyDict(dict):
    """dnnlib.util.EasyDict's pickled form: a dict subclass of that name."""


EasyDict.__module__ = "dnnlib.util"

#: numpy's scalar reconstructor under numpy 2.x's and 1.x's module names
NUMPY_SCALAR = {"2.x": "numpy._core.multiarray", "1.x": "numpy.core.multiarray"}


class EDMPickler(pickle.Pickler):
    """pickle.Pickler writing numpy scalars as ``scalar(dtype, bytes)`` under the chosen module name."""

    def __init__(self, file, scalar, protocol=None):
        super().__init__(file, protocol)
        self.scalar = scalar

    def reducer_override(self, obj):
        if isinstance(obj, np.generic):
            return self.scalar, (obj.dtype, obj.tobytes())
        return NotImplemented


def write_pickle(path, ema, numpy_names: str = "2.x", torch_save: bool = False, **extra):
    """EDM's snapshot: dict(ema, loss_fn, augment_pipe, dataset_kwargs) (a default for each missing entry).
    ``torch_save``: PFGM++'s training state instead, torch.save(dict(optimizer_state, step, ema, net))."""
    if torch_save:
        extra = dict(optimizer_state={"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999)}]},
                     step=1000, net=ema, **extra)
    else:
        extra.setdefault("loss_fn", edm_loss())
        extra.setdefault("augment_pipe", None)
        extra.setdefault("dataset_kwargs", dict(class_name="training.dataset.ImageFolderDataset", path="x.zip",
                                                use_labels=False, xflip=False, cache=True, resolution=8,
                                                max_size=1797))
    names = {"torch_utils": types.ModuleType("torch_utils"),
             "torch_utils.persistence": types.ModuleType("torch_utils.persistence"),
             "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": types.ModuleType("dnnlib.util"),
             NUMPY_SCALAR[numpy_names]: types.ModuleType(NUMPY_SCALAR[numpy_names])}
    names["torch_utils.persistence"]._reconstruct_persistent_obj = _stand_in("torch_utils.persistence",
                                                                              "_reconstruct_persistent_obj")
    names["dnnlib.util"].EasyDict = EasyDict
    scalar = names[NUMPY_SCALAR[numpy_names]].scalar = _stand_in(NUMPY_SCALAR[numpy_names], "scalar")
    saved = {k: sys.modules.get(k) for k in names}
    sys.modules.update(names)  # only while pickling: pickle checks each name resolves to the object
    try:
        if torch_save:  # torch's archive: its own pickler (protocol 2) with storages as separate files
            init = lambda self, f, protocol=2: EDMPickler.__init__(self, f, scalar, protocol)  # noqa: E731
            module = types.SimpleNamespace(__name__="pickle", Pickler=type("Pickler", (EDMPickler,), {"__init__": init}))
            torch.save(dict(ema=ema, **extra), path, pickle_module=module)
        else:
            with open(path, "wb") as f:
                EDMPickler(f, scalar).dump(dict(ema=ema, **extra))
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return path


def pickle_globals(data: bytes) -> set[tuple[str, str]]:
    """The (module, name) pairs a pickle stream asks for, read from its opcodes (nothing is unpickled).
    STACK_GLOBAL takes the two strings pushed just before it, directly or from the memo."""
    memo, pushed, found = {}, [], set()
    strings = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE")
    for op, arg, _ in pickletools.genops(data):
        if op.name in strings:
            pushed.append(arg)
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            pushed.append(memo.get(arg))
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
            continue
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = pushed[-1] if pushed else None
            continue
        elif op.name == "STACK_GLOBAL":
            found.add((pushed[-2], pushed[-1]))
            pushed.append(None)
        elif op.name == "GLOBAL":
            found.add(tuple(arg.split(" ", 1)))
            pushed.append(None)
        else:
            pushed.append(None)
    return found


@pytest.fixture
def edm_format():
    return write_pickle


class Persistent(nn.Module):
    """An object of one of EDM's persistent classes: pickled as the persistence record, never as itself."""

    def __init__(self, class_name: str, kwargs: dict | None = None, params=None, buffers=None, children=None,
                 **attrs):
        super().__init__()
        self.edm_class = class_name
        self._init_args, self._init_kwargs = (), dict(kwargs or {})
        for k, v in (params or {}).items():
            self.register_parameter(k, None if v is None else nn.Parameter(v.detach().clone(), requires_grad=False))
        for k, v in (buffers or {}).items():
            self.register_buffer(k, None if v is None else v.detach().clone())
        for k, v in (children or {}).items():
            self.add_module(k, v)
        self.__dict__.update(attrs)
        self.module_src = "raise SystemExit('stored source must never run')\n"

    def __reduce__(self):
        state = {k: v for k, v in self.__dict__.items() if k not in ("edm_class", "module_src")}
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.edm_class, state=state)
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,)


class PersistentObject:
    """A persistent object that is not a module (EDM's losses, AugmentPipe): its attributes as the state."""

    def __init__(self, class_name: str, kwargs: dict, **attrs):
        self.edm_class, self.attrs = class_name, dict(attrs, _init_args=(), _init_kwargs=dict(kwargs))

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src="raise SystemExit\n", class_name=self.edm_class,
                    state=self.attrs)
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,)


def edm_loss(**kwargs):
    values = dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    return PersistentObject("EDMLoss", kwargs, **{**values, **kwargs})


def edm_augment_pipe():
    kwargs = dict(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    return PersistentObject("AugmentPipe", kwargs, **{k: float(v) for k, v in kwargs.items()})


def edm_conv(conv):
    f = conv.resample_filter
    return Persistent("Conv2d", {}, params={"weight": conv.weight, "bias": conv.bias},
                      buffers={"resample_filter": None if f is None else f.reshape(1, 1, *f.shape)})


def edm_norm(norm):
    return Persistent("GroupNorm", {}, params={"weight": norm.weight, "bias": norm.bias}, num_groups=norm.num_groups)


def edm_linear(lin):
    return Persistent("Linear", {}, params={"weight": lin.weight, "bias": lin.bias})


def edm_block(block):
    """genflow UNetBlock -> EDM UNetBlock: same children, attention as 1x1 convs with q/k/v interleaved per channel."""
    children = dict(norm0=edm_norm(block.norm0), conv0=edm_conv(block.conv0), affine=edm_linear(block.affine),
                    norm1=edm_norm(block.norm1), conv1=edm_conv(block.conv1))
    if block.skip is not None:
        children["skip"] = edm_conv(block.skip)
    if block.attn is not None:
        c = block.out_channels
        w, b = block.attn.qkv.weight, block.attn.qkv.bias  # genflow rows: j*C + c  (j = q, k, v)
        w_edm = w.reshape(3, c, c).transpose(0, 1).reshape(3 * c, c, 1, 1)  # EDM rows: 3*c + j
        b_edm = b.reshape(3, c).transpose(0, 1).reshape(3 * c)
        children["norm2"] = edm_norm(block.norm2)
        init_attn = dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2))  # a numpy float64, as in EDM
        children["qkv"] = Persistent("Conv2d", dict(kernel=1, **init_attn), params={"weight": w_edm, "bias": b_edm},
                                     buffers={"resample_filter": None})
        children["proj"] = Persistent("Conv2d", dict(kernel=1, **init_attn),
                                      params={"weight": block.attn.proj.weight[..., None, None],
                                              "bias": block.attn.proj.bias}, buffers={"resample_filter": None})
    kwargs = dict(out_channels=block.out_channels, num_heads=1, skip_scale=np.sqrt(0.5),
                  init_attn=dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2)))
    return Persistent("UNetBlock", kwargs, children=children, skip_scale=np.sqrt(0.5), num_heads=np.int64(1))


def edm_any(module):
    from genflow.nets.layers import Conv2d, UNetBlock

    return edm_block(module) if isinstance(module, UNetBlock) else edm_conv(module) if isinstance(module, Conv2d) \
        else edm_norm(module)


def song_keys(res0: int, levels: int, num_blocks: int, encoder_type: str, decoder_type: str):
    """EDM SongUNet's ModuleDict keys in construction order."""
    enc, dec = [], []
    for level in range(levels):
        r = f"{res0 >> level}x{res0 >> level}"
        if level == 0:
            enc.append(f"{r}_conv")
        else:
            enc.append(f"{r}_down")
            enc += [f"{r}_aux_down", f"{r}_aux_skip"] if encoder_type == "skip" else []
            enc += [f"{r}_aux_residual"] if encoder_type == "residual" else []
        enc += [f"{r}_block{i}" for i in range(num_blocks)]
    for level in reversed(range(levels)):
        r = f"{res0 >> level}x{res0 >> level}"
        dec += [f"{r}_in0", f"{r}_in1"] if level == levels - 1 else [f"{r}_up"]
        dec += [f"{r}_block{i}" for i in range(num_blocks + 1)]
        if decoder_type == "skip" or level == 0:
            dec += [f"{r}_aux_up"] if decoder_type == "skip" and level < levels - 1 else []
            dec += [f"{r}_aux_norm", f"{r}_aux_conv"]
    return enc, dec


def edm_song_unet(net: UNet, edm_kwargs: dict):
    hp = net.hparams
    c, res = net.data_shape[0], net.data_shape[1]
    enc_keys, dec_keys = song_keys(res, len(hp["channel_mult"]), hp["num_blocks"], hp["encoder_type"],
                                   hp["decoder_type"])
    enc = nn.ModuleDict({k: edm_any(m) for k, m in zip(enc_keys, net.enc)})
    dec_modules = []
    for kind, module in zip(net._dec_kinds, net.dec):
        dec_modules += [edm_norm(module[0]), edm_conv(module[2])] if kind == "out" else [edm_any(module)]
    dec = nn.ModuleDict(dict(zip(dec_keys, dec_modules)))
    assert len(enc) == len(net.enc) and len(dec) == len(dec_modules)
    if hp["embedding_type"] == "positional":
        map_noise = Persistent("PositionalEmbedding", dict(num_channels=net.map_layer0.in_features, endpoint=True))
    else:
        map_noise = Persistent("FourierEmbedding", dict(num_channels=net.map_layer0.in_features),
                               buffers={"freqs": net.map_noise.freqs})
    children = dict(map_noise=map_noise)
    if net.map_label is not None:
        children["map_label"] = edm_linear(net.map_label)
    if net.map_augment is not None:
        children["map_augment"] = Persistent("Linear", {}, params={"weight": net.map_augment.weight})
    children.update(map_layer0=edm_linear(net.map_layer0), map_layer1=edm_linear(net.map_layer1), enc=enc, dec=dec)
    kwargs = dict(img_resolution=res, in_channels=c, out_channels=c, label_dim=net.num_classes, **edm_kwargs)
    return Persistent("SongUNet", kwargs, children=children, label_dropout=0.0)


def edm_precond(backbone, model_type: str, edm_kwargs: dict, res: int, c: int, label_dim: int, name="EDMPrecond"):
    kwargs = dict(img_resolution=res, img_channels=c, label_dim=label_dim, use_fp16=False, sigma_min=0,
                  sigma_max=float("inf"), sigma_data=0.5, model_type=model_type, **edm_kwargs)
    if name != "EDMPrecond":
        kwargs = {k: v for k, v in kwargs.items() if k not in ("sigma_min", "sigma_max", "sigma_data")}
    return Persistent(name, kwargs, children={"model": backbone}, img_resolution=res, img_channels=c,
                      label_dim=label_dim, use_fp16=False, sigma_data=0.5)


#: tiny SongUNets on 8x8x1 images (the bundled digits data), EDM kwargs as train.py passes them
SONG_CASES = {
    "ddpmpp-uncond-augment": dict(embedding_type="positional", encoder_type="standard", decoder_type="standard",
                                  channel_mult_noise=1, resample_filter=[1, 1], model_channels=16,
                                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.13,
                                  augment_dim=9, label_dim=0),
    "ncsnpp-cond": dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                        channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=16, channel_mult=[1, 2],
                        num_blocks=1, attn_resolutions=[4], dropout=0.13, augment_dim=0, label_dim=10),
}


def song_pair(case: str, seed: int = 0):
    """(genflow UNet with random weights, EDM-format ema record of the same weights)."""
    kw = dict(SONG_CASES[case])
    label_dim = kw.pop("label_dim")
    torch.manual_seed(seed)
    net = UNet(data_shape=(1, 8, 8), num_classes=label_dim, preset=None, **kw).eval()
    with torch.no_grad():  # zero-initialised layers would hide mapping mistakes
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    edm_kw = {k: v for k, v in kw.items()}
    return net, edm_precond(edm_song_unet(net, edm_kw), "SongUNet", edm_kw, 8, 1, label_dim)


def test_an_rgb_network_converts_and_samples_with_no_data_set(edm_format, tmp_path, cli, monkeypatch):
    """A 16x16 RGB network (FFHQ / ImageNet-like: an image-folder data config) converts and samples with no image
    folder, no GENFLOW_DATA and a fresh HOME: the checkpoint's data record is all sampling reads."""
    kw = dict(SONG_CASES["ddpmpp-uncond-augment"], attn_resolutions=[8])
    kw.pop("label_dim")
    torch.manual_seed(0)
    net = UNet(data_shape=(3, 16, 16), num_classes=0, preset=None, **kw).eval()
    ema = edm_precond(edm_song_unet(net, dict(kw)), "SongUNet", dict(kw), 16, 3, 0)
    src = edm_format(tmp_path / "rgb.pkl", ema, augment_pipe=edm_augment_pipe())
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv("GENFLOW_DATA", str(empty))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))
    code, _, err = cli("genflow.apps.convert", f"src={src}", f"out={tmp_path / 'rgb.ckpt'}")
    assert code == 0, err
    stored = torch.load(tmp_path / "rgb.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
    assert stored["config"]["data"]["_target_"].endswith("ImageFolder") and stored["config"]["data"]["root"] is None
    code, _, err = cli("sample.py", f"ckpt={tmp_path / 'rgb.ckpt'}", f"out={tmp_path / 'samples'}", "seeds=0-1",
                       "steps=2")
    assert code == 0, err
    assert len(list((tmp_path / "samples").glob("*.png"))) >= 2 and not any(empty.iterdir())


def denoise_both(original, path, cond_fn, D=math.inf):
    from genflow.config import module_from_checkpoint

    module, dm, cfg = module_from_checkpoint(path)
    torch.manual_seed(1)
    x = torch.randn(6, 1, 8, 8) * 3
    sigma = torch.tensor([0.002, 0.05, 0.5, 2.0, 20.0, 80.0])
    cond = cond_fn(6)
    with torch.no_grad():
        want = EDM().denoise(original, x, sigma, cond)
        got = module.method.denoise(module.net, x, sigma, cond)
    return (got - want).norm() / want.norm(), module, cfg


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("numpy_names", sorted(NUMPY_SCALAR))
@pytest.mark.parametrize("case", sorted(SONG_CASES))
def test_song_unet_converts_exactly(edm_format, tmp_path, case, numpy_names):
    net, ema = song_pair(case)
    ran = tmp_path / "stored-source-ran"
    # the stored module source would leave a file behind if anything executed it
    ema.model.module_src = f"open({str(ran)!r}, 'w').close()\n"
    src = edm_format(tmp_path / "net.pkl", ema, numpy_names=numpy_names, augment_pipe=edm_augment_pipe())
    globals_asked = pickle_globals(src.read_bytes())
    assert (NUMPY_SCALAR[numpy_names], "scalar") in globals_asked and ("numpy", "dtype") in globals_asked
    from genflow.apps.convert import convert

    out = convert(src, tmp_path / "net.ckpt")
    assert not ran.exists() and "torch_utils.persistence" not in sys.modules
    ckpt = torch.load(out, map_location="cpu", weights_only=True)  # what sample.py / evaluate / init_from do
    assert ckpt["converted_from"]["backbone"] == "SongUNet"
    if net.num_classes:
        cond_fn = lambda b: {"class": torch.nn.functional.one_hot(torch.arange(b) % 10, 10).float()}
    else:
        cond_fn = lambda b: {"augment": torch.randn(b, 9, generator=torch.Generator().manual_seed(3))}
    rel, module, cfg = denoise_both(net, out, cond_fn)
    assert rel <= 1e-5, rel
    assert type(module.method).__name__ == "EDM" and cfg.data._target_.endswith("Digits")
    assert cfg.data.conditional == bool(net.num_classes)


def test_pfgmpp_D_from_pickle_or_argument(edm_format, tmp_path):
    from genflow.config import read_checkpoint
    from genflow.apps.convert import convert

    net, ema = song_pair("ddpmpp-uncond-augment")
    # PFGM++'s loss object carries D (default 128) in EDM runs too: not enough to decide, D= is required
    loss_only = edm_format(tmp_path / "pfgmpp.pkl", ema, loss_fn=edm_loss(D=128, N=64))
    with pytest.raises(ConfigError, match="does not record D"):
        convert(loss_only, tmp_path / "a.ckpt")
    assert not (tmp_path / "a.ckpt").exists()
    model = read_checkpoint(convert(loss_only, tmp_path / "a.ckpt", D=2048))["hyper_parameters"]["config"]["model"]
    assert model["_target_"].endswith("PFGMPP") and model["D"] == 2048

    # PFGM++'s fork records pfgmpp and D in the network's arguments (and hands them on to the backbone)
    net2, fork = song_pair("ncsnpp-cond")
    fork._init_kwargs.update(pfgm=False, pfgmpp=True, D=2048)
    fork.model._init_kwargs.update(pfgm=False, pfgmpp=True, D=2048)
    cfg = read_checkpoint(convert(edm_format(tmp_path / "fork.pkl", fork), tmp_path / "fork.ckpt"))["hyper_parameters"]
    assert cfg["config"]["model"]["_target_"].endswith("PFGMPP") and cfg["config"]["model"]["D"] == 2048
    with pytest.raises(ConfigError, match="records D=2048"):
        convert(tmp_path / "fork.pkl", tmp_path / "b.ckpt", D=128)
    fork._init_kwargs.update(pfgmpp=False)  # an EDM run of the fork: D is not used
    out = convert(edm_format(tmp_path / "fork_edm.pkl", fork), tmp_path / "fork_edm.ckpt")
    assert read_checkpoint(out)["hyper_parameters"]["config"]["model"]["_target_"].endswith(".EDM")
    fork._init_kwargs.update(pfgm=True)  # PFGM (field prediction) is a different network
    with pytest.raises(CheckpointError, match="PFGM network"):
        convert(edm_format(tmp_path / "pfgm.pkl", fork), tmp_path / "pfgm.ckpt")

    # PFGM++'s loss object keeps the run's options (a dnnlib.EasyDict) with pfgmpp and aug_dim: D is decided
    opts = EasyDict(pfgmpp=True, aug_dim=2048, lsun=False)
    with_opts = edm_format(tmp_path / "opts.pkl", ema, loss_fn=edm_loss(D=2048, N=64, opts=opts))
    assert ("dnnlib.util", "EasyDict") in pickle_globals(with_opts.read_bytes())
    ckpt = read_checkpoint(convert(with_opts, tmp_path / "opts.ckpt"))
    assert ckpt["hyper_parameters"]["config"]["model"]["D"] == 2048 and ckpt["converted_from"]["D_source"] == "pickle"

    without = edm_format(tmp_path / "plain.pkl", ema)
    out = convert(without, tmp_path / "c.ckpt", D=128)
    ckpt = read_checkpoint(out)
    assert ckpt["hyper_parameters"]["config"]["model"]["D"] == 128 and ckpt["converted_from"]["D_source"] == "argument"
    rel, module, _ = denoise_both(net, out, lambda b: None)
    assert module.method.D == 128 and rel <= 1e-5  # same denoiser, PFGM++ kernel for the prior


def test_pfgmpp_training_state_archive(tmp_path):
    """PFGM++'s training-state-*.pt: a torch.save archive whose networks record pfgmpp and D."""
    import zipfile

    from genflow.apps.convert import convert, read_pickle

    net, ema = song_pair("ncsnpp-cond")
    ema._init_kwargs.update(pfgmpp=True, D=2048)
    src = write_pickle(tmp_path / "training-state-000100.pt", ema, torch_save=True)
    assert zipfile.is_zipfile(src)
    assert read_pickle(src)["step"] == 1000
    out = convert(src, tmp_path / "state.ckpt")
    cond_fn = lambda b: {"class": torch.nn.functional.one_hot(torch.arange(b) % 10, 10).float()}
    rel, module, _ = denoise_both(net, out, cond_fn)
    assert type(module.method).__name__ == "PFGMPP" and module.method.D == 2048 and rel <= 1e-5, rel
    # a payload inside the archive is refused like one in a pickle
    ema.model.payload = _OpensFile(tmp_path / "pwned")
    evil = write_pickle(tmp_path / "evil.pt", ema, torch_save=True)
    with pytest.raises(CheckpointError, match=r"asks for (builtins|io)\.open"):
        read_pickle(evil)
    assert not (tmp_path / "pwned").exists()


def test_cli_converts_and_refuses_bad_input(edm_format, tmp_path, cli):
    net, ema = song_pair("ncsnpp-cond")
    src = edm_format(tmp_path / "net.pkl", ema)
    code, out, err = cli("genflow.apps.convert", f"src={src}", f"out={tmp_path / 'net.ckpt'}")
    assert code == 0, err
    assert '"net": null' not in out and (tmp_path / "net.ckpt").is_file()
    line = json.loads(out.strip().splitlines()[-1])  # config names and an absolute path (docs/RECORDS.md)
    from genflow.config import CONFIG_DIR

    assert line["model"] == "edm" and Path(line["checkpoint"]).is_absolute()
    assert line["data"] in {p.stem for p in (CONFIG_DIR / "data").glob("*.yaml")}
    # sample.py reads it (weights_only=True), and train.py init_from= starts from its weights
    code, out, err = cli("sample.py", f"ckpt={tmp_path / 'net.ckpt'}", "seeds=0-1", "steps=2",
                         f"out={tmp_path / 'samples'}", "device=cpu", "progress=false")
    assert code == 0, err
    assert (tmp_path / "samples" / "000001.png").is_file()
    from genflow.config import build, config_from_checkpoint, read_checkpoint

    ckpt = read_checkpoint(tmp_path / "net.ckpt")
    module, _ = build(config_from_checkpoint(ckpt, [f"init_from={tmp_path / 'net.ckpt'}"]))
    state = module.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ckpt["state_dict"].items())
    stamp = (tmp_path / "net.ckpt").stat().st_mtime_ns
    code, _, err = cli("genflow.apps.convert", f"src={src}", f"out={tmp_path / 'net.ckpt'}")  # never replaced unasked
    assert code == 2 and "already exists" in err and (tmp_path / "net.ckpt").stat().st_mtime_ns == stamp
    code, _, err = cli("genflow.apps.convert", f"src={tmp_path / 'missing.pkl'}", f"out={tmp_path / 'x.ckpt'}")
    assert code == 2 and err.startswith("error:") and "fix:" in err
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    code, _, err = cli("genflow.apps.convert", f"src={tmp_path / 'junk.pkl'}", f"out={tmp_path / 'x.ckpt'}")
    assert code == 2 and "cannot read" in err and "Traceback" not in err


class _WritesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


class _OpensFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import builtins

        return builtins.open, (str(self.path), "w")


@pytest.mark.parametrize("payload", [_WritesFile, _OpensFile])
def test_malicious_pickle_is_refused_and_runs_nothing(edm_format, tmp_path, cli, payload):
    target = tmp_path / "pwned"
    # the payload sits deep inside an otherwise well-formed network, where EDM's loader would run it
    net, ema = song_pair("ddpmpp-uncond-augment")
    ema.model.payload_attr = payload(target)
    src = edm_format(tmp_path / "evil.pkl", ema)
    from genflow.apps.convert import read_pickle

    with pytest.raises(CheckpointError, match="refuses to load"):
        read_pickle(src)
    code, _, err = cli("genflow.apps.convert", f"src={src}", f"out={tmp_path / 'evil.ckpt'}")
    assert code == 2 and "refuses" in err and "fix:" in err
    assert not target.exists() and not (tmp_path / "evil.ckpt").exists()


def test_unsupported_preconditioning_is_refused(edm_format, tmp_path):
    from genflow.apps.convert import convert

    net, ema = song_pair("ddpmpp-uncond-augment")
    ve = Persistent("VEPrecond", ema._init_kwargs, children={"model": ema.model})
    with pytest.raises(CheckpointError, match="VEPrecond"):
        convert(edm_format(tmp_path / "ve.pkl", ve), tmp_path / "ve.ckpt")
    assert not (tmp_path / "ve.ckpt").exists()


# ---------------------------------------------------------------------------------------------------
# ADM (DhariwalUNet)
def adm_keys(res0: int, levels: int, num_blocks: int):
    enc, dec = [], []
    for level in range(levels):
        r = f"{res0 >> level}x{res0 >> level}"
        enc.append(f"{r}_conv" if level == 0 else f"{r}_down")
        enc += [f"{r}_block{i}" for i in range(num_blocks)]
    for level in reversed(range(levels)):
        r = f"{res0 >> level}x{res0 >> level}"
        dec += [f"{r}_in0", f"{r}_in1"] if level == levels - 1 else [f"{r}_up"]
        dec += [f"{r}_block{i}" for i in range(num_blocks + 1)]
    return enc, dec


def test_adm_converts_exactly(edm_format, tmp_path):
    from genflow.apps.convert import convert

    kw = dict(model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.1, augment_dim=9)
    torch.manual_seed(0)
    net = ADMUNet(data_shape=(1, 8, 8), num_classes=10, **kw).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    enc_keys, dec_keys = adm_keys(8, 2, 1)
    children = dict(map_noise=Persistent("PositionalEmbedding", dict(num_channels=64)),
                    map_augment=Persistent("Linear", {}, params={"weight": net.map_augment.weight}),
                    map_layer0=edm_linear(net.map_layer0), map_layer1=edm_linear(net.map_layer1),
                    map_label=Persistent("Linear", dict(init_weight=np.sqrt(10)), params={"weight": net.map_label.weight}),
                    enc=nn.ModuleDict({k: edm_any(m) for k, m in zip(enc_keys, net.enc)}),
                    dec=nn.ModuleDict({k: edm_any(m) for k, m in zip(dec_keys, net.dec)}),
                    out_norm=edm_norm(net.out_norm), out_conv=edm_conv(net.out_conv))
    unet = Persistent("DhariwalUNet", dict(img_resolution=8, in_channels=1, out_channels=1, label_dim=10, **kw),
                      children=children)
    src = edm_format(tmp_path / "adm.pkl", edm_precond(unet, "DhariwalUNet", kw, 8, 1, 10))
    out = convert(src, tmp_path / "adm.ckpt")

    def cond_fn(b):
        g = torch.Generator().manual_seed(5)
        return {"class": torch.nn.functional.one_hot(torch.arange(b) % 10, 10).float(),
                "augment": torch.randn(b, 9, generator=g)}

    rel, module, cfg = denoise_both(net, out, cond_fn)
    assert rel <= 1e-5, rel
    assert cfg.net._target_ == "genflow.nets.ADMUNet"


def test_adm_imagenet64_parameter_count():
    with torch.device("meta"):
        net = ADMUNet(data_shape=(3, 64, 64), num_classes=1000, preset="adm_imagenet64")
    # EDM's published ImageNet-64 network (DhariwalUNet, --arch=adm): 295.9 M parameters
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 1) == 295.9


def test_vp_preconditioning_maps_to_ddpm(edm_format, tmp_path):
    """VPPrecond: D(x; s) = x - s F(x / sqrt(1 + s^2), (M - 1) t(s)), t(s) the inverse of
    s(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1); the converted DDPM must see the same net inputs."""
    from genflow.config import module_from_checkpoint
    from genflow.apps.convert import convert

    net, ema = song_pair("ddpmpp-uncond-augment")
    vp = edm_precond(ema.model, "SongUNet", {}, 8, 1, 0, name="VPPrecond")
    vp._init_kwargs.update(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5)
    module, _, _ = module_from_checkpoint(convert(edm_format(tmp_path / "vp.pkl", vp), tmp_path / "vp.ckpt"))
    method = module.method
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0], dtype=torch.float64)
    t = ((0.1 ** 2 + 2 * 19.9 * torch.log1p(sigma ** 2)).sqrt() - 0.1) / 19.9
    assert torch.allclose(method.alpha_bar(t), 1 / (1 + sigma ** 2), rtol=1e-12)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    s32, c_in = sigma.float().reshape(-1, 1, 1, 1), (1 / (1 + sigma ** 2).sqrt()).float().reshape(-1, 1, 1, 1)
    with torch.no_grad():
        want = x - s32 * net(c_in * x, (999 * t).float())
        got = x - s32 * module.net(method.alpha_bar(t).sqrt().float().reshape(-1, 1, 1, 1) * x, method.noise_label(t))
    assert (got - want).norm() / want.norm() <= 1e-5


def edm_algorithm1(net, latents, cond, steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=0.5):
    """Transcription of EDM's Algorithm 1 as its generate.py runs it (deterministic Heun, S_churn = 0):
    float64 state; the preconditioned denoiser evaluated in float32."""

    def denoise(x, sigma):
        x, s = x.float(), torch.full((x.shape[0], 1, 1, 1), float(sigma), dtype=torch.float32)
        c_skip, c_out = sigma_data ** 2 / (s ** 2 + sigma_data ** 2), s * sigma_data / (s ** 2 + sigma_data ** 2).sqrt()
        c_in, c_noise = 1 / (sigma_data ** 2 + s ** 2).sqrt(), s.log() / 4
        return (c_skip * x + c_out * net(c_in * x, c_noise.flatten(), cond)).double()

    i = torch.arange(steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    x = latents.double() * t[0]
    for n in range(steps):
        d = (x - denoise(x, t[n])) / t[n]
        x_next = x + (t[n + 1] - t[n]) * d
        if n < steps - 1:
            d2 = (x_next - denoise(x_next, t[n + 1])) / t[n + 1]
            x_next = x + (t[n + 1] - t[n]) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x


def test_sampling_a_converted_net_reproduces_edm_generate(edm_format, tmp_path):
    from genflow.config import module_from_checkpoint
    from genflow.apps.convert import convert
    from genflow.sampling import generate, to_uint8

    net, ema = song_pair("ddpmpp-uncond-augment", seed=3)
    module, _, _ = module_from_checkpoint(convert(edm_format(tmp_path / "net.pkl", ema), tmp_path / "net.ckpt"))
    seeds = [7, 123456]
    # generate.py's per-seed latents: randn of one image from a generator seeded with that seed
    latents = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        want = edm_algorithm1(net, latents, None)
    got = generate(module.method, module.net, seeds, (1, 8, 8), steps=18, solver="heun", batch_size=1)
    err = (got.double() - want).abs().max() / want.abs().max()
    assert err <= 1e-5, err
    assert module.method.nfe(18, "heun") == 35
    # the PNGs: identical bytes except where a value sits within rounding distance of a uint8 boundary
    assert (to_uint8(got).int() - to_uint8(want.float()).int()).abs().max() <= 1
    assert (to_uint8(got) == to_uint8(want.float())).float().mean() >= 0.99


def test_leaderboard_scores_a_published_pickle(edm_format, tmp_path, monkeypatch, capsys):
    import json

    from genflow.apps.convert import published_checkpoint
    from genflow.apps.leaderboard import run

    net, ema = song_pair("ddpmpp-uncond-augment")
    monkeypatch.setenv("GENFLOW_METRICS_HOME", str(tmp_path / "metrics"))
    monkeypatch.setenv("GENFLOW_TEST_PUBLISHED_PKL", str(edm_format(tmp_path / "published.pkl", ema)))
    monkeypatch.delenv("GENFLOW_TEST_ABSENT_PKL", raising=False)
    suite = tmp_path / "configs" / "suite" / "published.yaml"  # a suite of the user's own, outside the repository
    suite.parent.mkdir(parents=True)
    suite.write_text(
        "name: published\n"
        "fid: {num: 64, seed_sets: 1, batch_size: 64, extractor: digits, ref: train}\n"
        "entries:\n"
        "  - {name: tiny-edm, pickle: '${oc.env:GENFLOW_TEST_PUBLISHED_PKL,null}', paper_fid: 1.97, steps: 3}\n"
        "  - {name: absent, pickle: '${oc.env:GENFLOW_TEST_ABSENT_PKL,null}', paper_fid: 1.79, steps: 3}\n")
    result = run([f"hydra.searchpath=[file://{tmp_path / 'configs'}]", "suite=published", f"out={tmp_path / 'lb'}",
                  f"history={tmp_path / 'history.jsonl'}"])
    captured = capsys.readouterr()
    assert "skipping absent" in captured.err
    rows = json.loads((tmp_path / "lb" / "leaderboard.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["tiny-edm"] and result["entries"] == 1
    row = rows[0]
    assert row["paper_fid"] == 1.97 and row["model"] == "edm" and row["nfe"] == 5 and row["images"] == 64
    assert math.isfinite(row["fid"]) and row["fid"] > 0 and row["delta_paper"] == pytest.approx(row["fid"] - 1.97)
    cached = Path(row["checkpoint"])
    assert cached.parent == tmp_path / "metrics" / "converted" and cached.is_file()
    stamp = cached.stat().st_mtime_ns
    entry = {"pickle": os.environ["GENFLOW_TEST_PUBLISHED_PKL"]}
    assert published_checkpoint(entry) == str(cached) and cached.stat().st_mtime_ns == stamp  # converted once
    # a damaged cached conversion is converted again, with one line saying so
    good = torch.load(cached, map_location="cpu", weights_only=True)["state_dict"]
    data = bytearray(cached.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = bytes(4096)
    cached.write_bytes(bytes(data))
    capsys.readouterr()
    assert published_checkpoint(entry) == str(cached)
    again = torch.load(cached, map_location="cpu", weights_only=True)["state_dict"]
    assert again.keys() == good.keys() and all(torch.equal(again[k], good[k]) for k in good)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and str(cached) in lines[0] and "converting again" in lines[0]
    assert published_checkpoint({"pickle": None}) is None


def test_convert_help(cli):
    code, out, err = cli("genflow.apps.convert", "--help")
    assert code == 0 and out.startswith("Import NVlabs EDM / PFGM++ network pickles") and "src=SRC.pkl" in out
    assert "== Config ==" in out and "overwrite: false" in out
    code, _, err = cli("genflow.apps.convert", "net.pkl", "out.ckpt")  # one grammar: key=value
    assert code == 2 and "is not key=value" in err and "fix:" in err


def test_attention_conversion_matches_edms_attention_forward():
    """The qkv re-layout checked against EDM's attention written out from its published forward (not against
    the inverse the other tests' pickles are built with): a 1x1 conv to 3C channels read as (B*heads, C/heads,
    3, L), softmax(q^T k / sqrt(C/heads)) over keys, values mixed, a 1x1 projection."""
    from genflow.apps.convert import _attention_qkv
    from genflow.nets.layers import Attention

    g = torch.Generator().manual_seed(0)
    B, C, H, W, heads = 2, 8, 3, 4, 2
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    qkv_w, qkv_b = torch.randn(3 * C, C, generator=g, dtype=torch.float64), torch.randn(3 * C, generator=g,
                                                                                      dtype=torch.float64)
    proj_w, proj_b = torch.randn(C, C, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)
    # EDM's UNetBlock attention, weights in EDM's layout
    qkv = torch.einsum("oc,bchw->bohw", qkv_w, x) + qkv_b[:, None, None]
    q, k, v = qkv.reshape(B * heads, C // heads, 3, -1).unbind(2)
    weights = torch.softmax(torch.einsum("ncq,nck->nqk", q, k / math.sqrt(C // heads)), dim=2)
    mixed = torch.einsum("nqk,nck->ncq", weights, v).reshape(B, C, H, W)
    edm = torch.einsum("oc,bchw->bohw", proj_w, mixed) + proj_b[:, None, None]
    # genflow's attention with the converted weights, on the same H*W tokens
    attn = Attention(C, heads).double()
    with torch.no_grad():
        attn.qkv.weight.copy_(_attention_qkv(qkv_w))
        attn.qkv.bias.copy_(_attention_qkv(qkv_b.reshape(-1, 1)).reshape(-1))
        attn.proj.weight.copy_(proj_w)
        attn.proj.bias.copy_(proj_b)
    tokens = x.permute(0, 2, 3, 1).reshape(B, H * W, C)
    ours = attn(tokens).reshape(B, H, W, C).permute(0, 3, 1, 2)
    torch.testing.assert_close(ours, edm, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# numpy values: numeric scalars are data, anything else is refused before it is called
class _NumpyScalarOf:
    """Pickled as numpy's scalar(dtype, bytes) with any dtype (numpy itself cannot hold an object scalar)."""

    def __init__(self, dtype, data):
        self.dtype, self.data = dtype, data

    def __reduce__(self):
        return sys.modules[NUMPY_SCALAR["2.x"]].scalar, (self.dtype, self.data)


class _DtypeState:
    """A float32 dtype whose pickled state adds fields (a structured dtype in disguise)."""

    def __reduce__(self):
        return np.dtype, ("f4", False, True), (3, "<", None, ("a",), {"a": (np.dtype("f4"), 0)}, 4, 1, 16)


class _NumpyArray:
    def __reduce__(self):
        return np.zeros(3).__reduce__()  # numpy._core.multiarray._reconstruct: arrays are not read


@pytest.mark.parametrize("value, names, refused", [
    (_NumpyScalarOf(np.dtype("O"), b"\0" * 8), "2.x", "numpy.dtype('O8')"),
    (_NumpyScalarOf(np.dtype("U3"), b"\0" * 12), "2.x", "numpy.dtype('U3')"),
    (_NumpyScalarOf(np.dtype([("a", "f4")]), b"\0" * 4), "2.x", "numpy.dtype('V4')"),
    (_NumpyScalarOf(np.dtype("M8[D]"), b"\0" * 8), "2.x", "numpy.dtype('M8')"),
    (_NumpyScalarOf(_DtypeState(), b"\0" * 4), "2.x", "a numpy dtype with the state"),
    (_NumpyScalarOf(np.dtype("f8"), b"\0" * 4), "2.x", "not 8 bytes"),
    (_NumpyArray(), "1.x", "multiarray._reconstruct"),
])
def test_numpy_values_other_than_numeric_scalars_are_refused(tmp_path, cli, value, names, refused):
    net, ema = song_pair("ncsnpp-cond")
    ema.model.payload = value
    src = write_pickle(tmp_path / "net.pkl", ema, numpy_names=names)
    code, _, err = cli("genflow.apps.convert", f"src={src}", f"out={tmp_path / 'net.ckpt'}")
    assert code == 2 and err.startswith("error:") and refused in err and "why:" in err and "fix:" in err, err
    assert "Traceback" not in err and not (tmp_path / "net.ckpt").exists()


def test_numeric_numpy_scalars_are_read_from_their_bytes(tmp_path):
    from genflow.apps.convert import read_pickle

    net, ema = song_pair("ncsnpp-cond")
    values = dict(f16=np.float16(0.1), f32=np.float32(np.sqrt(0.2)), f64=np.sqrt(0.5), i8=np.int8(-3),
                  u64=np.uint64(2 ** 63 + 5), b=np.bool_(True), c=np.complex64(1 - 2j),
                  big=np.dtype(">f8").type(1.25))
    ema.model.values = values
    for names in NUMPY_SCALAR:
        read = read_pickle(write_pickle(tmp_path / f"{names}.pkl", ema, numpy_names=names))
        got = read["ema"].child("model").state["values"]
        assert got == {k: v.item() for k, v in values.items()}
        assert type(got["b"]) is bool and type(got["u64"]) is int and got["f32"] == float(np.float32(np.sqrt(0.2)))


def test_hyperparameters_disagreeing_with_weights_fail_before_allocating(tmp_path, cli):
    import resource

    net, ema = song_pair("ddpmpp-uncond-augment")
    ema.model._init_kwargs["model_channels"] = 200000  # a network of ~640 GB over the pickle's small tensors
    src = write_pickle(tmp_path / "net.pkl", ema)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    code, _, err = cli("genflow.apps.convert", f"src={src}", f"out={tmp_path / 'net.ckpt'}")
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2 ** 20
    assert code == 2 and "do not fill genflow's network" in err and "wrong shape" in err and "fix:" in err, err
    assert grown_gib < 1, grown_gib


# ---------------------------------------------------------------------------------------------------
# Snapshots written by EDM's and PFGM++'s own code (EDM_DIR / PFGMPP_DIR)
def _writer_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("edm_reference_writer", Path(__file__).with_name(
        "edm_reference_writer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WRITER = _writer_module()
#: what genflow does with each preconditioning: the method it converts to, or the refusal's words
REFUSED = {"VEPrecond": "VEPrecond, which genflow has no method for",
           "iDDPMPrecond": "iDDPMPrecond, which genflow has no method for"}


def _write_reference(tmp_path_factory, repo: str, kind: str) -> Path:
    out = tmp_path_factory.mktemp(f"{kind}-snapshots")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("edm_reference_writer.py")),
                           "--repo", repo, "--kind", kind, "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def edm_snapshots(tmp_path_factory):
    if not EDM_DIR:
        pytest.skip("EDM_DIR is not set (a checkout of NVlabs/edm)")
    return _write_reference(tmp_path_factory, EDM_DIR, "edm")


@pytest.fixture(scope="session")
def pfgmpp_snapshots(tmp_path_factory):
    if not PFGMPP_DIR:
        pytest.skip("PFGMPP_DIR is not set (a checkout of the PFGM++ repository)")
    return _write_reference(tmp_path_factory, PFGMPP_DIR, "pfgmpp")


def _reference_denoiser(ckpt: Path):
    """The genflow module of a converted checkpoint, loaded as sample.py loads it."""
    from genflow.config import module_from_checkpoint

    module, _, _ = module_from_checkpoint(ckpt)
    return module


def _max_error(module, io: dict) -> float:
    """max |D_genflow - D_reference| / max(1, sigma), per image: VPPrecond's output is x - sigma F(...), where
    F's float32 rounding is scaled by sigma (up to 80); EDMPrecond's c_out keeps it below sigma_data."""
    cond = {k: v for k, v in (("class", io["class_labels"]), ("augment", io["augment_labels"])) if v is not None}
    x, sigma, method = io["x"], io["sigma"], module.method
    with torch.no_grad():
        if hasattr(method, "denoise"):
            got = method.denoise(module.net, x, sigma, cond or None)
        else:  # DDPM from VPPrecond: sigma -> t by the closed-form inverse of the linear schedule
            s = sigma.double()
            b0, b1 = method.beta_min, method.beta_max
            t = ((b0 ** 2 + 2 * (b1 - b0) * torch.log1p(s ** 2)).sqrt() - b0) / (b1 - b0)
            assert torch.allclose(method.alpha_bar(t), 1 / (1 + s ** 2), rtol=1e-12)
            c_in = method.alpha_bar(t).sqrt().float().reshape(-1, 1, 1, 1)
            got = x - sigma.reshape(-1, 1, 1, 1) * module.net(c_in * x, method.noise_label(t), cond or None)
    per_image = (got - io["denoised"]).abs().flatten(1).amax(1) / sigma.clamp(min=1)
    return per_image.max().item()


@pytest.mark.parametrize("case", sorted(WRITER.CASES))
def test_edm_snapshot_converts_and_matches_edms_forward(edm_snapshots, tmp_path, cli, case):
    precond, _, res, ch, *_ = WRITER.CASES[case]
    src, out = edm_snapshots / f"{case}.pkl", tmp_path / f"{case}.ckpt"
    # an RGB 16x16 network gets an image-folder data config; no folder is needed to convert or sample it
    code, stdout, err = cli("genflow.apps.convert", f"src={src}", f"out={out}")
    if precond in REFUSED:
        assert code == 2 and REFUSED[precond] in err and "fix:" in err and not out.exists(), err
        return
    assert code == 0, err
    # EDM's loader would exec the stored source as a module _imported_module_<uuid> and import torch_utils
    assert not any(k.startswith("_imported_module_") or k in ("torch_utils", "training", "dnnlib")
                   for k in sys.modules)
    io = torch.load(edm_snapshots / f"{case}.io.pt", weights_only=True)
    module = _reference_denoiser(out)
    assert type(module.method).__name__ == {"EDMPrecond": "EDM", "VPPrecond": "DDPM"}[precond]
    error = _max_error(module, io)
    print(f"\n{case}: max |D_genflow - D_EDM| / max(1, sigma) = {error:.3g}")
    # VPPrecond's noise label (M - 1) t reaches 999, where EDM's float32 evaluation of t rounds by ~6e-5
    assert error <= (2e-5 if precond == "VPPrecond" else 5e-6), error


def test_fixture_writer_writes_what_edm_writes(edm_snapshots, tmp_path):
    """The always-run writer's pickle against EDM's for the same network (DDPM++ with the augmentation label):
    the same globals, the same modules with the same tensors, the same top-level entries."""
    from genflow.apps.convert import Record, read_pickle

    real = edm_snapshots / "ddpmpp-uncond-edm.pkl"
    real_globals = pickle_globals(real.read_bytes())
    names = next(k for k, module in NUMPY_SCALAR.items() if (module, "scalar") in real_globals)  # EDM's numpy's
    net, ema = song_pair("ddpmpp-uncond-augment")
    ours = write_pickle(tmp_path / "ours.pkl", ema, numpy_names=names, augment_pipe=edm_augment_pipe())
    assert pickle_globals(ours.read_bytes()) == real_globals and ("numpy", "dtype") in real_globals

    def tree(record, path="ema"):
        found = {path: (record.class_name, sorted((k, tuple(v.shape)) for k, v in record.tensors.items()))}
        for name, child in record.children.items():
            found.update(tree(child, f"{path}.{name}"))
        return found

    a, b = read_pickle(ours), read_pickle(real)
    assert tree(a["ema"]) == tree(b["ema"])
    assert sorted(a) == sorted(b) == ["augment_pipe", "dataset_kwargs", "ema", "loss_fn"]
    for key in ("loss_fn", "augment_pipe"):
        assert isinstance(a[key], Record) and a[key].class_name == b[key].class_name
        assert set(a[key].state) <= set(b[key].state)
    assert type(a["dataset_kwargs"]) is type(b["dataset_kwargs"]) is dict


@pytest.mark.parametrize("case", sorted(WRITER.PFGMPP_CASES))
@pytest.mark.parametrize("file", ["pt", "pkl"])
def test_pfgmpp_snapshot_converts_with_its_D(pfgmpp_snapshots, tmp_path, cli, case, file):
    """PFGM++'s training loop saves torch.save(dict(optimizer_state, step, ema, net)) as training-state-*.pt;
    the .pkl is the same network in EDM's snapshot layout with PFGM++'s loss object (options in an EasyDict)."""
    interface = WRITER.PFGMPP_CASES[case][-1]
    out = tmp_path / f"{case}.ckpt"
    code, stdout, err = cli("genflow.apps.convert", f"src={pfgmpp_snapshots / f'{case}.{file}'}", f"out={out}")
    assert code == 0, err
    module = _reference_denoiser(out)
    if interface["pfgmpp"]:
        assert type(module.method).__name__ == "PFGMPP" and module.method.D == interface["D"]
    else:
        assert type(module.method).__name__ == "EDM"
    error = _max_error(module, torch.load(pfgmpp_snapshots / f"{case}.io.pt", weights_only=True))
    print(f"\n{case}.{file}: max |D_genflow - D_PFGM++| / max(1, sigma) = {error:.3g}")
    assert error <= 5e-6, error


def test_convert_stops_refuses_unwritable_and_full_destinations_and_never_replaces(edm_format, tmp_path, cli,
                                                                                   monkeypatch):
    """Ctrl-C while the checkpoint is written: one line, exit 130, no file (not even a temporary one). A folder
    that cannot be written: exit 2 before the pickle is read. Too little free space for the converted tensors: exit
    2 before anything is written. An existing out= is refused and kept byte for byte."""
    import shutil

    import genflow.apps.convert as convert_app

    _, ema = song_pair("ddpmpp-uncond-augment")
    src = edm_format(tmp_path / "net.pkl", ema)
    out = tmp_path / "net.ckpt"
    listing = sorted(p.name for p in tmp_path.iterdir())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(torch, "save", interrupted)
        code, _, err = cli("genflow.apps.convert", f"src={src}", f"out={out}")
    lines = [line for line in err.strip().splitlines() if "RuntimeWarning" not in line]  # runpy's, in-process
    assert code == 130 and lines == [
        "stopped by SIGINT while converting: nothing was written (the checkpoint is written whole or not at all); "
        "run the same command again"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == listing

    import signal

    def terminated(*args, **kwargs):  # a real SIGTERM, delivered to this (the in-process app's) process
        os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", terminated)
        code, _, err = cli("genflow.apps.convert", f"src={src}", f"out={out}")
    assert code == 143 and "stopped by SIGTERM while converting: nothing was written" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == listing

    real_access = os.access

    def not_writable(path, mode, *args, **kwargs):
        return False if mode & os.W_OK and Path(path).resolve() == tmp_path.resolve() else real_access(path, mode)

    def not_read(*args, **kwargs):
        raise AssertionError("the pickle was read before the destination was checked")

    with monkeypatch.context() as m:
        m.setattr(os, "access", not_writable)
        m.setattr(convert_app, "read_pickle", not_read)
        with pytest.raises(ConfigError, match=f"out={out} cannot be written: {tmp_path} is not writable"):
            convert_app.main([f"src={src}", f"out={out}"])
    with monkeypatch.context() as m:
        m.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 12, 10 ** 12 - 10 ** 5, 10 ** 5))
        code, _, err = cli("genflow.apps.convert", f"src={src}", f"out={out}")
    assert code == 2 and "MiB free, the job needs about" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == listing

    out.write_bytes(b"someone's file")
    code, _, err = cli("genflow.apps.convert", f"src={src}", f"out={out}")
    assert code == 2 and "already exists" in err and out.read_bytes() == b"someone's file", err
