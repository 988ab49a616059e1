import os

# One thread unless the caller sets OMP_NUM_THREADS: the test nets are too small to gain from a second
# one, and next to any other job OpenMP threads waiting on each other cost many times the work
# (tests/test_fid.py on the shared 2-core machine: 7 s CPU with one thread, 151 s with two).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def run_cli(entry: str, *args: str):
    """Run a command-line entry point in this process, as a user would from the repository root.

    ``entry`` is a script of the repository (``"train.py"``, ``"sample.py"``) or a module
    (``"genflow.apps.evaluate"``). Returns ``(exit_code, stdout, stderr)``. In-process calls skip the
    interpreter start and the Lightning import that a subprocess pays each time.
    """
    import contextlib
    import io
    import logging
    import runpy
    import sys

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    # a Hydra app configures the root logger and may leave its HydraConfig set (--cfg, --help): undo both
    # afterwards, or later tests would log into this call's buffers and train() would take its output dir
    root_handlers, root_level = logging.root.handlers[:], logging.root.level
    import signal

    # an app stopped by a signal leaves handlers that end the process on the next one (it is exiting): not pytest's
    signals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    code = 0
    try:
        sys.argv = [entry, *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if entry.endswith(".py"):
                runpy.run_path(str(ROOT / entry), run_name="__main__")
            else:
                runpy.run_module(entry, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
        for handler in set(logging.root.handlers) - set(root_handlers):
            handler.close()
        logging.root.handlers[:], logging.root.level = root_handlers, root_level
        for sig, handler in signals.items():
            signal.signal(sig, handler)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def cli():
    """``cli("sample.py", "ckpt=...", ...) -> (exit_code, stdout, stderr)``, in-process."""
    return run_cli


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One tiny trained model for every test that only needs "a trained model" (sample.py, evaluate, weight
    loading): class-conditional PFGM++ on digits with label dropout, so guidance and class= work too.

    Trained once per session by the real entry point (compose -> build -> fit) into a folder of its own; the
    result is ``genflow.apps.train.train``'s dict (``checkpoint``, ``run_dir``, ...). Tests must not write into
    ``run_dir``: copy what they change. Tests of training itself (resume, DDP, sweeps) train their own runs.
    """
    from genflow.config import compose
    from genflow.apps.train import train

    root = tmp_path_factory.mktemp("trained_run") / "run"
    cfg = compose(["model=pfgmpp", "data=digits", "net=unet_tiny", "data.batch_size=16", "data.conditional=true",
                   "++net.label_dropout=0.2", "trainer.max_steps=6", "trainer.val_check_interval=3",
                   "checkpoint.every_n_steps=3", "sample.num=4", "sample.steps=2", "optim.warmup_steps=2",
                   "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"+run_dir={root}"])
    return train(cfg)


@pytest.fixture(scope="session")
def trained_ckpt(trained_run):
    """The shared tiny model's final checkpoint (see ``trained_run``)."""
    return trained_run["checkpoint"]


@pytest.fixture
def one_thread():
    """Per-sample results can only be batch-independent if the net's are: on CPU a convolution split over
    several threads rounds differently for different batch sizes (~1e-7), which dopri5's error estimate
    (a difference of nearly equal stages) amplifies to its tolerance. One thread keeps the net bitwise
    batch-independent, so a test comparing across batch sizes sees genflow's code alone (and a tiny net runs
    faster on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def checkpoint_writer():
    """``write(path, overrides, data_shape, num_classes=0, seed=None)``: a genflow checkpoint written as train.py
    writes final.ckpt (Lightning's writer, GenerativeModule's hyper-parameters) of an untrained network built
    from a data record alone (no data is read); ``seed``: the network's weights drawn at random from it."""
    def write(path, overrides, data_shape, num_classes=0, seed=None):
        import pytorch_lightning as pl

        from genflow.config import build, compose, target_class
        from genflow.data.record import RecordedData, data_record

        cfg = compose(overrides)
        cls = target_class(cfg.data)
        record = data_record(cls, data_shape, num_classes, num_classes > 0)
        module, _ = build(cfg, prepare=False, datamodule=RecordedData(record, cls, lambda: pytest.fail("data built")))
        if seed is not None:  # untrained nets start with a zero output layer; random weights give real images
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in module.net.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1))
        trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False,
                             enable_model_summary=False)
        trainer.strategy.connect(module)
        trainer.save_checkpoint(path, weights_only=True)
        return path

    return write


class _StandInLayers(torch.nn.Module):
    """Cheap network with Inception's output shape: (B, 3, 299, 299) -> (B, 2048, 1, 1)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
        self.fc = torch.nn.Linear(8 * 16, 2048)

    def forward(self, x):
        h = torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 4)
        return self.fc(h.flatten(1)).reshape(x.shape[0], 2048, 1, 1)


class _StandInInception(torch.nn.Module):
    """The interface of the TF-Inception TorchScript file: forward(x in [0, 255], return_features) with
    the resize inside, and ``layers`` for already-resized, normalised input."""

    def __init__(self):
        super().__init__()
        self.layers = _StandInLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        feats = self.layers((x - 128) / 128).reshape(x.shape[0], 2048)
        if return_features:
            return feats
        return feats[:, :1008]


@pytest.fixture(scope="session")
def standin_inception(tmp_path_factory):
    """A TorchScript file with the TF-Inception interface (cheap weights), saved under its real file name:
    (path, scripted module). The FID code paths that read the real file run on it."""
    import warnings

    from genflow.metrics.features import INCEPTION_FILE

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("inception")
    with warnings.catch_warnings():  # torch.jit.script is deprecated, but the real file is TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(_StandInInception().eval())
    scripted.save(str(folder / INCEPTION_FILE))
    return folder / INCEPTION_FILE, scripted
