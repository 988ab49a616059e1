"""Caches and checkpoints are verified on read: a damaged cache entry is recomputed with one line saying so,
a damaged checkpoint is an error naming the file, and files written before checksums still load."""
from __future__ import annotations

import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from genflow.cache import CHECKSUM_KEY, checksum_path


def _recomputed_once(capsys, path: Path) -> None:
    """Exactly one stderr line, naming the entry and saying it is recomputed."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and "recomputing" in lines[0], lines


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_spectrum_cache_recomputes_a_damaged_entry(tmp_path, monkeypatch, capsys):
    from genflow.methods.spectrum import estimate_spectrum

    monkeypatch.setenv("GENFLOW_CACHE", str(tmp_path))
    x = torch.randn(32, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    first = estimate_spectrum(x, "empirical")
    (entry,) = tmp_path.glob("spd_spectrum_*.safetensors")
    assert checksum_path(entry).is_file() and capsys.readouterr().err == ""
    good = entry.read_bytes()

    entry.write_bytes(good[: len(good) // 2])                  # truncated: safetensors cannot parse it
    assert torch.equal(estimate_spectrum(x, "empirical"), first)
    _recomputed_once(capsys, entry)
    assert entry.read_bytes() == good

    _flip_middle_byte(entry)                                   # parses, but one number is wrong
    assert torch.equal(estimate_spectrum(x, "empirical"), first)
    _recomputed_once(capsys, entry)

    checksum_path(entry).unlink()                              # written before checksums: no sidecar
    assert torch.equal(estimate_spectrum(x, "empirical"), first)
    _recomputed_once(capsys, entry)
    assert torch.equal(estimate_spectrum(x, "empirical"), first)  # verified again, silently
    assert capsys.readouterr().err == ""


def _reference(tmp_path):
    from genflow.metrics import build_feature_extractor, reference_stats

    torch.manual_seed(0)
    ext = build_feature_extractor(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)))
    images = torch.rand(24, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return lambda: reference_stats(ext, images, dataset="toy", split="train", directory=tmp_path, batch_size=8)


def test_fid_reference_cache_recomputes_truncated_and_shifted_entries(tmp_path, capsys):
    stats = _reference(tmp_path)
    first = stats()
    (entry,) = tmp_path.glob("toy_train_*.npz")
    assert capsys.readouterr().err == ""

    good = entry.read_bytes()
    entry.write_bytes(good[:100])                              # truncated: not a zip archive any more
    again = stats()
    _recomputed_once(capsys, entry)
    np.testing.assert_array_equal(again.mu, first.mu)
    np.testing.assert_array_equal(again.sigma, first.sigma)

    with np.load(entry) as z:                                  # a valid file whose mean is shifted
        arrays = {k: z[k] for k in z.files}
    arrays["mu"] = arrays["mu"] + 0.5
    with open(entry, "wb") as f:
        np.savez(f, **arrays)
    again = stats()
    _recomputed_once(capsys, entry)
    np.testing.assert_array_equal(again.mu, first.mu)
    assert stats().source == str(entry) and capsys.readouterr().err == ""


def _zero_tensor_region(path: Path, size: int = 4096) -> None:
    """Zero ``size`` bytes in the middle of the largest tensor storage of a torch.save archive (the zip
    records' CRCs are left as they were: torch does not check them)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert info.compress_type == zipfile.ZIP_STORED and info.file_size >= 3 * size
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2 - size // 2
    assert any(data[start: start + size])                      # the region held data
    data[start: start + size] = bytes(size)
    path.write_bytes(bytes(data))


def test_checkpoint_with_a_zeroed_region_is_refused(trained_run, cli, tmp_path):
    ckpt = tmp_path / "final.ckpt"
    shutil.copy(trained_run["checkpoint"], ckpt)
    assert isinstance(torch.load(ckpt, weights_only=True, mmap=True).get(CHECKSUM_KEY), str)
    _zero_tensor_region(ckpt)
    code, out, err = cli("sample.py", f"ckpt={ckpt}", "num=2", "steps=1", "progress=false", f"out={tmp_path / 's'}")
    assert code == 2, err
    assert str(ckpt) in err and "sha256 stored when it was written" in err and "Traceback" not in err
    print(err)
    assert not list((tmp_path / "s").glob("*.png")) if (tmp_path / "s").exists() else True


def test_checkpoint_written_before_checksums_still_samples(trained_run, cli, tmp_path):
    old = torch.load(trained_run["checkpoint"], map_location="cpu", weights_only=True)
    old.pop(CHECKSUM_KEY)
    torch.save(old, tmp_path / "old.ckpt")
    code, out, err = cli("sample.py", f"ckpt={tmp_path / 'old.ckpt'}", "num=2", "steps=1", "progress=false",
                         f"out={tmp_path / 's'}")
    assert code == 0, err
    assert (tmp_path / "s" / "000001.png").is_file()
    # without the stored sha256, the zip records' CRC-32s still catch damaged tensor data
    _zero_tensor_region(tmp_path / "old.ckpt")
    code, out, err = cli("sample.py", f"ckpt={tmp_path / 'old.ckpt'}", "num=2", "steps=1", "progress=false",
                         f"out={tmp_path / 's2'}")
    assert code == 2 and str(tmp_path / "old.ckpt") in err and "CRC-32" in err and "Traceback" not in err, err


def test_resume_skips_a_corrupt_last_checkpoint(trained_run, tmp_path):
    from genflow.config.checkpoints import newest_valid

    run = tmp_path / "run"
    shutil.copytree(Path(trained_run["run_dir"]) / "checkpoints", run / "checkpoints")
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file() and len(list((run / "checkpoints").glob("*.ckpt"))) >= 3
    assert newest_valid(run, mmap=True)[0] == last
    _zero_tensor_region(last)
    path, ckpt, skipped = newest_valid(run, mmap=True)
    assert path != last and path.name != "final.ckpt"
    assert len(skipped) == 1 and "last.ckpt" in skipped[0] and "is corrupt" in skipped[0]


def test_missing_outputs_are_not_made_from_a_corrupt_final_checkpoint(trained_run, cli, tmp_path):
    """A run stopped after final.ckpt makes its grid and exports from it on ckpt_path=last: not if it is damaged."""
    run = tmp_path / "run"
    shutil.copytree(trained_run["run_dir"], run)
    (run / "grid.png").unlink()
    final = run / "checkpoints" / "final.ckpt"
    _zero_tensor_region(final)
    code, out, err = cli("train.py", "model=pfgmpp", "data=digits", "net=unet_tiny", "data.batch_size=16",
                         "data.conditional=true", "++net.label_dropout=0.2", "trainer.max_steps=6",
                         "trainer.val_check_interval=3", "checkpoint.every_n_steps=3", "sample.num=4",
                         "sample.steps=2", "optim.warmup_steps=2", "trainer.enable_progress_bar=false",
                         "ckpt_path=last", f"hydra.run.dir={run}")
    assert code == 2 and str(final) in err and "is corrupt" in err and "Traceback" not in err, err
    assert not (run / "grid.png").exists()
