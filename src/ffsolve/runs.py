"""Run directories: resolved config, environment, records and figures of one run."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
import yaml

from ffsolve.checkpoint import atomic_write_text, strict_json
from ffsolve.errors import FFSolveError

__all__ = ["environment", "new_run_dir", "write_json", "read_records", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available else cpu; 'cuda' without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def _git_commit() -> str:
    """$FFSOLVE_COMMIT when set (a copy of the tree on another machine: its own .git, if any,
    may name another commit than the tree it holds), else HEAD of the source checkout
    (+dirty), else "unknown"."""
    explicit = os.environ.get("FFSOLVE_COMMIT")
    if explicit:
        return explicit
    fallback = "unknown"
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return fallback
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return fallback


def environment(device: torch.device) -> dict[str, Any]:
    """What a recorded number needs beside it: device name, torch version, date, commit."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = (
            f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        )
    return {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
    }


def new_run_dir(root: str | Path, experiment: str) -> Path:
    """runs/<experiment>/<timestamp>/, made fresh (a suffix avoids clashes).

    Race-free: the folder is claimed by mkdir without exist_ok, so of two runs started in the
    same second one gets `<timestamp>` and the other `<timestamp>-2`.
    """
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    parent = Path(root) / experiment
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"cannot make a fresh run directory under {parent}")


def write_json(path: Path, data: Any, compact: bool = False) -> None:
    """Strict JSON (non-finite numbers as null) with one key per line, or compact (records
    hold long arrays of traces); written atomically (a reader never sees half a file)."""
    indent = None if compact else 1
    atomic_write_text(path, strict_json(data, indent=indent, default=_jsonable) + "\n")


def write_yaml(path: Path, data: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def read_records(run_dir: str | Path) -> dict[str, Any]:
    """A run's records.json (or records.json.gz, as large recorded results are kept)."""
    path = Path(run_dir) / "records.json"
    packed = path.with_name("records.json.gz")
    try:
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
        elif packed.is_file():
            with gzip.open(packed, "rt", encoding="utf-8") as f:
                data = json.load(f)
        else:
            raise FileNotFoundError(f"no records.json in {run_dir} (is it a run directory?)")
    except (ValueError, OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        where = path if path.is_file() else packed
        raise FFSolveError(f"{where} is not a readable records file: {e}") from None
    if not isinstance(data, dict):
        raise FFSolveError(f"{path} holds no records (a JSON object was expected)")
    return data
