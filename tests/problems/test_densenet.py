import json

import pytest
import torch
from safetensors.torch import load_file

import ffsolve
from ffsolve.cli import main
from ffsolve.errors import CheckpointError
from ffsolve.models.densenet import (
    DenseNet,
    DenseNetConfig,
    densenet_bc,
    densenet_config,
    load_densenet,
    load_torchvision_state_dict,
    save_densenet,
)
from ffsolve.problems.densenet import DenseNetLayers, FusedBlock, prediction_metrics, stable_from
from idx_files import idx_folder

TINY = DenseNetConfig(
    growth_rate=3,
    block_config=(3, 4, 2),
    num_init_features=5,
    num_classes=7,
    in_channels=1,
    small_input=True,
)


def _tiny(dtype=torch.float64, config=TINY) -> DenseNet:
    torch.manual_seed(1)
    net = DenseNet(config).to(dtype)
    for m in net.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return net.eval()


def test_densenet201_parameter_count_and_layers():
    net = DenseNet(densenet_config("densenet201"))
    assert sum(p.numel() for p in net.parameters()) == 20_013_928
    assert net.num_layers == 98


def test_densenet_bc_layout():
    cfg = densenet_bc(40, 12)
    assert cfg.block_config == (6, 6, 6) and cfg.num_init_features == 24
    with pytest.raises(ValueError, match="6n \\+ 4"):
        densenet_bc(41)


def test_torchvision_names_load():
    # a few key names exactly as torchvision's densenet201().state_dict() spells them
    known = [
        "features.conv0.weight",
        "features.norm0.running_var",
        "features.denseblock1.denselayer1.norm1.weight",
        "features.denseblock1.denselayer1.conv1.weight",
        "features.denseblock3.denselayer48.conv2.weight",
        "features.transition1.conv.weight",
        "features.transition3.norm.running_mean",
        "features.norm5.bias",
        "classifier.weight",
        "classifier.bias",
    ]
    net = DenseNet(densenet_config("densenet201"))
    keys = list(net.state_dict())
    assert set(known) <= set(keys)
    torch.manual_seed(3)
    tv = {k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in
          net.state_dict().items()}  # fmt: skip
    # the published .pth files: old "norm.1" spelling, no num_batches_tracked
    old = {
        k.replace("norm1", "norm.1").replace("conv2", "conv.2"): v
        for k, v in tv.items()
        if not k.endswith("num_batches_tracked")
    }
    other = DenseNet(densenet_config("densenet201"))
    load_torchvision_state_dict(other, old)
    for k, v in other.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, tv[k]), k


def test_mismatched_state_dict_names_first_wrong_key():
    net = _tiny()
    sd = net.state_dict()
    bad = dict(sd)
    bad["features.denseblock2.denselayer1.conv1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="denseblock2.denselayer1.conv1.weight.*shape"):
        load_torchvision_state_dict(_tiny(), bad)
    missing = {k: v for k, v in sd.items() if k != "features.transition1.conv.weight"}
    with pytest.raises(CheckpointError, match="lacks 'features.transition1.conv.weight'"):
        load_torchvision_state_dict(_tiny(), missing)
    extra = {**sd, "features.denseblock9.x": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="denseblock9.x"):
        load_torchvision_state_dict(_tiny(), extra)


def test_checkpoint_round_trip(tmp_path):
    net = _tiny(torch.float32)
    save_densenet(tmp_path / "d", net, {"test_accuracy": 0.5})
    back, meta = load_densenet(tmp_path / "d")
    assert meta["test_accuracy"] == 0.5 and back.config == net.config
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(back(x), net(x))


@pytest.mark.parametrize("conv3x3", ["grouped", "unfold"])
def test_fused_sweep_equals_per_layer_loop(conv3x3):
    net = _tiny()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    loop, fused = DenseNetLayers(net, x), DenseNetLayers(net, x, fused=True, conv3x3=conv3x3)
    state = torch.randn(2, loop.length, loop.F, dtype=torch.float64)  # any iterate
    with torch.no_grad():
        a = loop.evaluate(state, 0, loop.length)
        b = fused.evaluate(state, 0, loop.length)
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        # windows that cut through blocks
        torch.testing.assert_close(fused.evaluate(state, 2, 6), a[:, 2:6], rtol=1e-12, atol=1e-12)
        # one block alone: the L layers from the same concatenation, layer by layer
        block = net.dense_blocks()[1]
        feats = torch.randn(2, net.block_inputs[1] + 4 * 3, 4, 4, dtype=torch.float64)
        fb = FusedBlock.of(block, net.block_inputs[1], 3, conv3x3).sweep(feats)
        for j, layer in enumerate(block.values()):
            ref = layer(feats[:, : net.block_inputs[1] + 3 * j])
            torch.testing.assert_close(fb[:, 3 * j : 3 * j + 3], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.exactness
@pytest.mark.parametrize(
    "fused, conv3x3", [(False, "grouped"), (True, "grouped"), (True, "unfold")]
)
@pytest.mark.parametrize(
    "method, options",
    [
        ("sequential", {}),
        ("jacobi", {}),
        ("jacobi_gs", {"block_size": 3}),
        ("gs_jacobi", {"block_size": 3}),
        ("gs_jacobi", {"window": 4}),
    ],
)
def test_every_method_returns_the_sequential_logits(method, options, fused, conv3x3):
    net = _tiny()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = net(x)
        problem = DenseNetLayers(net, x, fused=fused, conv3x3=conv3x3)
        sol = ffsolve.solve(problem, method=method, **options)
        logits = problem.logits(sol.value)
    assert sol.all_converged and sol.num_iters <= problem.length
    if fused:  # folded BatchNorm and other kernels: equal to rounding
        torch.testing.assert_close(logits, ref, rtol=1e-12, atol=1e-12)
    else:  # each layer runs alone on (B, c0 + j k, H, W), the forward's own shapes and
        # kernels (DenseNetLayers.evaluate): bitwise on any CPU and BLAS
        assert torch.equal(logits, ref)
    if method == "jacobi":
        assert sol.num_iters <= problem.length  # T = 9 dense layers bound the iterations


def test_problem_rejects_training_mode_and_bad_images():
    net = _tiny()
    with pytest.raises(ValueError, match="eval mode"):
        DenseNetLayers(net.train(), torch.zeros(1, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="images must be"):
        DenseNetLayers(net.eval(), torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="conv3x3 must be"):
        DenseNetLayers(net.eval(), torch.zeros(1, 1, 8, 8, dtype=torch.float64), True, "fft")


def test_prediction_metrics_use_the_largest_logits():
    ref = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6, 7]])
    same_top = torch.tensor([[7.0, 6, 5, 4, 3, 10, 12, 11]])  # top 5: {6,7,5,0,1}
    m = prediction_metrics(same_top, ref, None)
    assert m["top5_agree"] == pytest.approx(3 / 5) and m["top1_agree"] == 0.0
    m = prediction_metrics(ref, ref, ref)
    assert m["top5_agree"] == 1 and m["top5_exact"] == 1 and m["logit_l2"] == 0
    assert stable_from([[1], [2], [2], [2]]) == 2
    assert stable_from([[2], [2]]) == 1
    assert stable_from([[1], [2], [1]]) == 3


def test_cli_train_and_run_tiny(tmp_path, capsys):
    data = idx_folder(tmp_path / "fmnist", 64, 16)
    ckpt = tmp_path / "tiny"
    sets = ["depth=10", "growth_rate=2", "epochs=1", "batch_size=32", f"data_dir={data}",
            f"save_to={ckpt}"]  # fmt: skip
    args = ["train", "densenet", "--device", "cpu", "--out", str(tmp_path / "runs")]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    meta = json.loads((tmp_path / "tiny.json").read_text())
    assert meta["kind"] == "densenet" and 0 <= meta["test_accuracy"] <= 1
    sets = [f"checkpoint={ckpt}", f"data_dir={data}", "batches=[2]", "repeats=1", "warmup=0",
            "dtype=float64"]  # fmt: skip
    args = ["run", "densenet-jacobi", "--device", "cpu", "--out", str(tmp_path / "runs")]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    (run_dir,) = (tmp_path / "runs" / "densenet-jacobi").iterdir()
    rec = json.loads((run_dir / "records.json").read_text())
    rows = {r["method"]: r for r in rec["batches"][0]["rows"]}
    assert rows["jacobi layer sweep, exact"]["max_abs_diff_vs_sequential"] == 0.0
    assert rows["jacobi fused sweep, exact"]["max_abs_diff_vs_sequential"] < 1e-12
    assert rows["jacobi fused-unfold sweep, exact"]["max_abs_diff_vs_sequential"] < 1e-12
    assert any(r.get("estimate") for r in rows.values())
    trace = rec["batches"][0]["traces"]["layer"]["per_iter"]
    assert trace[-1]["top5_agree"] == 1.0 and trace[-1]["logit_l2"] == 0.0
    assert (run_dir / "convergence_iter.png").is_file()
    assert (run_dir / "convergence_time.png").is_file()
    assert "ESTIMATE" in capsys.readouterr().out


@pytest.mark.exactness
@pytest.mark.parametrize("fused", [False, True])
def test_captured_loop_replays_on_new_images(fake_graphs, fused):
    """DenseNetLayers declares its sweep capturable: the captured loop, kept in
    problem.graphs, is replayed on new images set in place (set_images) and stops online at
    the sequential logits, like the eager loop."""
    net = _tiny()
    g = torch.Generator().manual_seed(0)
    problem = DenseNetLayers(net, torch.zeros(2, 1, 8, 8, dtype=torch.float64), fused=fused)
    for _ in range(2):
        x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=g)
        with torch.no_grad():
            ref = net(x)
            problem.set_images(x)
            sol = ffsolve.solve(problem, method="jacobi", capture=True)
            eager = ffsolve.solve(DenseNetLayers(net, x, fused=fused), method="jacobi")
            logits = problem.logits(sol.value)
        assert sol.stats["captured"] and sol.num_iters == eager.num_iters
        torch.testing.assert_close(logits, ref, rtol=1e-12, atol=1e-12)
        if not fused:  # the forward's own shapes per layer, as above: bitwise
            assert torch.equal(logits, ref)
    assert len(problem.graphs) == 1  # one captured loop, replayed by the second solve


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path):
    from ffsolve.data import load_images
    from ffsolve.errors import DataError

    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_images("fashion-mnist", tmp_path / "nope")
    with pytest.raises(DataError, match="lacks train-images"):
        load_images("fashion-mnist", tmp_path)


def test_train_refuses_overwrite_and_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    import ffsolve.experiments.densenet_train as dt

    data = idx_folder(tmp_path / "fmnist", 32, 8)

    def train(stem, *extra):
        sets = ["depth=10", "growth_rate=2", "epochs=2", "batch_size=16", f"data_dir={data}",
                f"save_to={tmp_path / stem}"]  # fmt: skip
        args = ["train", "densenet", "--device", "cpu", "--out", str(tmp_path / "runs")]
        return main(args + [a for s in sets for a in ("--set", s)] + list(extra))

    assert train("straight") == 0
    assert train("straight") == 2  # an existing checkpoint is not overwritten silently
    assert train("split", "--resume") == 2  # nothing to resume
    accuracy, calls = dt.accuracy, []

    def killed_in_epoch_2(*args, **kwargs):  # the run dies after epoch 1's periodic save
        calls.append(1)
        if len(calls) == 3:  # the model before training, after epoch 1, after epoch 2
            raise KeyboardInterrupt
        return accuracy(*args, **kwargs)

    monkeypatch.setattr(dt, "accuracy", killed_in_epoch_2)
    assert train("split") == 130
    assert (tmp_path / "split.resume.pt").is_file() and not (tmp_path / "split.json").exists()
    monkeypatch.setattr(dt, "accuracy", accuracy)
    assert train("split", "--resume") == 0
    assert not (tmp_path / "split.resume.pt").exists()
    a = load_file(tmp_path / "straight.safetensors")
    b = load_file(tmp_path / "split.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train("straight", "--force") == 0
