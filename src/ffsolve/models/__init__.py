"""Plain nn.Modules with no solver logic."""

from ffsolve.models.causal import CausalMLP, CausalMLPConfig
from ffsolve.models.rnn import VanillaRNN, VanillaRNNConfig

__all__ = ["CausalMLP", "CausalMLPConfig", "VanillaRNN", "VanillaRNNConfig"]
