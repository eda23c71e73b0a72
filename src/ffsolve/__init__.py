"""ffsolve: exact parallel solving of sequential neural computation.

sol = ffsolve.solve(fn, x0, method="jacobi")
"""

from ffsolve.problems import FunctionProblem, Problem
from ffsolve.solvers import (
    METHODS,
    ConvergenceError,
    ConvergenceWarning,
    NonFiniteError,
    Solution,
    Solver,
    get_solver,
    solve,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "ConvergenceError",
    "ConvergenceWarning",
    "FunctionProblem",
    "NonFiniteError",
    "Problem",
    "Solution",
    "Solver",
    "get_solver",
    "solve",
]
