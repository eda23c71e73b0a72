"""Progress bars for long loops (training epochs and batches, experiment repeats, methods).

One function, `track`, wraps an iterable in a tqdm bar with rate and time left. Bars are
drawn on stderr only when both stdout and stderr are terminals and `--quiet` (or
`set_quiet(True)`) is off. When output goes to a log or a pipe instead, an outer loop
(`lines=True`: epochs, repeats, cases) writes one line per finished unit with its time to
stderr, so a long run is never silent; inner loops (batches) write nothing. Never wrap the
body of a timed region: the bar's update runs between iterations, so wrap the loop *around*
timed calls.

Example:
    >>> for epoch in track(range(1, epochs + 1), desc="epochs"):
    ...     for xb in track(batches, desc=f"epoch {epoch}", leave=False):
    ...         ...
    >>> log("done")  # `write` prints without tearing an active bar
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

__all__ = ["enabled", "set_quiet", "track", "write"]

T = TypeVar("T")

_quiet = False  # set once by the command line's --quiet


def set_quiet(quiet: bool) -> None:
    """Turn every progress bar off (True) or back to the terminal default (False)."""
    global _quiet
    _quiet = bool(quiet)


def enabled() -> bool:
    """True when bars are drawn: not quiet and both stdout and stderr are terminals."""
    if _quiet:
        return False
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def track(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str | None = None,
    *,
    leave: bool = False,
    unit: str = "it",
    lines: bool = True,
) -> Iterator[T]:
    """Iterate over `iterable` with a progress bar (rate, time left) when `enabled()`.

    Args:
        iterable: what to loop over.
        total: its length when `len()` does not give it.
        desc: a short label in front of the bar.
        leave: keep the finished bar on screen (default: erase it; logs say what happened).
        unit: the name of one step ("epoch", "batch", "repeat").
        lines: off a terminal, one line per finished unit on stderr (False: inner loops).
    """
    if not enabled():
        if _quiet or not lines:
            yield from iterable
            return
        n = total if total is not None else _length(iterable)
        t0 = time.perf_counter()
        for i, item in enumerate(iterable, 1):
            yield item
            of = f"/{n}" if n is not None else ""
            label = f"{desc}: " if desc else ""
            print(f"[{label}{unit} {i}{of} done, {time.perf_counter() - t0:.1f} s]",
                  file=sys.stderr, flush=True)  # fmt: skip
        return
    bar = tqdm(iterable, total=total, desc=desc, leave=leave, unit=unit, file=sys.stderr)
    yield from bar


def _length(iterable: Iterable) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def write(message: str) -> None:
    """Print a line to stdout without breaking an active bar."""
    if enabled():
        tqdm.write(message, file=sys.stdout)
    else:
        print(message, flush=True)
