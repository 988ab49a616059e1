"""Write a data set in EDM's archive format (``genflow.data.archive``): one uncompressed ZIP of PNGs with
``dataset.json`` labels, which ``data=zip data.path=...`` (and EDM's and EDM2's training code) read.

    python -m genflow.apps.dataset source=PATH dest=NAME.zip [resolution=N] [max_images=N] [progress=true]
    genflow-dataset source=/data/cifar10 dest=cifar10-32x32.zip

source: an image folder (read recursively, ordered by path; classes from the top-level folder names when
there are two or more), or CIFAR-10's training split (a folder holding ``cifar-10-batches-py``, or that
folder itself). resolution: centre-crop every image to a square and resize it (Lanczos) to N, a power of
two; without it the images must already be square, a power of two wide, and all alike. dest is written
atomically and never replaces an existing file. Ends with one JSON line (dest, images, resolution,
channels, labelled, classes).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from genflow.config import Bool, Int, Str, plain_app, run_plain
from genflow.data.archive import cifar10_images, folder_images, write_archive
from genflow.errors import config_error
from genflow.outputs import check_writable
from genflow.progress import Phase

USAGE = "usage: python -m genflow.apps.dataset source=PATH dest=NAME.zip [resolution=N] [max_images=N] [progress=true]"
DATASET_SCHEMA = {"source": Str(null=True), "dest": Str(null=True), "resolution": Int(1, null=True),
                  "max_images": Int(1, null=True), "progress": Bool(null=True)}


def main(argv: Sequence[str]) -> dict:
    args, _ = plain_app("dataset", argv, __doc__.split("\n\n")[0] + "\n\n    " + USAGE, schema=DATASET_SCHEMA)
    for key in ("source", "dest"):
        if not args[key]:
            raise config_error(f"no {key}= given", "the tool reads a source and writes one archive", USAGE)
    source, dest = Path(args["source"]).expanduser(), Path(args["dest"]).expanduser()
    if dest.suffix.lower() != ".zip":
        raise config_error(f"dest={dest}", "the archive is a ZIP file", f"use dest={dest.with_suffix('.zip')}")
    if dest.exists():
        raise config_error(f"dest={dest} exists", "genflow never overwrites a data set",
                           "choose another dest=, or remove the old archive first")
    check_writable(dest, "dest")  # before the source is read
    if not source.is_dir():
        raise config_error(f"source={source} is not a folder",
                           "the source is an image folder or the folder holding CIFAR-10's cifar-10-batches-py",
                           "pass source=/path/to/images or source=/path/to/cifar10")
    resolution, max_images = args.resolution, args.max_images
    if resolution is not None and resolution & (resolution - 1):
        raise config_error(f"resolution={resolution}", "EDM's archives hold square images a power of two wide",
                           f"use e.g. resolution={1 << (resolution.bit_length() - 1)}")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    if (source / "cifar-10-batches-py").is_dir() or source.name == "cifar-10-batches-py":
        root = source.parent if source.name == "cifar-10-batches-py" else source
        if resolution is not None and resolution != 32:
            raise config_error(f"resolution={resolution} for CIFAR-10", "EDM's CIFAR-10 archive keeps the 32x32 images",
                               "drop resolution=")
        count, images = cifar10_images(root, max_images)
    else:
        count, images = folder_images(source, resolution, max_images)
    result = {"source": str(source.absolute()), **write_archive(dest, images, count, progress=progress)}
    print(json.dumps(result), flush=True)
    return result


def cli() -> None:
    """The ``genflow-dataset`` console script and ``python -m genflow.apps.dataset``."""
    run_plain(main, sys.argv[1:], phase=Phase("writing the archive", "nothing was written (the archive is written "
                                                 "whole or not at all)"))


if __name__ == "__main__":
    cli()
