"""PixelCNN++: causality, exact parallel sampling by every method, training, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ffsolve
from ffsolve.cli import main
from ffsolve.errors import CheckpointError
from ffsolve.models.pixelcnnpp import (
    PixelCNNpp,
    PixelCNNppConfig,
    load_pixelcnnpp,
    mixture_nll,
    sample_mixture,
    save_pixelcnnpp,
)
from ffsolve.problems.pixelcnn import PixelCNNSampling, pixelcnn_noise
from ffsolve.solvers import NonFiniteError


def tiny(C: int = 3, size: int = 8, dtype=torch.float64, seed: int = 0) -> PixelCNNpp:
    torch.manual_seed(seed)
    cfg = PixelCNNppConfig(channels=C, height=size, width=size, filters=6, resnets=1, mixtures=3)
    return PixelCNNpp(cfg).to(dtype).eval()


def problem_for(model: PixelCNNpp, B: int = 2, seed: int = 0) -> PixelCNNSampling:
    cfg = model.config
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.channels, cfg.height, cfg.width)
    gumbel, logistic = pixelcnn_noise(B, shape, cfg.mixtures, g, dtype=dtype)
    return PixelCNNSampling(model, gumbel, logistic)


@pytest.mark.parametrize("C", [1, 3])
def test_causal_in_raster_order(C):
    model = tiny(C)
    H = W = 8
    x = torch.randn(2, C, H, W, dtype=torch.float64, requires_grad=True)
    out = model(x)  # (2, K, H, W)
    for p in range(H * W):
        (g,) = torch.autograd.grad(out[:, :, p // W, p % W].sum(), x, retain_graph=True)
        dep = g.abs().sum((0, 1)).flatten()  # (H*W,)
        assert dep[p:].max() == 0, f"pixel {p} sees pixels at or after itself"
    (g,) = torch.autograd.grad(out[:, :, 4, 4].sum(), x)
    seen = g.abs().sum((0, 1))  # (H, W)
    assert seen[4, 3] != 0 and seen[3, 4] != 0 and seen[3, 5] != 0  # left, above, above right


def test_channels_coupled_only_through_earlier_channels():
    model = tiny(3)
    params = model(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    g = torch.randn(1, 8, 8, 3, dtype=torch.float64)
    e = torch.randn(1, 8, 8, 3, dtype=torch.float64, requires_grad=True)
    out = sample_mixture(params, g, e, 3)  # (1, 8, 8, 3)
    for c in range(3):
        (grad,) = torch.autograd.grad(out[..., c].sum(), e, retain_graph=True)
        per_channel = grad.abs().sum((0, 1, 2))  # (3,)
        assert (per_channel[c + 1 :] == 0).all()  # never later channels
        assert per_channel[c] != 0


@pytest.mark.parametrize(
    "C, dtype", [(1, torch.float64), (3, torch.float64), (1, torch.float32), (3, torch.float32)]
)
def test_every_method_equals_sequential_bitwise(C, dtype):
    problem = problem_for(tiny(C, dtype=dtype), B=2)
    with torch.no_grad():
        ref = ffsolve.solve(problem, method="sequential").value
        runs = [
            ("jacobi", {}),
            ("jacobi_gs", {"block_size": 8}),
            ("gs_jacobi", {"window": 16}),
            ("gs_jacobi", {"block_size": 8}),
        ]
        for method, opts in runs if dtype == torch.float64 else runs[:2]:
            sol = ffsolve.solve(problem, method=method, **opts)
            assert sol.all_converged
            assert torch.equal(sol.value, ref), (method, opts)
            if method == "jacobi":
                assert sol.num_iters <= problem.length
            if method == "jacobi_gs":
                assert sol.num_iters <= 8  # at most one iteration per image row
    assert ref.shape == (2, 64, C)
    assert ref.abs().max() <= 1


def test_same_seed_same_sample_and_tolerance_option():
    model = tiny(1, dtype=torch.float32)
    with torch.no_grad():
        a = ffsolve.solve(problem_for(model, seed=5), method="jacobi").value
        b = ffsolve.solve(problem_for(model, seed=5), method="jacobi").value
        c = ffsolve.solve(problem_for(model, seed=6), method="jacobi").value
        loose = ffsolve.solve(problem_for(model, seed=5), method="jacobi", atol=0.02)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (loose.value - a).abs().max() <= 1.0  # stopped early, still a valid image


def test_loss_is_finite_and_falls():
    torch.manual_seed(0)
    model = PixelCNNpp(PixelCNNppConfig(channels=1, height=8, width=8, filters=8, resnets=1))
    ramp = torch.linspace(0, 255, 8).round().view(1, 1, 1, 8)  # a learnable pattern
    x = (ramp + torch.randint(0, 3, (16, 1, 8, 1))).clamp(max=255).expand(16, 1, 8, 8) / 127.5 - 1
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = mixture_nll(model(x), x, model.config.mixtures).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.95 * losses[0]


def test_nll_matches_a_direct_computation_for_one_component():
    # one component, one channel: the bin probability is a difference of two sigmoids
    params = torch.tensor([0.0, 0.3, -1.0], dtype=torch.float64).view(1, 3, 1, 1).repeat(1, 1, 4, 4)
    x = torch.full((1, 1, 4, 4), 2 * 100 / 255 - 1, dtype=torch.float64)
    nll = mixture_nll(params, x, 1)
    s = torch.exp(torch.tensor(-1.0, dtype=torch.float64))
    p = torch.sigmoid((x[0, 0, 0, 0] + 1 / 255 - 0.3) / s) - torch.sigmoid(
        (x[0, 0, 0, 0] - 1 / 255 - 0.3) / s
    )
    assert torch.allclose(nll, -16 * torch.log(p))


def test_checkpoint_roundtrip_float16_and_errors(tmp_path):
    model = tiny(3, dtype=torch.float32)
    path = save_pixelcnnpp(tmp_path / "m", model, {"data": {"name": "x"}}, "float16")
    loaded, meta = load_pixelcnnpp(tmp_path / "m")
    assert meta["storage_dtype"] == "float16"
    assert next(loaded.parameters()).dtype == torch.float32
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a.half().float(), b), k
    data = bytearray(Path(path).read_bytes())
    data[-5] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_pixelcnnpp(tmp_path / "m")
    save_pixelcnnpp(tmp_path / "n", model)
    side = tmp_path / "n.json"
    meta = json.loads(side.read_text())
    meta["config"]["filters"] = 7
    side.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match"):
        load_pixelcnnpp(tmp_path / "n")


def test_bad_input_errors():
    model = tiny(3, dtype=torch.float32)
    g, e = pixelcnn_noise(2, (3, 8, 8), 3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="logistic noise must be"):
        PixelCNNSampling(model, g, e[..., :1])
    with pytest.raises(ValueError, match="gumbel noise must be"):
        PixelCNNSampling(model, g[..., :2], e)
    with pytest.raises(ValueError, match="one dtype"):
        PixelCNNSampling(model, g.double(), e)
    with pytest.raises(ValueError, match="expected images"):
        model(torch.zeros(1, 3, 12, 8))
    with pytest.raises(ValueError, match="training mode"):
        PixelCNNSampling(model.train(), g, e)
    with pytest.raises(ValueError, match="multiple of 4"):
        PixelCNNppConfig(height=30)
    model.eval()
    with torch.no_grad():
        model.head.b.fill_(float("nan"))  # every mixture parameter NaN
    with pytest.raises(NonFiniteError, match="iteration 1, position 0"), torch.no_grad():
        ffsolve.solve(PixelCNNSampling(model, g, e), method="jacobi")


def _train_args(tmp_path, epochs, extra=()):
    return [
        "train",
        "pixelcnnpp",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "runs"),
        "--set",
        "data=rgb",
        "--set",
        "rgb_train=24",
        "--set",
        "rgb_test=8",
        "--set",
        "rgb_photos=1",
        "--set",
        "filters=4",
        "--set",
        "resnets=1",
        "--set",
        "mixtures=2",
        "--set",
        "batch_size=8",
        "--set",
        f"epochs={epochs}",
        "--set",
        "dropout=0.3",
        *extra,
    ]


def test_resume_equals_an_uninterrupted_run(tmp_path):
    straight = str(tmp_path / "a")
    assert main(_train_args(tmp_path, 2, ["--set", f"save_to={straight}"])) == 0
    split = str(tmp_path / "b")
    assert main(_train_args(tmp_path, 1, ["--set", f"save_to={split}"])) == 0
    resumed = ["--set", f"save_to={split}", "--set", "resume=true"]
    assert main(_train_args(tmp_path, 2, resumed)) == 0
    a, _ = load_pixelcnnpp(straight)
    b, meta = load_pixelcnnpp(split)
    assert meta["epochs"] == 2
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_train_force_and_resume_flags(tmp_path):
    ckpt = str(tmp_path / "c")
    args = _train_args(tmp_path, 1, ["--set", f"save_to={ckpt}"])
    assert main([*args, "--resume"]) == 2  # nothing to resume yet
    assert main(args) == 0
    assert main(args) == 2  # an existing checkpoint is not overwritten silently
    assert main([*args, "--force"]) == 0
    # --resume continues from the state the run keeps beside its checkpoint: one more epoch
    assert main(_train_args(tmp_path, 2, ["--set", f"save_to={ckpt}", "--resume"])) == 0
    _, meta = load_pixelcnnpp(ckpt)
    assert meta["epochs"] == 2


def test_cli_train_then_sample(tmp_path, capsys):
    ckpt = str(tmp_path / "pc")
    args = _train_args(tmp_path, 1, ["--set", f"save_to={ckpt}", "--set", "storage_dtype=float16"])
    assert main(args) == 0
    run = [
        "run",
        "pixelcnn-sampling",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "runs"),
        "--set",
        f"checkpoint={ckpt}",
        "--set",
        "batch=2",
        "--set",
        "methods=[jacobi, gs_jacobi]",
        "--set",
        "window_rows=2",
        "--set",
        "repeats=1",
        "--set",
        "warmup=0",
        "--set",
        "frames=[0, 1, 2]",
        "--set",
        "grid_images=2",
    ]
    capsys.readouterr()
    assert main(run) == 0
    out = capsys.readouterr().out
    assert "jacobi" in out and "pixels != seq." in out
    found = (tmp_path / "runs" / "pixelcnn-sampling").glob("*/records.json")
    rec = json.loads(next(found).read_text())
    rows = {r["method"]: r for r in rec["methods"]}
    assert rows["jacobi"]["pixels_differing"] == 0
    assert rows["jacobi"]["traces"]["positions_differing"][-1] == 0
    assert main([*run[:-2], "--set", "batch=0"]) == 2  # out of range: one line, exit 2


def test_freezing_twice_keeps_the_weight_tensors():
    # two problems on one model: the second must not free the weights the first one's CUDA
    # graph reads by address (they are updated in place)
    model = tiny(1, dtype=torch.float32)
    problem_for(model)
    ptrs = [m.weight().data_ptr() for m in model.modules() if hasattr(m, "_frozen")]
    with torch.no_grad():
        model.head.g.mul_(2.0)
    problem_for(model)
    again = [m.weight().data_ptr() for m in model.modules() if hasattr(m, "_frozen")]
    assert ptrs == again
    assert torch.equal(model.head.weight(), model.head._normalised())  # new values, same tensor
