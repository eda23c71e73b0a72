"""ffsolve: exact parallel solving of sequential neural computation.

sol = ffsolve.solve(fn, x0, method="jacobi")
hs, info = ffsolve.backprop_through(cell, h0, xs, method="jacobi")   # BPTT by Jacobi
"""

from ffsolve.backprop import BackpropInfo, backprop_through
from ffsolve.problems import (
    FunctionProblem,
    LinearRecurrenceProblem,
    Problem,
    RecurrenceAdjoint,
    RecurrenceForward,
)
from ffsolve.solvers import (
    METHODS,
    ConvergenceError,
    ConvergenceWarning,
    DivergenceWarning,
    NonFiniteError,
    Solution,
    Solver,
    get_solver,
    linear_scan,
    solve,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "BackpropInfo",
    "ConvergenceError",
    "ConvergenceWarning",
    "DivergenceWarning",
    "FunctionProblem",
    "LinearRecurrenceProblem",
    "NonFiniteError",
    "Problem",
    "RecurrenceAdjoint",
    "RecurrenceForward",
    "Solution",
    "Solver",
    "backprop_through",
    "get_solver",
    "linear_scan",
    "solve",
]
