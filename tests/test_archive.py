"""EDM's data set archives: genflow-dataset writes EDM's layout, data=zip reads it without unpacking (labels,
checks, a bad image named), and a leaderboard suite runs from one. With EDM_DIR set, EDM's own
dataset_tool.py and training/dataset.py are the other side of the comparison."""
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genflow.apps.dataset import main as dataset_main
from genflow.data.archive import ImageZip, member_name
from genflow.errors import ConfigError

EDM_DIR = os.environ.get("EDM_DIR")


@pytest.fixture
def folder(tmp_path):
    """Two classes (top-level folders a/, b/) of random 8x8 RGB PNGs, one nested a level deeper."""
    rng = np.random.default_rng(0)
    images = {}
    for name in ("a/x0.png", "a/x1.png", "a/deep/x2.png", "b/y0.png", "b/y1.png"):
        path = tmp_path / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        images[name] = pixels
    return tmp_path / "images", images


def edm_zip(path, pixels, labels=None, mode="L", compression=zipfile.ZIP_STORED):
    """An archive written here by hand in EDM's documented layout (members NNNNN/imgNNNNNNNN.png)."""
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for i, p in enumerate(pixels):
            buffer = io.BytesIO()
            Image.fromarray(p, mode).save(buffer, format="png")
            zf.writestr(f"{i:08d}"[:5] + f"/img{i:08d}.png", buffer.getvalue())
        rows = None if labels is None else [[member_name(i), int(c)] for i, c in enumerate(labels)]
        zf.writestr("dataset.json", json.dumps({"labels": rows}))
    return path


def test_the_tool_writes_edms_layout(folder, tmp_path, capsys):
    source, images = folder
    result = dataset_main([f"source={source}", f"dest={tmp_path / 'd.zip'}"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["images"] == 5 and result["resolution"] == 8 and result["channels"] == 3 and result["classes"] == 2
    with zipfile.ZipFile(tmp_path / "d.zip") as zf:
        infos = zf.infolist()
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)  # uncompressed, as EDM writes
        names = [member_name(i) for i in range(5)]
        assert [i.filename for i in infos] == names + ["dataset.json"]
        assert names[3] == "00000/img00000003.png"
        # ordered by path, classes from the top-level folders (sorted)
        order = sorted(images, key=lambda n: Path(source / n))
        labels = json.loads(zf.read("dataset.json"))["labels"]
        assert labels == [[m, 0 if n.startswith("a/") else 1] for m, n in zip(names, order)]
        for member, name in zip(names, order):
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(zf.read(member)))), images[name])
    # never overwritten; bad arguments are clear errors
    with pytest.raises(ConfigError, match="exists"):
        dataset_main([f"source={source}", f"dest={tmp_path / 'd.zip'}"])
    with pytest.raises(ConfigError, match="power of two"):
        dataset_main([f"source={source}", f"dest={tmp_path / 'e.zip'}", "resolution=12"])
    with pytest.raises(ConfigError, match="Could not override .size."):
        dataset_main([f"source={source}", f"dest={tmp_path / 'e.zip'}", "size=8"])


def test_resolution_crops_and_resizes_and_unlabelled_folders_write_null(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(np.full((6, 10), 40 * i, np.uint8), "L").save(flat / f"{i}.png")
    with pytest.raises(ConfigError, match="square, power-of-two"):
        dataset_main([f"source={flat}", f"dest={tmp_path / 'a.zip'}"])
    assert not (tmp_path / "a.zip").exists()  # nothing half-written is left
    result = dataset_main([f"source={flat}", f"dest={tmp_path / 'b.zip'}", "resolution=4"])
    assert result["resolution"] == 4 and result["channels"] == 1 and not result["labelled"]
    with zipfile.ZipFile(tmp_path / "b.zip") as zf:
        assert json.loads(zf.read("dataset.json")) == {"labels": None}
        assert np.all(np.asarray(Image.open(io.BytesIO(zf.read(member_name(2))))) == 80)


def test_zip_data_reads_the_archive_without_unpacking(folder, tmp_path):
    source, images = folder
    dataset_main([f"source={source}", f"dest={tmp_path / 'd.zip'}"])
    dm = ImageZip(path=str(tmp_path / "d.zip"), val_fraction=0.0, batch_size=4)  # a batch within its 5 images
    assert dm.conditional and dm.num_classes == 2 and dm.name == "d"  # labels present: class-conditional
    x, labels = dm._load()
    order = sorted(images, key=lambda n: Path(source / n))
    want = torch.stack([torch.from_numpy(images[n]).permute(2, 0, 1) for n in order]).float() / 127.5 - 1
    assert torch.equal(x, want) and labels.tolist() == [0, 0, 0, 1, 1]
    assert not list(tmp_path.glob("d/**"))  # nothing unpacked beside it
    dm.setup()
    batch_x, cond = next(iter(dm.train_dataloader()))
    assert cond["class"].shape == (len(batch_x), 2)
    assert not ImageZip(path=str(tmp_path / "d.zip"), conditional=False).num_classes


def test_archives_in_edms_layout_made_here(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (4, 16, 16), dtype=np.uint8)
    dm = ImageZip(path=str(edm_zip(tmp_path / "g.zip", grey)), val_fraction=0.0)
    assert not dm.conditional and dm.num_classes == 0
    dm.verify()
    x, labels = dm._load()
    assert labels is None and torch.equal(x, torch.from_numpy(grey)[:, None].float() / 127.5 - 1)
    with pytest.raises(ConfigError, match="no class labels"):
        ImageZip(path=str(tmp_path / "g.zip"), conditional=True).setup()
    # labelled, and read the same when the archive happens to be deflated
    dm = ImageZip(path=str(edm_zip(tmp_path / "l.zip", grey, [3, 0, 1, 3], compression=zipfile.ZIP_DEFLATED)))
    assert dm.num_classes == 4 and dm._load()[1].tolist() == [3, 0, 1, 3]
    assert ImageZip(path=str(tmp_path / "l.zip"), resolution=8)._load()[0].shape == (4, 1, 8, 8)


def test_bad_archives_are_named_errors_before_training(tmp_path):
    from genflow.config import compose

    grey = np.zeros((3, 8, 8), np.uint8)
    bad = edm_zip(tmp_path / "bad.zip", grey)
    with zipfile.ZipFile(bad, "a") as zf:
        zf.writestr("00000/img00000003.png", b"\x89PNG\r\n\x1a\n not an image")
    # the training config's checks decode every image before a run starts (as for imagefolder)
    with pytest.raises(ConfigError, match=r"cannot decode image .*bad\.zip:00000/img00000003\.png"):
        compose(["data=zip", f"data.path={bad}"])
    with pytest.raises(ConfigError, match="is not a file"):
        ImageZip(path=str(tmp_path / "missing.zip"))
    (tmp_path / "text.zip").write_text("hello")
    with pytest.raises(ConfigError, match="not a ZIP"):
        ImageZip(path=str(tmp_path / "text.zip"))
    with pytest.raises(ConfigError, match="needs data.path"):
        ImageZip()
    part = edm_zip(tmp_path / "part.zip", grey, [0, 1, 2])
    with zipfile.ZipFile(part, "a") as zf:  # a fourth image the labels do not cover
        buffer = io.BytesIO()
        Image.fromarray(grey[0]).save(buffer, format="png")
        zf.writestr(member_name(3), buffer.getvalue())
    with pytest.raises(ConfigError, match="1 image.* no label in dataset.json, e.g. 00000/img00000003.png"):
        ImageZip(path=str(part))
    with zipfile.ZipFile(tmp_path / "vec.zip", "w") as zf:
        buffer = io.BytesIO()
        Image.fromarray(grey[0]).save(buffer, format="png")
        zf.writestr(member_name(0), buffer.getvalue())
        zf.writestr("dataset.json", json.dumps({"labels": [[member_name(0), [0.5, 0.5]]]}))
    with pytest.raises(ConfigError, match="integer classes"):
        ImageZip(path=str(tmp_path / "vec.zip"))
    mixed = edm_zip(tmp_path / "mixed.zip", grey)
    with zipfile.ZipFile(mixed, "a") as zf:
        buffer = io.BytesIO()
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(buffer, format="png")
        zf.writestr(member_name(3), buffer.getvalue())
    with pytest.raises(ConfigError, match="one size"):
        ImageZip(path=str(mixed)).verify()


def test_cifar10_batches_are_read_without_running_code(tmp_path):
    """CIFAR-10's python batches, written here in their format (a dict of a uint8 (N, 3072) array and a
    label list): the archive holds image i = row i in channel-major order; a batch that asks for any other
    global is refused."""
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows, labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        lab = [int(v) for v in rng.integers(0, 10, 2)]
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": data, b"labels": lab}, protocol=2))
        rows.append(data)
        labels += lab
    result = dataset_main([f"source={tmp_path / 'cifar'}", f"dest={tmp_path / 'c.zip'}"])
    assert result["images"] == 10 and result["resolution"] == 32 and result["channels"] == 3
    x, got = ImageZip(path=str(tmp_path / "c.zip"))._load()
    want = torch.from_numpy(np.concatenate(rows).reshape(-1, 3, 32, 32)).float() / 127.5 - 1
    assert torch.equal(x, want) and got.tolist() == labels

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(ConfigError, match="system"):
        dataset_main([f"source={tmp_path / 'cifar'}", f"dest={tmp_path / 'd.zip'}"])


@pytest.mark.slow
def test_a_leaderboard_suite_runs_from_a_zip(tmp_path, monkeypatch):
    """The digits written as an EDM archive (class folders -> genflow-dataset), then a suite trained and
    scored from that one file."""
    from sklearn.datasets import load_digits

    from genflow.apps.leaderboard import run

    digits = load_digits()
    for i in range(400):
        path = tmp_path / "digits" / str(digits.target[i]) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(digits.images[i] / 16 * 255).astype(np.uint8), "L").save(path)
    archive = tmp_path / "digits-8x8.zip"
    dataset_main([f"source={tmp_path / 'digits'}", f"dest={archive}"])
    suite = tmp_path / "configs" / "suite" / "fromzip.yaml"
    suite.parent.mkdir(parents=True)
    suite.write_text(
        "name: fromzip\n"
        "fid: {num: 40, seed_sets: 1, batch_size: 40, extractor: digits, ref: train}\n"
        f"overrides: [trainer=cpu, net=unet_tiny, data.path={archive}, data.batch_size=16, sample.num=4,"
        " sample.steps=2, trainer.enable_progress_bar=false]\n"
        "entries:\n"
        "  - {name: edm-zip, method: edm, dataset: zip, steps: 3, budget: {steps: 3}}\n")
    monkeypatch.setenv("GENFLOW_METRICS_HOME", str(tmp_path / "metrics"))
    monkeypatch.chdir(tmp_path)
    result = run([f"hydra.searchpath=[file://{tmp_path / 'configs'}]", "suite=fromzip", f"out={tmp_path / 'lb'}",
                  f"history={tmp_path / 'history.jsonl'}"])
    row = json.loads((tmp_path / "lb" / "leaderboard.json").read_text())["rows"][0]
    assert result["entries"] == 1 and row["dataset"] == "digits-8x8" and row["images"] == 40
    assert np.isfinite(row["fid"]) and row["fid"] > 0
    stored = torch.load(row["checkpoint"], map_location="cpu", weights_only=True)["hyper_parameters"]["config"]
    assert stored["data"]["path"] == str(archive) and stored["data"]["_target_"].endswith("ImageZip")


EDM_READER = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from training.dataset import ImageFolderDataset
ds = ImageFolderDataset(path=sys.argv[2], use_labels=True)
images = np.stack([ds[i][0] for i in range(len(ds))])
labels = np.stack([ds[i][1] for i in range(len(ds))])
np.savez(sys.argv[3], images=images, labels=labels)
"""


@pytest.mark.skipif(not EDM_DIR, reason="set EDM_DIR to a checkout of NVlabs/edm to compare with its dataset tool")
def test_edms_tool_and_reader_agree_with_ours(folder, tmp_path):
    source, _ = folder
    theirs, ours = tmp_path / "edm.zip", tmp_path / "ours.zip"
    done = subprocess.run([sys.executable, str(Path(EDM_DIR) / "dataset_tool.py"), f"--source={source}",
                           f"--dest={theirs}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    dataset_main([f"source={source}", f"dest={ours}"])
    with zipfile.ZipFile(theirs) as a, zipfile.ZipFile(ours) as b:
        assert sorted(a.namelist()) == sorted(b.namelist())
        assert json.loads(a.read("dataset.json")) == json.loads(b.read("dataset.json"))
        for name in a.namelist():
            if name.endswith(".png"):
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(a.read(name)))),
                                      np.asarray(Image.open(io.BytesIO(b.read(name))))), name
    # our reader on EDM's archive, EDM's reader on ours
    x, labels = ImageZip(path=str(theirs))._load()
    read = subprocess.run([sys.executable, "-c", EDM_READER, EDM_DIR, str(ours), str(tmp_path / "edm_read.npz")],
                          capture_output=True, text=True)
    assert read.returncode == 0, read.stderr[-2000:]
    edm = np.load(tmp_path / "edm_read.npz")
    assert torch.equal(x, torch.from_numpy(edm["images"]).float() / 127.5 - 1)
    assert labels.tolist() == edm["labels"].argmax(1).tolist()  # EDM gives one-hot vectors


def test_the_tool_is_a_command_with_help(cli, tmp_path):
    code, out, err = cli("genflow.apps.dataset", "--help")
    assert code == 0 and "source=PATH dest=NAME.zip" in out
    code, out, err = cli("genflow.apps.dataset", f"source={tmp_path / 'none'}", f"dest={tmp_path / 'x.zip'}")
    assert code == 2 and "is not a folder" in err and "fix:" in err and "Traceback" not in err
    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["genflow-dataset"] == "genflow.apps.dataset:cli"


def test_the_tool_stops_refuses_unwritable_and_full_destinations_and_never_replaces(folder, tmp_path, cli,
                                                                                     monkeypatch):
    """Ctrl-C while the archive is written: one line, exit 130, no file. A folder that cannot be written: exit 2
    before the source is read. A disk that fills while writing: error / why / fix naming dest, nothing left. An
    existing dest is refused and kept byte for byte."""
    import errno
    import os

    import genflow.data.archive as archive

    source, _ = folder
    dest = tmp_path / "out" / "d.zip"
    (tmp_path / "out").mkdir()
    real_name = archive.member_name

    def tool(*args):  # without runpy's warning about running an imported module in-process
        code, _, err = cli("genflow.apps.dataset", *args)
        return code, "\n".join(line for line in err.splitlines() if "RuntimeWarning" not in line)

    def interrupted_at_the_third(index):
        if index == 2:
            raise KeyboardInterrupt
        return real_name(index)

    with monkeypatch.context() as m:
        m.setattr(archive, "member_name", interrupted_at_the_third)
        code, err = tool(f"source={source}", f"dest={dest}")
    assert code == 130 and err.strip().splitlines() == ["stopped by SIGINT while writing the archive: nothing was written (the archive "
                                     "is written whole or not at all); run the same command again"], err
    assert list((tmp_path / "out").iterdir()) == []

    real_access = os.access
    with monkeypatch.context() as m:
        m.setattr(os, "access", lambda path, mode, *a, **k: False if mode & os.W_OK and
                  Path(path).resolve() == (tmp_path / "out").resolve() else real_access(path, mode))
        m.setattr(archive, "folder_images", lambda *a, **k: pytest.fail("the source was read first"))
        code, err = tool(f"source={source}", f"dest={dest}")
    assert code == 2 and err.startswith(f"error: dest={dest} cannot be written") and "Traceback" not in err, err

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(archive.zipfile.ZipFile, "writestr", full)
        code, err = tool(f"source={source}", f"dest={dest}")
    assert code == 2 and err.startswith(f"error: could not write {dest}\n  why: the disk is full"), err
    assert list((tmp_path / "out").iterdir()) == []

    dest.write_bytes(b"someone's archive")
    code, err = tool(f"source={source}", f"dest={dest}")
    assert code == 2 and "exists" in err and dest.read_bytes() == b"someone's archive", err
