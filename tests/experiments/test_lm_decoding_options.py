"""The lm-decoding experiment's options that need no model file."""

import pytest
import torch

from ffsolve.experiments.lm_decoding import LMDecodingConfig, _backend


def test_the_layers_compile_on_a_gpu_by_default_and_never_over_the_dynamic_cache():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _backend(LMDecodingConfig(), cuda) == "inductor"
    assert _backend(LMDecodingConfig(), cpu) is None
    assert _backend(LMDecodingConfig(compile="none"), cuda) is None
    assert _backend(LMDecodingConfig(compile="aot_eager"), cpu) == "aot_eager"
    assert _backend(LMDecodingConfig(cache="dynamic"), cuda) is None
    with pytest.raises(ValueError, match="not with cache=dynamic"):
        _backend(LMDecodingConfig(cache="dynamic", compile="inductor"), cuda)
