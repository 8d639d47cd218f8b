"""Reader for MNIST in its original gzipped IDX form (used by scripts that build models and studies).

MNIST: Yann LeCun and Corinna Cortes, distributed under CC BY-SA 3.0.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

FILES = {
    "train": ("train-images.idx3-ubyte.gz", "train-labels.idx1-ubyte.gz"),
    "test": ("t10k-images.idx3-ubyte.gz", "t10k-labels.idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """One IDX array (big-endian header, uint8 payload)."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic >> 8 != 0x08:
        raise ValueError(f"{path}: not an IDX file of uint8 (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: payload has {data.size} bytes, header says {dims}")
    return data.reshape(dims)


def load_mnist(directory: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of ``split`` ('train' or 'test')."""
    directory = Path(directory)
    images_name, labels_name = FILES[split]
    images = read_idx(directory / images_name)
    labels = read_idx(directory / labels_name)
    if len(images) != len(labels):
        raise ValueError(f"{directory}: {len(images)} images but {len(labels)} labels")
    return images, labels
