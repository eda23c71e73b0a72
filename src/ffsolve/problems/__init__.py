"""Adapters that turn a model plus fixed inputs into a triangular system for the solvers.

This package is the only bridge between `ffsolve.models` and `ffsolve.solvers`; every
problem class is importable from here. The protocol (what a problem must and may offer) is
documented in `ffsolve.problems.base`.
"""

from ffsolve.problems.base import (
    FunctionProblem,
    LinearRecurrence,
    LinearRecurrenceProblem,
    Problem,
)
from ffsolve.problems.densenet import DenseNetLayers
from ffsolve.problems.diffusion import DiffusionSampling, diffusion_noise
from ffsolve.problems.lm import LMDecoding, lm_gumbel
from ffsolve.problems.made import MADESampling, logistic_noise
from ffsolve.problems.pixelcnn import PixelCNNSampling, pixelcnn_noise
from ffsolve.problems.recurrence import RecurrenceAdjoint, RecurrenceForward
from ffsolve.problems.sharded import Sharded

__all__ = [
    "DenseNetLayers",
    "DiffusionSampling",
    "FunctionProblem",
    "LMDecoding",
    "LinearRecurrence",
    "LinearRecurrenceProblem",
    "MADESampling",
    "PixelCNNSampling",
    "Problem",
    "RecurrenceAdjoint",
    "RecurrenceForward",
    "Sharded",
    "diffusion_noise",
    "lm_gumbel",
    "logistic_noise",
    "pixelcnn_noise",
]
