"""Adapters that turn a model plus fixed inputs into a triangular system for the solvers.

This package is the only bridge between `ffsolve.models` and `ffsolve.solvers`.
"""

from ffsolve.problems.base import (
    FunctionProblem,
    LinearRecurrence,
    LinearRecurrenceProblem,
    Problem,
)
from ffsolve.problems.recurrence import RecurrenceAdjoint, RecurrenceForward

__all__ = [
    "FunctionProblem",
    "LinearRecurrence",
    "LinearRecurrenceProblem",
    "Problem",
    "RecurrenceAdjoint",
    "RecurrenceForward",
]
