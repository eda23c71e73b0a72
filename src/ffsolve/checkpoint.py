"""Checkpoints: tensors in safetensors plus a JSON sidecar (format version, kind, config,
checksum). Loading never unpickles; a wrong or corrupted file is a CheckpointError."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ffsolve.errors import CheckpointError

__all__ = ["FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "checkpoint_paths"]

FORMAT_VERSION = 1


# The repository root of a source checkout (src/ffsolve/checkpoint.py -> ../../..), where the
# shipped checkpoints live; relative checkpoint paths are also looked up there.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_checkpoint(
    path: str | Path,
    kind: str,
    tensors: dict[str, Tensor],
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `<path>.safetensors` and `<path>.json`; returns the tensors' path."""
    tpath, jpath = checkpoint_paths(path)
    tpath.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tpath))
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": config,
        "sha256": _sha256(tpath),
        **(extra or {}),
    }
    jpath.write_text(json.dumps(meta, indent=1) + "\n")
    return tpath


def load_checkpoint(
    path: str | Path, kind: str, device: torch.device | str = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint of `kind`; returns (tensors, metadata with 'config')."""
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
    if meta.get("sha256") != _sha256(tpath):
        raise CheckpointError(f"{tpath} is corrupted (checksum does not match {jpath.name})")
    try:
        tensors = load_file(str(tpath), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {tpath}: {e}") from None
    return tensors, meta
