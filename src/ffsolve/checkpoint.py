"""Checkpoints: tensors in safetensors plus a JSON sidecar (format version, kind, config,
checksum). Loading never unpickles; a wrong or corrupted file is a CheckpointError.

Nothing is written in place. Every file goes to a temporary file in the same folder and is
moved over its name with `os.replace` (atomic on POSIX and Windows), and a checkpoint's
JSON sidecar is replaced last, after the tensors. Until the sidecar is replaced, the previous
tensors stay readable as `<stem>.safetensors.prev` and `load_checkpoint` falls back to them,
so a run killed at any point of a save leaves the previous checkpoint loadable.

Helpers shared by every trainer:

- `atomic_path(path)`: a context manager giving a temporary path next to `path`; write it,
  and it replaces `path` when the block exits without an error.
- `atomic_write_text(path, text)` / `atomic_write_bytes(path, data)`.
- `save_train_state(path, model, optimizer, scheduler, epoch, extra)` and
  `load_train_state(path, model, optimizer, scheduler)`: everything needed to resume a
  training run (model, optimizer, scheduler, epoch, torch RNG state, your `extra` dict of
  tensors, numbers, strings, lists and dicts), in one file written atomically, read back with
  `torch.load(weights_only=True)` (no arbitrary unpickling). `train_state_path(checkpoint)`
  names it: `<stem>.resume.pt` next to the checkpoint.

Example:
    >>> save_checkpoint("runs/m", "made", model.state_dict(), {"dims": 784})
    >>> save_train_state(train_state_path("runs/m"), model, opt, sched, epoch, {"g": g.get_state()})
    >>> state = load_train_state(train_state_path("runs/m"), model, opt, sched)  # state["epoch"]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ffsolve.errors import CheckpointError, ConfigError, DivergedError, FFSolveError

__all__ = [
    "FORMAT_VERSION",
    "SIDECAR_FIELDS",
    "STORAGE_DTYPES",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_sidecar",
    "check_training_output",
    "checkpoint_exists",
    "checkpoint_paths",
    "load_checkpoint",
    "load_train_state",
    "save_checkpoint",
    "save_train_state",
    "train_state_path",
]

FORMAT_VERSION = 1

#: storage_dtype -> torch dtype; floating tensors are stored in it and loaded as float32.
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Test hook: FFSOLVE_CRASH_MID_SAVE=N kills the process (os._exit(99)) during the N-th
# checkpoint save of this process, after the new tensors replaced the old ones and before the
# sidecar is replaced: the worst moment, used by the kill-mid-save test.
_CRASH_ENV = "FFSOLVE_CRASH_MID_SAVE"
_saves = 0
_UMASK = os.umask(0o022)
os.umask(_UMASK)


# The repository root of a source checkout (src/ffsolve/checkpoint.py -> ../../..), where the
# shipped checkpoints live; relative checkpoint paths are also looked up there.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


#: Sidecar fields checked wherever they appear, by every loader: dotted key -> (test,
#: what a valid value is). A loader's caller names the ones it needs (`require=`); those
#: must be there. `config` (a mapping) is always required.
SIDECAR_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "config": (lambda v: isinstance(v, dict), "a mapping of the model's settings"),
    "data": (lambda v: isinstance(v, dict), "a mapping describing the training data"),
    "data.name": (lambda v: isinstance(v, str), "a string"),
    "data.shape": (
        lambda v: (
            isinstance(v, list)
            and len(v) > 0
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in v)
        ),
        "a non-empty list of positive integers",
    ),
    "data.lam": (
        lambda v: _number(v) and 0 < v < 0.5,
        "a number in (0, 0.5), the logit transform's lambda",
    ),
    "data.mean": (_number, "a finite number"),
    "data.std": (lambda v: _number(v) and v > 0, "a positive number"),
}

_MISSING = object()


def _lookup(meta: dict[str, Any], key: str) -> Any:
    value: Any = meta
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def check_sidecar(meta: Any, where: str | Path, require: Sequence[str] = ()) -> None:
    """Check a checkpoint's sidecar once, before anything reads it.

    Every field of `SIDECAR_FIELDS` present must be valid; `config` and the fields of
    `require` (dotted keys, e.g. "data.lam") must be present.

    Raises:
        CheckpointError: naming `where` and the missing or bad key.
    """
    for key in require:
        if key not in SIDECAR_FIELDS:
            raise ValueError(f"unknown sidecar field {key!r}; known: {', '.join(SIDECAR_FIELDS)}")
    needed = {"config", *require} | {k.rsplit(".", 1)[0] for k in require if "." in k}
    for key, (valid, what) in SIDECAR_FIELDS.items():
        value = _lookup(meta, key)
        if value is _MISSING:
            if key in needed:
                raise CheckpointError(f"{where}: the sidecar has no {key!r} ({what})")
        elif not valid(value):
            raise CheckpointError(f"{where}: {key!r} must be {what}, got {value!r}")


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(tensors, sidecar) for a checkpoint named by either file or by its stem.

    A relative path that does not exist from the working directory is looked up from the
    project root, so the shipped `checkpoints/...` work from any directory.
    """
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    if not p.is_absolute() and not p.with_suffix(".json").exists():
        alt = PROJECT_ROOT / p
        if alt.with_suffix(".json").exists():
            p = alt
    return p.with_suffix(".safetensors"), p.with_suffix(".json")


def checkpoint_exists(path: str | Path) -> bool:
    """True when either file of the checkpoint `path` exists (from the working directory)."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_suffix(".json").exists() or p.with_suffix(".safetensors").exists()


def train_state_path(checkpoint: str | Path) -> Path:
    """The resume file of a checkpoint: `<stem>.resume.pt` next to it."""
    p = Path(checkpoint)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".resume.pt")


def check_training_output(path: str | Path, *, named: bool, force: bool, resume: bool) -> Path:
    """The refusals every trainer shares before it starts; returns the resume file's path.

    Args:
        path: the checkpoint a training run will write.
        named: the user named it (`save_to`): --resume needs that.
        force: overwrite an existing checkpoint (--force).
        resume: continue from the resume file next to it (--resume): it must exist.

    Raises:
        FFSolveError: nothing to resume, or a checkpoint would be overwritten silently.
    """
    state_path = train_state_path(path)
    if resume:
        if not named:
            raise FFSolveError("--resume needs save_to (the checkpoint whose training to continue)")
        if not state_path.is_file():
            raise FFSolveError(f"nothing to resume: no {state_path} (drop --resume)")
    elif checkpoint_exists(path) and not force:
        raise FFSolveError(
            f"checkpoint {path} exists; --force overwrites it, --resume continues its training"
        )
    return state_path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on success it is fsynced and moved over
    `path` with os.replace, on an error it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 (and a writer may have made the file anew): usual permissions
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        with open(tmp_path, "rb+") as f:  # the data reaches the disk before the rename
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temporary file in the same folder, os.replace)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def strict_json(obj: Any, indent: int | None = 1, default: Any = None) -> str:
    """JSON that every parser reads: NaN and infinities (which Python's json writes as bare
    `NaN`, not JSON) become null, at any depth."""

    def clean(v: Any) -> Any:
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        if isinstance(v, Tensor):
            return clean(v.tolist())
        if isinstance(v, Path):
            return str(v)
        if default is not None and not isinstance(v, str | int | bool | type(None)):
            return clean(default(v))
        return v

    return json.dumps(clean(obj), indent=indent, allow_nan=False)


def check_finite_loss(value: float, where: str) -> None:
    """Stop training at the first non-finite loss (DivergedError names where): nothing is
    saved from a diverged model, and a checkpoint already on disk is left as it is."""
    if not math.isfinite(value):
        raise DivergedError(
            f"training diverged: the loss is {value} at {where}; stopped, nothing saved "
            "(the checkpoint on disk, if any, is unchanged; try a smaller lr)"
        )


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sidecar_sha(jpath: Path) -> str | None:
    try:
        meta = json.loads(jpath.read_text())
    except (OSError, ValueError):
        return None
    return meta.get("sha256") if isinstance(meta, dict) else None


def _interrupted(tpath: Path, jpath: Path, prev: Path) -> bool:
    """True when an earlier save stopped between its tensors and its sidecar: the readable
    pair is then (sidecar, prev), and prev must be kept."""
    if not prev.is_file():
        return False
    sha = _sidecar_sha(jpath)
    return sha is not None and sha != _sha256(tpath) and sha == _sha256(prev)


def save_checkpoint(
    path: str | Path,
    kind: str,
    tensors: dict[str, Tensor],
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
    *,
    storage_dtype: str = "float32",
) -> Path:
    """Write `<path>.safetensors` and `<path>.json` atomically; returns the tensors' path.

    Args:
        path: the checkpoint's stem (or either file's name).
        kind: the model kind, checked on load ("made", "pixelcnnpp", ...).
        tensors: name -> tensor (moved to the CPU, made contiguous).
        config: the model's config as plain JSON values.
        extra: more sidecar fields (data set, test metrics, ...).
        storage_dtype: "float32", or "float16"/"bfloat16" to halve the file: floating
            tensors are rounded to it on save and loaded back as float32.
    """
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}")
    global _saves
    _saves += 1
    store = STORAGE_DTYPES[storage_dtype]
    out, packed = {}, {}
    for k, v in tensors.items():
        v = v.detach().cpu()
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise DivergedError(
                f"refusing to save {path}: tensor {k!r} holds NaN or Inf (training diverged?); "
                "the checkpoint on disk, if any, is unchanged"
            )
        if v.dtype == torch.bool:  # masks: 8 per byte (safetensors spends a byte on each)
            out[k], packed[k] = _pack_bool(v), list(v.shape)
        else:
            out[k] = (v.to(store) if v.is_floating_point() else v).contiguous()
    p = Path(path)  # written where asked (no lookup in the project root, unlike loading)
    p = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    tpath, jpath = p.with_suffix(".safetensors"), p.with_suffix(".json")
    with atomic_path(tpath.with_name(tpath.name + ".new")) as tmp:
        save_file(out, str(tmp))
    new = tpath.with_name(tpath.name + ".new")
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": config,
        "sha256": _sha256(new),
        "storage_dtype": storage_dtype,
        "packed_bool": packed,
        **(extra or {}),
    }
    prev = tpath.with_name(tpath.name + ".prev")
    if tpath.exists() and jpath.exists() and not _interrupted(tpath, jpath, prev):
        # keep the old pair readable until the sidecar moves
        with contextlib.suppress(FileNotFoundError):
            prev.unlink()
        try:
            os.link(tpath, prev)
        except OSError:
            with atomic_path(prev) as tmp:
                tmp.write_bytes(tpath.read_bytes())
    os.replace(new, tpath)
    if os.environ.get(_CRASH_ENV) == str(_saves):
        os._exit(99)
    atomic_write_text(jpath, strict_json(meta) + "\n")
    with contextlib.suppress(FileNotFoundError):
        prev.unlink()
    return tpath


def load_checkpoint(
    path: str | Path,
    kind: str,
    device: torch.device | str = "cpu",
    *,
    require: Sequence[str] = (),
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint of `kind`; returns (tensors, metadata with 'config').

    Tensors stored in half precision (`storage_dtype` in the sidecar) come back as float32.
    The sidecar is checked by `check_sidecar` (`config`, and the fields of `require`, e.g.
    ("data.lam", "data.shape"), must be there; every known field must be valid).
    """
    tpath, jpath = checkpoint_paths(path)
    for p in (tpath, jpath):
        if not p.is_file():
            raise CheckpointError(f"checkpoint file missing: {p}")
    try:
        meta = json.loads(jpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint metadata {jpath} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise CheckpointError(f"{jpath} is not an ffsolve checkpoint (no format_version)")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{jpath} has format version {meta['format_version']}, this ffsolve reads "
            f"{FORMAT_VERSION}"
        )
    if meta.get("kind") != kind:
        raise CheckpointError(f"{jpath} holds a {meta.get('kind')!r} model, expected {kind!r}")
    check_sidecar(meta, jpath, require)
    if meta.get("sha256") != _sha256(tpath):
        # a save interrupted after its tensors moved: the old tensors are kept beside
        prev = tpath.with_name(tpath.name + ".prev")
        if not (prev.is_file() and meta.get("sha256") == _sha256(prev)):
            raise CheckpointError(f"{tpath} is corrupted (checksum does not match {jpath.name})")
        tpath = prev
    storage = meta.get("storage_dtype", "float32")
    if storage not in STORAGE_DTYPES:
        raise CheckpointError(f"{jpath}: unknown storage_dtype {storage!r}")
    try:
        tensors = load_file(str(tpath), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {tpath}: {e}") from None
    if storage != "float32":
        tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    try:
        for k, shape in (meta.get("packed_bool") or {}).items():
            tensors[k] = _unpack_bool(tensors[k], shape)
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{jpath}: packed masks do not match the tensors: {e}") from None
    return tensors, meta


def _pack_bool(v: Tensor) -> Tensor:
    """A bool tensor -> uint8, 8 values per byte, most significant bit first (numpy's
    packbits order); the shape is kept in the sidecar."""
    flat = v.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).reshape(-1, 8)  # (n/8, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (flat * weights).sum(1, dtype=torch.uint8)


def _unpack_bool(packed: Tensor, shape: list[int]) -> Tensor:
    n = math.prod(shape)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1  # (n/8, 8)
    return bits.reshape(-1)[:n].to(torch.bool).reshape(shape)


def save_train_state(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    epoch: int,
    extra: dict[str, Any] | None = None,
    *,
    config: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> Path:
    """Save what resuming needs, atomically, to `path` (see `train_state_path`).

    Args:
        path: the resume file.
        model, optimizer, scheduler: their state_dicts are saved (scheduler may be None).
        epoch: the number of epochs completed.
        extra: tensors, numbers, strings, lists and dicts (e.g. the history so far); no other
            objects (loading refuses arbitrary pickles).
        config: the training settings a resumed run must share (`load_train_state` checks).
        generator: the data generator, restored by `load_train_state(..., generator=)`.
    """
    extra = dict(extra or {})
    if config is not None:
        extra["config"] = config
    if generator is not None:
        extra["generator"] = generator.get_state()
    state = {
        "format_version": FORMAT_VERSION,
        "epoch": int(epoch),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": _cuda_rng(model),
        "extra": extra,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_train_state(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    config: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and torch's RNGs from `path` (in place).

    Args:
        config: when given, the training settings a resumed run must share with the saved
            one (`save_train_state(..., config=)`); a difference is a ConfigError naming the
            fields.
        generator: when given, restored to the state saved with `save_train_state(...,
            generator=)`.

    Returns:
        {"epoch": epochs completed, "extra": the saved extra dict}.

    Raises:
        CheckpointError: the file is missing, unreadable, or does not fit the model.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no resume state {p} (nothing to resume; drop --resume)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad or foreign file
        raise CheckpointError(f"cannot read resume state {p}: {e}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{p} is not an ffsolve resume state of format {FORMAT_VERSION}")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{p} does not fit this model or optimizer: {e}") from None
    extra = state["extra"]
    if config is not None and extra.get("config") != config:
        theirs = extra.get("config") or {}
        diff = sorted(k for k in {*config, *theirs} if theirs.get(k) != config.get(k))
        raise ConfigError(f"{p} was made with other values of: {', '.join(diff)}")
    if generator is not None:
        if "generator" not in extra:
            raise CheckpointError(f"{p} holds no data generator state")
        generator.set_state(extra["generator"].cpu())
    torch.set_rng_state(state["torch_rng"].cpu())
    device = _device_of(model)
    if state.get("cuda_rng") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)  # dropout on the GPU
    return {"epoch": int(state["epoch"]), "extra": extra}


def _device_of(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _cuda_rng(model: torch.nn.Module) -> Tensor | None:
    device = _device_of(model)
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None
