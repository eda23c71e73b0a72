"""Plain nn.Modules with no solver logic."""

from ffsolve.models.causal import CausalMLP, CausalMLPConfig
from ffsolve.models.made import MADE, MADEConfig, load_made, save_made
from ffsolve.models.rnn import VanillaRNN, VanillaRNNConfig

__all__ = [
    "MADE",
    "CausalMLP",
    "CausalMLPConfig",
    "MADEConfig",
    "VanillaRNN",
    "VanillaRNNConfig",
    "load_made",
    "save_made",
]
