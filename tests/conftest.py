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
