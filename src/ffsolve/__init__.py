"""ffsolve: exact parallel solving of sequential neural computation.

    sol = ffsolve.solve(fn, x0, method="jacobi")                          # == "sequential"
    hs, info = ffsolve.backprop_through(cell, h0, xs, method="scan")       # BPTT in parallel

Users import from three places: `ffsolve` (this module: solve, Stopping, Solution, METHODS,
backprop_through, the errors), `ffsolve.problems` (every problem class) and `ffsolve.models`
(every model and its loader).
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
    Stopping,
    Verification,
    VerificationWarning,
    get_solver,
    linear_scan,
    solve,
    verify,
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
    "Stopping",
    "Verification",
    "VerificationWarning",
    "backprop_through",
    "get_solver",
    "linear_scan",
    "solve",
    "verify",
]
