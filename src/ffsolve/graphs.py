"""CUDA graphs: capture a piece of device work once, replay it many times.

A small model's sweep costs a few tens of microseconds of GPU work and about as much again in
kernel launches from Python; a CUDA graph replays all of a captured region's kernels with one
launch. Everything in ffsolve that records and replays a graph goes through this module, and
every switch that turns it on is called `capture`:

- `capture(body, times)`: warm `body` up on a side stream, then record `times` calls of it.
- `try_capture(body, times, what)`: the same, where a recording that fails is not an error:
  the one capture policy of the library (warn once, run eagerly, record why).
- `CapturedCall(fn, *inputs)`: fn captured over static copies of its inputs; calling it copies
  fresh inputs in, replays, and returns fn's captured output (a buffer the next call reuses).
- `GraphCache`: captured objects by key, least recently used dropped, owned by whoever
  replays them (a problem's `graphs`, a module-level cache for a solver), emptied by
  `invalidate()` when what the graphs read by address has been replaced.

A captured region must have static shapes and read nothing on the host; the tensors it reads
are read by address, so inputs are updated in place (`copy_`), never rebound.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CaptureError",
    "CaptureWarning",
    "CapturedCall",
    "GraphCache",
    "capture",
    "device_can_capture",
    "try_capture",
]


class CaptureError(RuntimeError):
    """Recording a CUDA graph failed after its warm-up ran (the warm-up's work is done)."""


class CaptureWarning(RuntimeWarning):
    """A capture failed; the work runs eagerly instead (`try_capture`)."""


#: (what, reason) pairs already warned about in this process
_WARNED: set[tuple[str, str]] = set()


def device_can_capture(device: torch.device) -> bool:
    """True when work on `device` can be captured in a CUDA graph (a CUDA device, outside
    another capture)."""
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def capture(body: Callable[[], Any], times: int = 1, warmup: int | None = None) -> Any:
    """Record `times` calls of `body` in a CUDA graph; returns the graph (`.replay()`).

    `body` first runs `warmup` times (default `times`) for real on a side stream (cuBLAS
    handles, cuDNN autotuning and the allocator settle off the graph), so the work of one
    replay has already been done once when this returns.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times if warmup is None else warmup):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(times):
                body()
    except Exception as err:  # the warm-up ran: its work stands, only the recording failed
        raise CaptureError(f"{type(err).__name__}: {err}".splitlines()[0]) from err
    return graph


def try_capture(
    body: Callable[[], Any], times: int, what: str, warmup: int | None = None
) -> tuple[Any, str | None]:
    """`(capture(body, times, warmup), None)`, or `(None, why)` when the recording failed
    after the warm-up ran (the warm-up's work is done; the caller goes on eagerly). Warns
    once per process for each (what, why) with a `CaptureWarning`. An error of the warm-up
    itself is the work's own error and propagates."""
    try:
        return capture(body, times, warmup), None
    except CaptureError as err:
        why = str(err)
        if (what, why) not in _WARNED:
            _WARNED.add((what, why))
            warnings.warn(
                f"capturing {what} in a CUDA graph failed ({why}); it runs uncaptured "
                "(stats['capture_failed'] says why)",
                CaptureWarning,
                stacklevel=3,
            )
        return None, why


class CapturedCall:
    """`fn(*inputs)` captured once over static copies of its inputs.

    Calling it copies the given tensors into the static inputs, replays, and returns the
    output `fn` produced while captured: a buffer (or a structure of them) that the next call
    overwrites, so consume or clone it first.

    Example:
        >>> fast = CapturedCall(model, example)        # captured now (warm-up included)
        >>> y = fast(x).clone()                        # x: same shape and dtype as example
    """

    def __init__(self, fn: Callable[..., Any], *inputs: Tensor, warmup: int = 1) -> None:
        self.inputs = [t.detach().clone(memory_format=torch.contiguous_format) for t in inputs]
        self.output: Any = None

        def body() -> None:
            self.output = fn(*self.inputs)

        with torch.no_grad():
            self.graph = capture(body, 1, warmup=warmup)

    def __call__(self, *inputs: Tensor) -> Any:
        for static, t in zip(self.inputs, inputs, strict=True):
            static.copy_(t)
        self.graph.replay()
        return self.output


class GraphCache:
    """Captured objects by key; the least recently used is dropped once more than `size` are
    kept (its device memory goes with it). `invalidate()` drops them all, or one key."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The entry of `key`, made now by `make()` at first use."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = self._items[key] = make()
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def invalidate(self, key: Hashable | None = None) -> None:
        """Drop every entry (or the one of `key`): what they read by address was replaced."""
        if key is None:
            self._items.clear()
        else:
            self._items.pop(key, None)

    def values(self) -> list[Any]:
        return list(self._items.values())

    def __len__(self) -> int:
        return len(self._items)
