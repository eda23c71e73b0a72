import pytest
import torch

import ffsolve
import ffsolve.problems
from systems import chain, dense


def test_unknown_method_lists_valid():
    with pytest.raises(ValueError, match="sequential, jacobi, jacobi_gs, gs_jacobi"):
        ffsolve.solve(chain, torch.zeros(1, 5), method="newton_raphson")


def test_unknown_option_is_type_error():
    with pytest.raises(TypeError, match="does not take window"):
        ffsolve.solve(chain, torch.zeros(1, 5), method="jacobi_gs", window=3)
    with pytest.raises(TypeError, match="does not take block_size"):
        ffsolve.solve(chain, torch.zeros(1, 5), method="jacobi", block_size=3)
    with pytest.raises(TypeError, match="solver object"):
        ffsolve.solve(chain, torch.zeros(1, 5), method=ffsolve.get_solver("jacobi"), window=2)


@pytest.mark.parametrize("method", ["sequential", "jacobi", "jacobi_gs", "gs_jacobi"])
def test_nan_names_iteration_and_position(method):
    def fn(x):
        out = chain(x)
        out[:, 7] = out[:, 7] + torch.where(x[:, 6] > 0.9, float("nan"), 0.0)
        return out

    x0 = torch.zeros(2, 12, dtype=torch.float64)
    with pytest.raises(ffsolve.NonFiniteError, match="position 7"):
        ffsolve.solve(fn, x0, method=method)
    if method == "jacobi":
        with pytest.raises(ffsolve.NonFiniteError, match="iteration"):
            ffsolve.solve(fn, x0, method=method, check_every=4)


def test_inf_detected():
    x0 = torch.zeros(1, 6, dtype=torch.float64)
    with pytest.raises(ffsolve.NonFiniteError, match="iteration 1, position 0"):
        ffsolve.solve(lambda x: x + float("inf"), x0, method="jacobi")


def test_shape_and_dtype_changes():
    x0 = torch.zeros(2, 6)
    with pytest.raises(ValueError, match="changed the shape"):
        ffsolve.solve(lambda x: x[:, :3], x0)
    with pytest.raises(ValueError, match="changed the dtype"):
        ffsolve.solve(lambda x: x.double(), x0)
    with pytest.raises(TypeError, match="return a tensor"):
        ffsolve.solve(lambda x: 3, x0)


def test_bad_dim_and_inputs():
    with pytest.raises(ValueError, match="dim=3 is out of range"):
        ffsolve.solve(chain, torch.zeros(2, 6), dim=3)
    with pytest.raises(TypeError, match="floating"):
        ffsolve.solve(chain, torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(TypeError, match="x0 is required"):
        ffsolve.solve(chain)
    with pytest.raises(TypeError, match="callable"):
        ffsolve.solve(3, torch.zeros(2, 6))


def test_bad_blocks():
    x0 = torch.zeros(2, 6)
    for method in ("jacobi_gs", "gs_jacobi"):
        with pytest.raises(ValueError, match="between 1 and the length 6"):
            ffsolve.solve(chain, x0, method=method, block_size=0)
        with pytest.raises(ValueError, match="between 1 and the length 6"):
            ffsolve.solve(chain, x0, method=method, block_size=7)
    with pytest.raises(ValueError, match="not both"):
        ffsolve.solve(chain, x0, method="gs_jacobi", block_size=2, window=3)
    with pytest.raises(ValueError, match="window must be >= 1"):
        ffsolve.solve(chain, x0, method="gs_jacobi", window=0)


def test_bad_loop_options():
    x0 = torch.zeros(2, 6)
    with pytest.raises(ValueError, match="max_iters"):
        ffsolve.solve(chain, x0, max_iters=0)
    with pytest.raises(ValueError, match="atol"):
        ffsolve.solve(chain, x0, atol=-1.0)
    with pytest.raises(ValueError, match="check_every"):
        ffsolve.solve(chain, x0, check_every=0)
    with pytest.raises(TypeError, match="max_iters must be an int"):
        ffsolve.solve(chain, x0, max_iters=2.5)
    with pytest.raises(ValueError, match="exactly T=6 steps"):
        ffsolve.solve(chain, x0, method="sequential", max_iters=3)


def test_model_is_causal():
    model = dense(T=10, C=2)
    x = torch.randn(1, 10, 2, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(model, x).reshape(10, 2, 10, 2)
    for t in range(10):
        assert torch.all(jac[t, :, t:, :] == 0)
    assert jac[5, :, :5, :].abs().sum() > 0


def test_a_stopping_field_given_twice_is_refused():
    """solve(stopping=Stopping(atol=a), atol=b) let the keyword win silently; now it names
    the field. A keyword for another field, or the same value twice, still combines."""
    x0 = torch.zeros(1, 6, dtype=torch.float64)

    def fn(x):
        return torch.tanh(torch.cumsum(x, 1) - x + 1)

    with pytest.raises(TypeError, match=r"atol=0\.1 vs 0\.2"):
        ffsolve.solve(fn, x0, stopping=ffsolve.Stopping(atol=0.1), atol=0.2)
    with pytest.raises(TypeError, match="given twice"):
        ffsolve.get_solver("jacobi").solve(
            ffsolve.problems.FunctionProblem(fn, x0), ffsolve.Stopping(max_iters=3), max_iters=4
        )
    sol = ffsolve.solve(fn, x0, stopping=ffsolve.Stopping(atol=0.1), atol=0.1, record=False)
    assert sol.residuals is None and sol.all_converged
    assert ffsolve.Stopping(atol=0.1).replace(atol=0.2).atol == 0.2  # replace changes a field
