"""Plain nn.Modules with no solver logic."""

from ffsolve.models.causal import CausalMLP, CausalMLPConfig

__all__ = ["CausalMLP", "CausalMLPConfig"]
