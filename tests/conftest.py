import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Property tests: bounded and derandomized by default (CI); HYPOTHESIS_PROFILE=thorough runs
# many more random examples.
try:
    import os

    from hypothesis import HealthCheck, settings

    _common = dict(
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    settings.register_profile("ci", max_examples=25, derandomize=True, **_common)
    settings.register_profile("thorough", max_examples=500, **_common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a dev extra; its tests skip without it
    pass


class EagerGraph:
    """Stands in for torch.cuda.CUDAGraph: replay() runs the captured body eagerly."""

    def __init__(self, body, n):
        self.body, self.n, self.replays = body, n, 0

    def replay(self):
        self.replays += 1
        for _ in range(self.n):
            self.body()


@pytest.fixture
def fake_graphs(monkeypatch):
    """Make capture=True run on the CPU with eager replays of the same recorded work (the
    warm-up is real work, as on the GPU); "auto" stays eager on the CPU. Returns the list of
    fake graphs made."""
    import ffsolve.backprop
    import ffsolve.graphs
    import ffsolve.solvers.loop

    made = []

    def capture(body, times=1, warmup=None):
        for _ in range(times if warmup is None else warmup):
            body()
        graph = EagerGraph(body, times)
        made.append(graph)
        return graph

    def captures(stopping, device, **kw):
        return stopping.capture is True

    monkeypatch.setattr(ffsolve.graphs, "capture", capture)
    monkeypatch.setattr(ffsolve.solvers.loop, "captures", captures)
    monkeypatch.setattr(ffsolve.backprop, "captures", captures)
    return made


@pytest.fixture
def diffusers_log():
    """What diffusers' model code logs (its loggers print to the stderr of import time, past
    pytest's capture: a handler on the logger sees each message it lets through)."""
    import logging

    records: list = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("diffusers.models.modeling_utils")
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)
