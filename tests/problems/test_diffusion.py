"""DiffusionSampling: a DDPM or DDIM sampler as a triangular system, on a tiny random UNet."""

import pytest
import torch

import ffsolve
from ffsolve.problems import DiffusionSampling, diffusion_noise

diffusers = pytest.importorskip("diffusers")
D64 = torch.float64


def _unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).double().eval()  # fmt: skip


def _problem(kind="ddpm", steps=20, eta=0.0, B=2):
    cls = diffusers.DDPMScheduler if kind == "ddpm" else diffusers.DDIMScheduler
    sched = cls(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    sched.set_timesteps(steps)
    x_T, z = diffusion_noise(B, (1, 8, 8), steps, torch.Generator().manual_seed(1), dtype=D64)
    return DiffusionSampling(_unet(), sched, x_T, z, eta=eta), sched, x_T, z


CASES = [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.7)]
METHODS = [
    ("jacobi", {}),
    ("gs_jacobi", {"window": 6}),
    ("picard", {}),
    ("picard", {"window": 6}),
    ("picard", {"linear": "problem"}),
    ("anderson", {"base": "picard", "history": 3}),
]


@pytest.mark.parametrize("kind,eta", CASES)
@pytest.mark.parametrize("method,opts", METHODS, ids=[f"{m}{o}" for m, o in METHODS])
def test_every_method_reaches_the_fixed_point(kind, eta, method, opts):
    """At atol 0 every method returns the sequential sample (float64; the denoiser runs on
    batches of other sizes, so equality is to rounding: the fixed point of the batched
    program)."""
    problem, *_ = _problem(kind, eta=eta)
    with torch.no_grad():
        ref = ffsolve.solve(problem, method="sequential").value
        sol = ffsolve.solve(problem, method=method, **opts)
    assert sol.all_converged and sol.num_iters <= problem.length
    torch.testing.assert_close(sol.value, ref, rtol=0, atol=1e-10)


def test_jacobi_advances_about_one_step_per_sweep():
    problem, *_ = _problem("ddim", steps=15)
    with torch.no_grad():
        assert ffsolve.solve(problem, method="jacobi").num_iters >= 14


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_the_sample_is_diffusers_ddim_loop_with_the_same_noise(eta):
    problem, sched, x_T, z = _problem("ddim", steps=10, eta=eta)
    unet = problem.denoiser
    with torch.no_grad():
        ours = problem.images(ffsolve.solve(problem, method="picard").value)
        x = x_T.clone()
        for i, t in enumerate(sched.timesteps):
            x = sched.step(unet(x, t).sample, t, x, eta=eta, variance_noise=z[i]).prev_sample
    # diffusers keeps alphas_cumprod in float32: the two programs agree to its rounding
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-4)


def test_ddpm_mean_is_diffusers_ddpm_step():
    problem, sched, x_T, z = _problem("ddpm", steps=10)
    t = sched.timesteps[3]
    x = torch.randn(2, 1, 8, 8, dtype=D64)
    with torch.no_grad():
        eps = problem.denoiser(x, t).sample
        mean = problem.step(x[None], slice(3, 4))[0] - problem._coef["sigma"][3] * z[3]
        pred = diffusers.DDPMParallelScheduler.from_config(sched.config)
        pred.set_timesteps(10)
        want = pred.batch_step_no_noise(eps, t.repeat(2), x)
    torch.testing.assert_close(mean, want, rtol=0, atol=1e-4)


def test_bad_inputs_give_one_clear_error():
    problem, sched, x_T, z = _problem("ddpm", steps=5)
    unet = problem.denoiser
    with pytest.raises(ValueError, match=r"noise must be \(steps, \*x_T.shape\)"):
        DiffusionSampling(unet, sched, x_T, z[:4])
    bad = z.clone()
    bad[2, 1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="noise holds NaN"):
        DiffusionSampling(unet, sched, x_T, bad)
    with pytest.raises(TypeError, match="DDPM or DDIM scheduler"):
        DiffusionSampling(unet, object(), x_T, z)
    fresh = diffusers.DDPMScheduler(num_train_timesteps=1000)
    fresh.timesteps = torch.arange(5)  # increasing: not a sampling schedule
    with pytest.raises(ValueError, match="timesteps must decrease"):
        DiffusionSampling(unet, fresh, x_T, z)
    with pytest.raises(ValueError, match="eta must be"):
        DiffusionSampling(unet, sched, x_T, z, eta=float("nan"))

    def broken(x, t):  # NaN from step index 2 on
        out = unet(x, t).sample
        return torch.where(t.view(-1, 1, 1, 1) <= sched.timesteps[2], float("nan"), out)

    nan = DiffusionSampling(broken, sched, x_T, z)
    with pytest.raises(ffsolve.NonFiniteError, match="position 2"), torch.no_grad():
        ffsolve.solve(nan, method="picard")


def test_x_T_must_fit_the_denoiser():
    # was: accepted, then failed inside diffusers at solve time
    problem, sched, _, _ = _problem("ddim", steps=3)
    unet = problem.denoiser  # 1 channel, 8x8, float64

    def noise(shape, dtype=D64):
        return diffusion_noise(2, shape, 3, torch.Generator().manual_seed(0), dtype=dtype)

    with pytest.raises(ValueError, match=r"x_T has 3 channels, the denoiser takes 1"):
        DiffusionSampling(unet, sched, *noise((3, 8, 8)))
    with pytest.raises(ValueError, match=r"x_T is 6x6, the denoiser was built for 8x8"):
        DiffusionSampling(unet, sched, *noise((1, 6, 6)))
    with pytest.raises(ValueError, match=r"x_T is torch.float32, the denoiser's weights are"):
        DiffusionSampling(unet, sched, *noise((1, 8, 8), torch.float32))

    def plain(x, t):  # declares nothing: only what the problem itself needs is checked
        return unet(x.double(), t).sample.to(x.dtype)

    p = DiffusionSampling(plain, sched, *noise((1, 8, 8), torch.float32))
    with torch.no_grad():
        assert ffsolve.solve(p, method="sequential").value.dtype == torch.float32


class _HostWindows(DiffusionSampling):
    """The same sampler with its windows placed by the host (`evaluate` with ints)."""

    window_on_device = False


WINDOWED = [
    ("gs_jacobi", {"window": 6}),
    ("picard", {"window": 6}),
    ("picard", {"window": 5, "linear": "problem"}),
    ("anderson", {"base": "picard", "history": 2, "window": 7}),
]


@pytest.mark.parametrize("method,opts", WINDOWED, ids=[f"{m}{o}" for m, o in WINDOWED])
@pytest.mark.parametrize("atol", [0.0, 0.1])
def test_windows_on_the_device_sweep_as_the_host_places_them(method, opts, atol):
    """The window's steps, timesteps, coefficients, noise and guesses gathered by a device
    offset give the solve the host's slices give, sweep for sweep (the same denoiser calls)."""
    problem, sched, x_T, z = _problem("ddim", eta=0.7)
    host = _HostWindows(problem.denoiser, sched, x_T, z, eta=0.7)
    stop = ffsolve.Stopping(atol=atol, rule="variance") if atol else ffsolve.Stopping()
    with torch.no_grad():
        got = ffsolve.solve(problem, method=method, stopping=stop, check_every=4, **opts)
        ref = ffsolve.solve(host, method=method, stopping=stop, **opts)
    assert got.num_iters == ref.num_iters and got.all_converged
    assert torch.equal(got.value, ref.value)
    assert torch.equal(got.certified, ref.certified)


@pytest.mark.parametrize("method,opts", WINDOWED[1:], ids=[f"{m}{o}" for m, o in WINDOWED[1:]])
def test_captured_windows_replay_the_eager_solve(fake_graphs, method, opts):
    problem, *_ = _problem("ddpm")
    stop = ffsolve.Stopping(atol=0.1, rule="variance")
    with torch.no_grad():
        ref = ffsolve.solve(problem, method=method, stopping=stop, **opts)
        for _ in range(2):  # the capture, then a replay of the cached loop
            got = ffsolve.solve(problem, method=method, stopping=stop, capture=True, **opts)
            assert got.stats["captured"] and got.num_iters == ref.num_iters
            assert torch.equal(got.value, ref.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method,opts", WINDOWED, ids=[f"{m}{o}" for m, o in WINDOWED])
def test_windows_are_captured_on_cuda(method, opts):
    """Real CUDA graphs of a moving window (the offset a device tensor): the captured loop
    equals the eager one bitwise (the same kernels), replayed again after a reset."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    problem, sched, x_T, z = _problem("ddim", eta=0.7)
    problem = DiffusionSampling(problem.denoiser.float().cuda(), sched, x_T.float().cuda(),
                                z.float().cuda(), eta=0.7)  # fmt: skip
    stop = ffsolve.Stopping(atol=0.1, rule="variance")
    with torch.no_grad():
        eager = ffsolve.solve(problem, method=method, stopping=stop, capture=False, **opts)
        for _ in range(2):
            got = ffsolve.solve(problem, method=method, stopping=stop, **opts)
            assert got.stats.get("captured"), got.stats
            assert got.num_iters == eager.num_iters
            assert torch.equal(got.value, eager.value)


def test_auto_races_windowed_samplers_on_long_schedules():
    from ffsolve.solvers import get_solver
    from ffsolve.solvers.auto import SAMPLER_WINDOW, candidates

    long, *_ = _problem("ddim", steps=2 * SAMPLER_WINDOW + 1)
    short, *_ = _problem("ddim", steps=20)
    windows = lambda p: {(s.name, getattr(s, "window", None)) for s in candidates(p, get_solver)}  # noqa: E731
    assert {("picard", SAMPLER_WINDOW), ("anderson", SAMPLER_WINDOW)} <= windows(long)
    assert ("picard", SAMPLER_WINDOW) not in windows(short)
