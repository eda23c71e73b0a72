"""`ffsolve run diffusion-sampling` end to end on a tiny random DDPM (CPU)."""

import json

import pytest
import torch

from ffsolve.cli import main
from idx_files import idx_folder

pytest.importorskip("diffusers")


@pytest.fixture
def tiny_ddpm(tmp_path):
    from ffsolve.models.ddpm import DDPMConfig, build_ddpm, save_ddpm

    cfg = DDPMConfig(block_out_channels=(8, 16), layers_per_block=1, attention=False,
                     norm_num_groups=4)  # fmt: skip
    torch.manual_seed(0)
    save_ddpm(tmp_path / "ddpm", build_ddpm(cfg), cfg, {"data": {"name": "mnist"}})
    return tmp_path / "ddpm"


@pytest.mark.slow
def test_every_row_and_the_peer_on_a_tiny_model(tmp_path, tiny_ddpm, capsys, diffusers_log):
    data = idx_folder(tmp_path / "mnist", 16, 16)
    sets = [f"checkpoint={tiny_ddpm}", "schedules=[ddim-10]", "batches=[2]", "windows=[4]",
            "repeats=1", "warmup=0", "dtype=float64", "frames=[1, 2]", "fid_samples=8",
            "fid_batch=4", f"data_dir={data}",
            "methods=[jacobi, picard, anderson, auto]"]  # fmt: skip
    argv = ["run", "diffusion-sampling", "--device", "cpu", "--out", str(tmp_path / "runs")]
    assert main([*argv, *[x for s in sets for x in ("--set", s)], "--quiet"]) == 0
    (run,) = (tmp_path / "runs" / "diffusion-sampling").iterdir()
    rec = json.loads((run / "records.json").read_text())
    (case,) = rec["cases"]
    rows = {r["method"]: r for r in case["rows"]}
    assert not any("error" in r for r in rows.values())
    for label in ("jacobi exact", "picard(window=4) exact", "anderson(window=4, m=3) exact"):
        assert rows[label]["max_abs_diff_vs_sequential"] < 1e-10, label  # the fixed point
    auto = rows["auto exact"]  # method="auto" among the three, exact
    assert auto["max_abs_diff_vs_sequential"] < 1e-10
    assert auto["auto"]["choice"] in ("sequential", "jacobi", "picard(window=4)",
                                      "anderson(window=4, base=picard)")  # fmt: skip
    assert rows["diffusers loop"]["max_abs_diff_vs_sequential"] < 1e-4  # DDIM: same noise
    assert rows["paradigms (peer, window=4) tol=0.1"]["num_iters"] <= 10
    assert rows["picard(window=4) tol=0.1"]["num_iters"] <= rows["jacobi tol=0.1"]["num_iters"]
    assert rows["picard(window=4) tol=0.1"]["per_sweep_ms"] > 0
    assert set(case["denoiser_call_s"]) == {"1", "4"}  # a step's call and the window's
    fid = rec["fid"]["ddim-10"]
    assert set(fid) == {"sequential", "sequential seed+1", "picard tol=0.1", "anderson tol=0.1"}
    assert all(v >= 0 for v in fid.values())
    assert (run / "frames_ddim-10.png").is_file()
    assert "not Inception's" in capsys.readouterr().out
    notices = [r for r in diffusers_log if "kept in float32" in r.getMessage()]
    assert not notices  # diffusers' "should be kept in float32: []" on every dtype cast


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_row_the_peer_and_the_fid_run_on_cuda(tmp_path, tiny_ddpm):
    """On CUDA: the captured rows, the peer loop (its noise variance once stayed on the CPU)
    and the FID's uncaptured solves."""
    data = idx_folder(tmp_path / "mnist", 16, 16)
    sets = [f"checkpoint={tiny_ddpm}", "schedules=[ddim-10]", "batches=[2]", "windows=[4]",
            "repeats=1", "warmup=0", "frames=[1, 2]", "fid_samples=8", "fid_batch=4",
            f"data_dir={data}", "methods=[jacobi, picard, anderson, auto]"]  # fmt: skip
    argv = ["run", "diffusion-sampling", "--device", "cuda", "--out", str(tmp_path / "runs")]
    assert main([*argv, *[x for s in sets for x in ("--set", s)], "--quiet"]) == 0
    (run,) = (tmp_path / "runs" / "diffusion-sampling").iterdir()
    rec = json.loads((run / "records.json").read_text())
    rows = {r["method"]: r for r in rec["cases"][0]["rows"]}
    assert not any("error" in r for r in rows.values()), rows
    assert rows["paradigms (peer, window=4) tol=0.1"]["num_iters"] <= 10
    for label in ("picard(window=4) tol=0.1", "anderson(window=4, m=3) tol=0.1", "jacobi exact"):
        assert rows[label]["captured"], label  # moving windows are captured too
    assert set(rec["fid"]["ddim-10"]) >= {"sequential", "picard tol=0.1"}


def test_bad_schedule_is_refused_before_anything_runs(tmp_path, tiny_ddpm, capsys):
    argv = ["run", "diffusion-sampling", "--set", f"checkpoint={tiny_ddpm}", "--set",
            "schedules=[ddpm-5000]", "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 2
    assert "out of range" in capsys.readouterr().err
