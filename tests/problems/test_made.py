import pytest
import torch

import ffsolve
from exactness import sequential_tolerance
from ffsolve.checkpoint import PROJECT_ROOT, save_checkpoint
from ffsolve.data import logit_bounds
from ffsolve.errors import CheckpointError
from ffsolve.models.made import MADE, MADEConfig, load_made, save_made
from ffsolve.problems.made import MADESampling, logistic_noise

SHIPPED = PROJECT_ROOT / "checkpoints" / "made_mnist"
PARALLEL = [
    ("jacobi", {}),
    ("jacobi_gs", {"block_size": 6}),
    ("gs_jacobi", {"block_size": 7}),
    ("gs_jacobi", {"window": 9}),
]


def small(natural=True, hidden=(48, 48), dims=30, seed=1):
    cfg = MADEConfig(dims=dims, hidden=hidden, natural_ordering=natural, seed=seed)
    return MADE(cfg).double()


@pytest.mark.parametrize("natural", [True, False])
@pytest.mark.parametrize("hidden", [(40,), (40, 40), (30, 20, 30)])
def test_made_is_causal(natural, hidden):
    model = small(natural, hidden, dims=12)
    x = torch.randn(1, 12, dtype=torch.float64)
    for out in range(2):  # location and log-scale
        jac = torch.autograd.functional.jacobian(lambda v, o=out: model(v)[o], x).reshape(12, 12)
        rank = torch.argsort(model.ordering)  # rank[i]: step of dimension i
        future = rank[None, :] >= rank[:, None]  # input j is not before output i
        assert torch.all(jac[future] == 0)
        assert jac[~future].abs().sum() > 0  # and it does depend on the past


@pytest.mark.exactness
@pytest.mark.parametrize("natural", [True, False])
def test_every_method_equals_sequential(natural):
    model = small(natural)
    g = torch.Generator().manual_seed(0)
    noise = logistic_noise(5, 30, g, dtype=torch.float64)
    naive = MADESampling(model, noise, logit_bounds(1e-6))
    incremental = MADESampling(model, noise, logit_bounds(1e-6), incremental=True)
    with torch.no_grad():
        ref = ffsolve.solve(naive, method="sequential")
        inc = ffsolve.solve(incremental, method="sequential")
        assert torch.allclose(inc.value, ref.value, rtol=0, atol=1e-12)
        for method, opts in PARALLEL:
            sol = ffsolve.solve(naive, method=method, **opts)
            assert sol.all_converged, method
            assert torch.allclose(sol.value, ref.value, rtol=0, atol=1e-12), method
        # the full-network sweep runs the naive loop's exact kernels: bitwise equal
        assert torch.equal(ffsolve.solve(naive, method="jacobi").value, ref.value)


def test_sample_is_a_fixed_point_of_the_model():
    model = small()
    noise = logistic_noise(3, 30, torch.Generator().manual_seed(2), dtype=torch.float64)
    lo, hi = logit_bounds(1e-6)
    with torch.no_grad():
        x = ffsolve.solve(MADESampling(model, noise, (lo, hi)), method="jacobi").value
        loc, log_scale = model(x)
        assert torch.allclose(x, (loc + log_scale.exp() * noise).clamp(lo, hi), atol=1e-12)


def test_noise_shape_and_device_checked():
    model = small()
    with pytest.raises(ValueError, match="noise must be"):
        MADESampling(model, torch.zeros(2, 29, dtype=torch.float64), (-1, 1))
    with pytest.raises(ValueError, match="float32"):
        MADESampling(model, torch.zeros(2, 30), (-1, 1))


def test_checkpoint_roundtrip_and_errors(tmp_path):
    model = small(natural=False).float()
    path = save_made(tmp_path / "m", model, {"data": {"lam": 1e-6}})
    loaded, meta = load_made(path)
    assert torch.equal(loaded.ordering, model.ordering)
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # tensors that do not fit the config are a clear error, not a silent reshape
    bigger = MADE(MADEConfig(dims=30, hidden=(64,), seed=3))
    cfg = {**meta["config"], "hidden": [48, 48]}
    with pytest.raises(CheckpointError, match="does not match"):
        load_made(save_checkpoint(tmp_path / "mixed", "made", bigger.state_dict(), cfg))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_made(path)


@pytest.mark.skipif(not SHIPPED.with_suffix(".json").exists(), reason="no shipped checkpoint")
def test_shipped_checkpoint_every_method_equals_sequential():
    model, meta = load_made(SHIPPED)
    assert meta["data"]["name"] == "mnist" and model.dims == 784
    noise = logistic_noise(3, 784, torch.Generator().manual_seed(0))
    bounds = logit_bounds(meta["data"]["lam"])
    naive = MADESampling(model, noise, bounds)
    with torch.no_grad():
        ref = ffsolve.solve(naive, method="sequential", record=False)
        inc = ffsolve.solve(
            MADESampling(model, noise, bounds, incremental=True), method="sequential", record=False
        )
        assert (inc.value - ref.value).abs().max() < 1e-3
        jac = ffsolve.solve(naive, method="jacobi", record=False)
        assert jac.all_converged and torch.equal(jac.value, ref.value)
        assert jac.num_iters < 200  # a trained model converges far before T
        for method, opts in [("jacobi_gs", {"block_size": 28}), ("gs_jacobi", {"window": 112})]:
            sol = ffsolve.solve(naive, method=method, record=False, **opts)
            assert sol.all_converged
            assert (sol.value - ref.value).abs().max() < 1e-3, method


def test_tiny_training_lowers_the_loss(tmp_path):
    from ffsolve.experiments import RunContext
    from ffsolve.experiments.made_train import MADETrainConfig, train

    cfg = MADETrainConfig(
        data="rgb",
        hidden=(32,),
        lam=0.05,
        epochs=2,
        rgb_train=400,
        rgb_test=100,
        rgb_photos=1,
        batch_size=50,
        lr=3e-3,
        save_to=str(tmp_path / "made_rgb"),
    )
    out = train(cfg, RunContext(torch.device("cpu"), tmp_path, log=lambda s: None))
    h = out["history"]
    assert h[-1]["test_bpd"] < h[0]["test_bpd"]
    model, meta = load_made(tmp_path / "made_rgb")
    assert model.dims == 3072 and meta["data"]["shape"] == [32, 32, 3]
    assert meta["test_bits_per_dim"] == pytest.approx(h[-1]["test_bpd"])


def test_made_sampling_cli_end_to_end(tmp_path, capsys):
    import json

    from ffsolve.cli import main

    model = MADE(MADEConfig(dims=784, hidden=(16,), natural_ordering=False, seed=5))
    save_made(tmp_path / "tiny", model, {"data": {"name": "mnist", "shape": [28, 28], "lam": 1e-6}})
    args = ["run", "made-sampling", "--device", "cpu", "--out", str(tmp_path / "runs")]
    for s in (
        f"checkpoint={tmp_path / 'tiny'}",
        "batch=2",
        "repeats=1",
        "warmup=0",
        "block_size=98",
        "window=200",
    ):
        args += ["--set", s]
    assert main(args) == 0
    (run_dir,) = (tmp_path / "runs" / "made-sampling").iterdir()
    rec = json.loads((run_dir / "records.json").read_text())
    by = {r["method"]: r for r in rec["methods"]}
    assert set(by) == {
        "sequential-incremental",
        "sequential-naive",
        "jacobi",
        "jacobi_gs(block=98)",
        "gs_jacobi(block=98)",
        "gs_jacobi(window=200)",
    }
    assert by["jacobi"]["max_abs_diff_vs_sequential"] == 0.0
    tr = by["jacobi"]["traces"]
    assert len(tr["l2_to_final"]) == by["jacobi"]["num_iters"] == len(tr["clock_s"])
    assert tr["iters_to_exact_final"] <= by["jacobi"]["num_iters"]
    assert by["jacobi"]["speedup_vs_sequential"] > 0
    assert "strongest_baseline" in by["jacobi"]
    for name in ("convergence.png", "strips.png", "samples.png"):
        (run_dir / name).unlink()
    assert main(["plot", str(run_dir)]) == 0
    assert all((run_dir / n).is_file() for n in ("convergence.png", "strips.png", "samples.png"))
    assert "iterations until the iterate equals" in capsys.readouterr().out
    assert (
        main(
            [
                "run",
                "made-sampling",
                "--out",
                str(tmp_path),
                "--set",
                f"checkpoint={tmp_path / 'absent'}",
            ]
        )
        == 2
    )
    assert "no checkpoint at" in capsys.readouterr().err


@pytest.mark.skipif(not SHIPPED.with_suffix(".json").exists(), reason="no shipped checkpoint")
def test_demo_runs(tmp_path, capsys):
    from ffsolve.cli import main

    assert main(["demo", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "jacobi" in out and "sequential-naive" in out
    (run_dir,) = (tmp_path / "made-sampling").iterdir()
    assert (run_dir / "samples.png").is_file() and (run_dir / "convergence.png").is_file()
    assert f"figure: {run_dir / 'samples.png'}" in out


def test_made_sampling_auto_row_chooses_among_the_listed_methods(tmp_path):
    import json

    from ffsolve.cli import main

    model = MADE(MADEConfig(dims=784, hidden=(16,), natural_ordering=False, seed=5))
    save_made(tmp_path / "tiny", model, {"data": {"name": "mnist", "shape": [28, 28], "lam": 1e-6}})
    args = ["run", "made-sampling", "--device", "cpu", "--out", str(tmp_path / "runs"), "--quiet"]
    for s in (f"checkpoint={tmp_path / 'tiny'}", "batch=2", "repeats=2", "warmup=0",
              "window=200", "trace=false", "methods=[jacobi, gs_jacobi-window, auto]"):  # fmt: skip
        args += ["--set", s]
    assert main(args) == 0
    (run_dir,) = (tmp_path / "runs" / "made-sampling").iterdir()
    by = {r["method"]: r for r in json.loads((run_dir / "records.json").read_text())["methods"]}
    auto = by["auto"]
    assert auto["options"]["methods"] == ["jacobi", "gs_jacobi(window=200)"]
    assert auto["auto"]["choice"] in ("sequential", "jacobi", "gs_jacobi(window=200)")
    # bitwise the loop whose arithmetic it ran: the incremental loop's, or a full sweep's
    # (which the naive loop shares); a window's sweep runs other shapes: equal to rounding
    # (it differed by 6e-8 under MKL_CBWR=COMPATIBLE)
    choice = auto["auto"]["choice"]
    diff = auto[
        "max_abs_diff_vs_sequential-" + ("incremental" if choice == "sequential" else "naive")
    ]
    if choice in ("sequential", "jacobi"):
        assert diff == 0.0
    else:
        assert diff <= sequential_tolerance(torch.float32, 784)
