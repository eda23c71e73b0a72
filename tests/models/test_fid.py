"""The Frechet distance against closed forms, independent of scipy's version."""

import sys
import types

import numpy as np
import pytest

from ffsolve.fid import fid


def _with_moments(n: int, mean: np.ndarray, cov: np.ndarray, seed: int) -> np.ndarray:
    """n points whose sample mean and (N-1) covariance are exactly `mean` and `cov`."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # covariance I
    return z @ np.linalg.cholesky(cov).T + mean  # (n, D)


def _frechet_2x2(mu1, s1, mu2, s2) -> float:
    # for a 2x2 matrix M with non-negative eigenvalues, tr M^(1/2) = sqrt(tr M + 2 sqrt(det M))
    m = s1 @ s2
    tr_root = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr_root)


def test_fid_of_two_gaussians_matches_the_closed_form():
    # covariances that do not commute: S1 S2 is not symmetric
    mu1, s1 = np.array([0.0, 1.0]), np.array([[2.0, 0.6], [0.6, 1.0]])
    mu2, s2 = np.array([0.5, -1.0]), np.array([[0.5, -0.2], [-0.2, 3.0]])
    a, b = _with_moments(300, mu1, s1, 0), _with_moments(500, mu2, s2, 1)
    assert fid(a, b) == pytest.approx(_frechet_2x2(mu1, s1, mu2, s2), rel=1e-10)
    # diagonal covariances: sum (sqrt a_i - sqrt b_i)^2 + |mu1 - mu2|^2
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    a = _with_moments(50, np.zeros(3), np.diag(d1), 2)
    b = _with_moments(60, np.ones(3), np.diag(d2), 3)
    assert fid(a, b) == pytest.approx(3 + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum(), rel=1e-10)


def test_fid_of_singular_covariances():
    # fewer points than dimensions (D = 5, N = 3): rank-2 covariances, still finite and >= 0
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    assert np.isfinite(fid(a, b)) and fid(a, b) > 0
    assert fid(a, a) == pytest.approx(0.0, abs=1e-10)


def test_fid_does_not_depend_on_scipy_sqrtm_keywords(monkeypatch):
    # was: scipy.linalg.sqrtm(..., disp=False), a TypeError on scipy versions without `disp`
    def sqrtm(a):  # the newer signature
        raise AssertionError("the FID must not need scipy's general matrix square root")

    linalg = types.ModuleType("scipy.linalg")
    linalg.sqrtm = sqrtm
    scipy = types.ModuleType("scipy")
    scipy.linalg = linalg
    monkeypatch.setitem(sys.modules, "scipy", scipy)
    monkeypatch.setitem(sys.modules, "scipy.linalg", linalg)
    mu1, s1 = np.array([0.0, 1.0]), np.array([[2.0, 0.6], [0.6, 1.0]])
    mu2, s2 = np.zeros(2), np.eye(2)
    a, b = _with_moments(40, mu1, s1, 5), _with_moments(40, mu2, s2, 6)
    assert fid(a, b) == pytest.approx(_frechet_2x2(mu1, s1, mu2, s2), rel=1e-10)
