"""A character-level GRU language model: one-hot characters -> nn.GRU -> a linear readout.

Small enough to train on a CPU in minutes; its recurrent cell is what `rnn-forward` solves
by every method (`CharGRU.cell()` gives an `nn.GRUCell` with the same weights).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ffsolve.checkpoint import load_checkpoint, save_checkpoint
from ffsolve.config import Config, spec
from ffsolve.errors import CheckpointError

__all__ = ["CHECKPOINT_KIND", "CharGRU", "CharGRUConfig", "load_char_gru", "save_char_gru"]

CHECKPOINT_KIND = "gru-char"


@dataclass(frozen=True)
class CharGRUConfig(Config):
    """Sizes of `CharGRU`.

    Attributes:
        vocab: number of symbols (the one-hot input size and the readout's outputs).
        hidden: units of the GRU's state h_t.
    """

    vocab: int = spec(98, ge=2)
    hidden: int = spec(64, ge=1)


class CharGRU(nn.Module):
    """h_t = GRU(h_{t-1}, onehot(c_t)), logits of c_{t+1} = W h_t + b.

    Example:
        >>> m = CharGRU(CharGRUConfig(vocab=98, hidden=64))
        >>> logits, h = m(torch.randint(98, (4, 100)))    # (4, 100, 98), (1, 4, 64)
    """

    def __init__(self, config: CharGRUConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or CharGRUConfig()
        self.gru = nn.GRU(config.vocab, config.hidden, batch_first=True)
        self.readout = nn.Linear(config.hidden, config.vocab)

    def one_hot(self, ids: Tensor) -> Tensor:
        """(B, T) int64 symbol ids -> (B, T, vocab) one-hot inputs in the weights' dtype."""
        return F.one_hot(ids, self.config.vocab).to(self.readout.weight.dtype)

    def forward(self, ids: Tensor, h: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, T) ids, optional (1, B, H) state -> (B, T, vocab) logits, (1, B, H) last state."""
        hs, h = self.gru(self.one_hot(ids), h)  # (B, T, H), (1, B, H)
        return self.readout(hs), h

    def cell(self) -> nn.GRUCell:
        """An `nn.GRUCell` (vocab -> hidden) holding copies of the GRU's weights."""
        cell = nn.GRUCell(self.config.vocab, self.config.hidden)
        cell = cell.to(device=self.readout.weight.device, dtype=self.readout.weight.dtype)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, name).copy_(getattr(self.gru, f"{name}_l0"))
        return cell


def save_char_gru(
    path: str | Path, model: CharGRU, heldout: Tensor, extra: dict[str, Any] | None = None
) -> Path:
    """Save the weights and `heldout` (1-D symbol ids of held-out text, stored as uint8 when
    the vocabulary allows) as a "gru-char" checkpoint; `extra` goes to the sidecar."""
    tensors = dict(model.state_dict())
    dtype = torch.uint8 if model.config.vocab <= 256 else torch.int32
    tensors["heldout"] = heldout.detach().to("cpu", dtype)
    config = dataclasses.asdict(model.config)
    return save_checkpoint(path, CHECKPOINT_KIND, tensors, config, extra)


def load_char_gru(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[CharGRU, Tensor, dict[str, Any]]:
    """Load a "gru-char" checkpoint; returns (model in eval mode, held-out ids (N,) int64,
    metadata with 'config', 'vocab_chars' and the training's validation bits per char)."""
    tensors, meta = load_checkpoint(path, CHECKPOINT_KIND, device="cpu")
    try:
        heldout = tensors.pop("heldout").long()
        model = CharGRU(CharGRUConfig(**meta["config"]))
        model.load_state_dict(tensors, strict=True)
    except (TypeError, KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path} does not match its gru-char config: {e}") from None
    if heldout.ndim != 1 or len(heldout) == 0 or int(heldout.max()) >= model.config.vocab:
        raise CheckpointError(f"{path}: held-out text is empty or outside the vocabulary")
    return model.to(device).eval(), heldout.to(device), meta
