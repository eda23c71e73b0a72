"""PixelCNN++ cheap paths: the cached sequential sampler, cropped windows, cached row sweeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ffsolve
from ffsolve.cli import main
from ffsolve.models.pixelcnnpp import (
    PixelCNNpp,
    PixelCNNppConfig,
    load_pixelcnnpp,
    save_pixelcnnpp,
)
from ffsolve.problems.pixelcnn import PixelCNNSampling, pixelcnn_noise


def tiny(C: int, size: int, dtype=torch.float64, seed: int = 0) -> PixelCNNpp:
    torch.manual_seed(seed)
    cfg = PixelCNNppConfig(channels=C, height=size, width=size, filters=6, resnets=1, mixtures=3)
    model = PixelCNNpp(cfg)
    with torch.no_grad():  # biases start at zero: random ones, so that a conv of zero
        for name, p in model.named_parameters():  # padding is not zero
            if name.endswith(".b"):
                p.normal_(0.0, 0.3)
    return model.to(dtype).eval()


def problems(model: PixelCNNpp, B: int = 2, seed: int = 0):
    cfg = model.config
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    noise = pixelcnn_noise(B, (cfg.channels, cfg.height, cfg.width), cfg.mixtures, g, dtype=dtype)
    return PixelCNNSampling(model, *noise), PixelCNNSampling(model, *noise, cached=True)


VERTICAL = ("up_u", "dn_u", "down_u_size", "up_u_size")


def _activations(model: PixelCNNpp, img: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of every cached module of a full forward, by module name."""
    out, hooks = {}, []
    prefixes = ("up_u.", "up_ul.", "dn_u.", "dn_ul.", "down_u_size.", "down_ul_size.")
    prefixes += ("up_u_size.", "up_ul_size.")
    for name, mod in model.named_modules():  # resnets (a.s.k) and resizing convs (a.s)
        if name.startswith(prefixes) and name.count(".") <= 2:

            def hook(_m, _i, o, name=name):
                out[name] = o

            hooks.append(mod.register_forward_hook(hook))
    try:
        model(img)
    finally:
        for h in hooks:
            h.remove()
    return out


@pytest.mark.parametrize("C, size", [(1, 8), (3, 12)])
def test_cache_equals_a_full_pass_per_layer_after_every_step(C, size):
    model = tiny(C, size)
    _, cached = problems(model, B=2)
    H = W = size
    x = cached.initial()
    step = cached.stepper(x)
    checked = set()
    with torch.no_grad():
        for t in range(H * W):
            out = step(t)
            i = t // W
            full = _activations(model, cached.to_images(x))
            j = t % W
            for name, ref in full.items():
                level = (H // ref.shape[2]).bit_length() - 1
                r = i >> level  # the current row of this level: rows above are complete
                got = step.maps[name]
                assert torch.allclose(got[:, :, :r], ref[:, :, :r], rtol=0, atol=1e-12), (t, name)
                # in the current row: the whole row for the vertical stream u (it reads rows
                # above only), the columns pixel (i, j) reads for the horizontal stream ul
                c = got.shape[3] if name.split(".")[0] in VERTICAL else (j >> level) + 1
                now, want = got[:, :, r, :c], ref[:, :, r, :c]
                assert torch.allclose(now, want, rtol=0, atol=1e-12), (t, name)
                checked.add(name)
            x[:, t : t + 1] = out
    # every resnet, stride-2 conv and transposed conv of the model was compared
    assert len(checked) == (3 + 3 + 5 + 5) + 4 + 4  # resnets, stride-2 and transposed convs
    assert {name.split(".")[0] for name in checked} >= {"up_u", "dn_ul", "up_ul_size"}


@pytest.mark.parametrize(
    "C, size, dtype", [(1, 8, torch.float64), (3, 12, torch.float64), (1, 8, torch.float32)]
)
def test_every_method_on_the_cached_problem_gives_the_sequential_sample(C, size, dtype):
    model = tiny(C, size, dtype)
    plain, cached = problems(model, B=2)
    with torch.no_grad():
        ref = ffsolve.solve(plain, method="sequential").value
        runs = [
            ("sequential", {}),
            ("jacobi", {}),
            ("jacobi_gs", {"block_size": size}),
            ("gs_jacobi", {"window": 2 * size}),
            ("gs_jacobi", {"window": 3}),
        ]
        for method, opts in runs:
            sol = ffsolve.solve(cached, method=method, **opts)
            assert sol.all_converged, (method, opts)
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            assert torch.allclose(sol.value, ref, rtol=0, atol=tol), (method, opts)
            if method == "jacobi_gs":
                assert sol.num_iters <= size  # at most one iteration per image row
                assert sol.num_evals == sol.num_iters * size


@pytest.mark.parametrize("C, size", [(1, 8), (3, 12)])
def test_row_sweep_is_gauss_seidel_in_rows_with_the_rows_above_frozen(C, size):
    model = tiny(C, size)
    _, cached = problems(model, B=2)
    H = W = size
    x = torch.rand(2, H * W, C, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        new = cached.block_sweep(x, W)
        for i in range(H):
            for j in range(W):
                mixed = x.clone()
                p = i * W
                mixed[:, p : p + j] = new[:, p : p + j]  # old rows above, new row prefix
                want = cached.full(mixed)[:, p + j]
                assert torch.allclose(new[:, p + j], want, rtol=0, atol=1e-12), (i, j)
    # other block sizes take the generic sweep (evaluate_at), same semantics as before
    with torch.no_grad():
        generic = cached.block_sweep(x, 4)
    assert generic.shape == x.shape


def test_window_evaluates_only_the_rows_it_needs():
    model = tiny(3, 12)
    plain, cached = problems(model, B=2)
    W = 12
    x = torch.rand(2, 144, 3, dtype=torch.float64) * 2 - 1
    seen = []
    hook = model.u_init.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[2]))
    try:
        with torch.no_grad():
            for start, stop in [(0, 1), (5, 13), (3 * W, 4 * W + 1), (50, 144), (143, 144)]:
                got = cached.evaluate(x, start, stop)
                want = plain.evaluate(x, start, stop)
                assert torch.allclose(got, want, rtol=0, atol=1e-12)
                assert got.shape == (2, stop - start, 3)
    finally:
        hook.remove()
    # rows computed (cached, then plain): the window's last row + 1 rounded up to a multiple
    # of 4; a window reaching the last position takes the full forward
    assert seen == [4, 12, 4, 12, 8, 12, 12, 12, 12, 12]


def test_gs_jacobi_window_starts_at_the_first_uncertified_position():
    model = tiny(1, 8)
    _, cached = problems(model, B=2)
    calls = []
    evaluate = cached.evaluate

    def spy(x, start, stop):
        calls.append((start, stop))
        return evaluate(x, start, stop)

    cached.evaluate = spy
    with torch.no_grad():
        sol = ffsolve.solve(cached, method="gs_jacobi", window=10)
    assert sol.all_converged and len(calls) == sol.num_iters
    certified = [0, *sol.certified.min(dim=1).values.tolist()]
    for k, (start, stop) in enumerate(calls):
        # never past an uncertified position; near the end the window keeps its width and
        # reaches back over certified positions (which the loop leaves alone)
        assert start == min(certified[k], 64 - 10)
        assert stop == start + 10
    assert certified[-1] == 64


def test_cached_stepper_restarts_from_step_zero():
    model = tiny(1, 8)
    _, cached = problems(model, B=1)
    with torch.no_grad():
        a = ffsolve.solve(cached, method="sequential").value
        b = ffsolve.solve(cached, method="sequential").value
    assert torch.equal(a, b)  # step(0) drops the caches of the previous solve


def test_bad_window_and_block_sizes():
    model = tiny(1, 8)
    _, cached = problems(model, B=1)
    with pytest.raises(ValueError, match="window must be >= 1"):
        ffsolve.solve(cached, method="gs_jacobi", window=0)
    with pytest.raises(ValueError, match="block_size must be between 1 and the length 64"):
        ffsolve.solve(cached, method="jacobi_gs", block_size=65)
    with pytest.raises(TypeError, match="block_size must be an int"):
        ffsolve.solve(cached, method="jacobi_gs", block_size=2.5)
    with pytest.raises(ValueError, match="multiple of 4"):
        model.forward_top(torch.zeros(1, 1, 6, 8, dtype=torch.float64))


@pytest.mark.parametrize("name, rows", [("pixelcnnpp_mnist", 2), ("pixelcnnpp_rgb", 1)])
def test_cached_steps_on_the_shipped_checkpoint_are_the_sequential_prefix(name, rows):
    path = Path(__file__).resolve().parents[2] / "checkpoints" / name
    if not path.with_suffix(".json").exists():
        pytest.skip(f"no shipped checkpoint {path}")
    model, _ = load_pixelcnnpp(path)
    _, cached = problems(model, B=2)
    n = rows * model.config.width
    x = cached.initial()
    step = cached.stepper(x)
    with torch.no_grad():
        for t in range(n):
            x[:, t : t + 1] = step(t)
        # the sequential sample is the fixed point of the full forward; positions < n read
        # positions < n only, so the cached prefix must reproduce itself (float32: to rounding)
        f = cached.full(x)[:, :n]
    assert (f - x[:, :n]).abs().max() < 1e-4


def test_experiment_rows_batch_sweep_and_window_error(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = PixelCNNppConfig(channels=1, height=8, width=8, filters=4, resnets=1, mixtures=2)
    save_pixelcnnpp(tmp_path / "m", PixelCNNpp(cfg).eval(), {"data": {"name": "random"}})
    run = ["run", "pixelcnn-sampling", "--device", "cpu", "--out", str(tmp_path / "runs")]
    run += ["--set", f"checkpoint={tmp_path / 'm'}", "--set", "batch=2", "--set", "repeats=1"]
    run += ["--set", "warmup=0", "--set", "trace=false", "--set", "window_rows=2"]
    run += ["--set", "methods=[jacobi, jacobi_gs, gs_jacobi, auto]", "--set", "batches=[1, 2]"]
    assert main(run) == 0
    assert "vs cached" in capsys.readouterr().out
    rec = json.loads(next((tmp_path / "runs").glob("*/*/records.json")).read_text())
    rows = {r["method"]: r for r in rec["methods"]}
    assert list(rows)[:2] == ["sequential", "sequential-cached"]
    for r in rows.values():
        assert r["converged"] and r["pixels_differing_1e-3"] == 0, r["method"]
        assert r["speedup_vs_sequential-cached"] > 0
    assert rows["jacobi_gs(row=8)"]["num_iters"] <= 8
    among = rows["auto"]["options"]["methods"]  # the listed methods, on the cached problem
    assert among == ["jacobi", "jacobi_gs(block_size=8)", "gs_jacobi(window=16)"]
    assert rows["auto"]["auto"]["choice"] in ["sequential", *among]
    assert [s["batch"] for s in rec["batch_sweep"]] == [1, 2]
    assert all(s["max_abs_diff"] < 1e-4 for s in rec["batch_sweep"])
    assert main([*run, "--set", "window_rows=9"]) == 2  # taller than the image: one line
    assert "window_rows must be at most the image height 8" in capsys.readouterr().err
