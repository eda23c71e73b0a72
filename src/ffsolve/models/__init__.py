"""Plain nn.Modules with no solver logic, and their checkpoint loaders."""

from ffsolve.models.causal import CausalMLP, CausalMLPConfig
from ffsolve.models.char_gru import CharGRU, CharGRUConfig, load_char_gru, save_char_gru
from ffsolve.models.densenet import (
    DenseNet,
    DenseNetConfig,
    densenet_bc,
    densenet_config,
    load_densenet,
    save_densenet,
)
from ffsolve.models.made import MADE, MADEConfig, load_made, save_made
from ffsolve.models.pixelcnnpp import (
    PixelCNNpp,
    PixelCNNppConfig,
    load_pixelcnnpp,
    save_pixelcnnpp,
)
from ffsolve.models.rnn import VanillaRNN, VanillaRNNConfig

__all__ = [
    "MADE",
    "CausalMLP",
    "CausalMLPConfig",
    "CharGRU",
    "CharGRUConfig",
    "DenseNet",
    "DenseNetConfig",
    "MADEConfig",
    "PixelCNNpp",
    "PixelCNNppConfig",
    "VanillaRNN",
    "VanillaRNNConfig",
    "densenet_bc",
    "densenet_config",
    "load_char_gru",
    "load_densenet",
    "load_made",
    "load_pixelcnnpp",
    "save_char_gru",
    "save_densenet",
    "save_made",
    "save_pixelcnnpp",
]
