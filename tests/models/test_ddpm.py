import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers")

from ffsolve.checkpoint import save_checkpoint  # noqa: E402
from ffsolve.cli import main  # noqa: E402
from ffsolve.errors import CheckpointError  # noqa: E402
from ffsolve.fid import features, fid, load_feature_net  # noqa: E402
from ffsolve.models.ddpm import (  # noqa: E402
    DDPMConfig,
    build_ddpm,
    ddpm_scheduler,
    load_ddpm,
    sample_ddpm,
    save_ddpm,
)
from idx_files import idx_folder

TINY = DDPMConfig(
    block_out_channels=(8, 16), layers_per_block=1, attention=True, norm_num_groups=8, seed=3
)
TINY_SETS = ["block_out_channels=[8,16]", "layers_per_block=1", "attention=false",
             "norm_num_groups=8", "batch_size=4", "eval_images=4", "max_minutes=0",
             "lr_warmup=0"]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster, and immune to a busy machine's other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_config_checks():
    with pytest.raises(ValueError, match="divisible"):
        DDPMConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=8)  # 28 -> 14 -> 7 -> 3
    with pytest.raises(ValueError, match="norm_num_groups 32 does not divide"):
        DDPMConfig(block_out_channels=(8, 16))
    with pytest.raises(ValueError, match="beta_start"):
        DDPMConfig(beta_start=0.03)


def test_load_in_float64_prints_no_float32_notice(tmp_path, diffusers_log):
    """diffusers' `ModelMixin.to(dtype)` logs "should be kept in float32: []" on every cast,
    even for a UNet that keeps no module in float32: loading in float64 stays quiet, and a cast
    outside the loader still logs it (only the loader's own cast is silenced)."""
    save_ddpm(tmp_path / "d", build_ddpm(TINY), TINY)
    unet, _, _ = load_ddpm(tmp_path / "d", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in unet.parameters()) and not unet.training
    assert not diffusers_log
    unet.to(torch.float32)
    assert "kept in float32" in diffusers_log[0].getMessage()


def test_build_save_load_roundtrip_float16(tmp_path):
    unet = build_ddpm(TINY)
    assert unet.config.sample_size == 28  # no padding: 28 -> 14 and back
    torch.manual_seed(0)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([0, 999])
    saved = save_ddpm(tmp_path / "d", unet, TINY, {"note": 1}, storage_dtype="float16")
    assert saved.suffix == ".safetensors"
    meta = json.loads((tmp_path / "d.json").read_text())
    assert meta["kind"] == "ddpm" and meta["storage_dtype"] == "float16" and meta["note"] == 1
    assert all(v.dtype == torch.float16 for v in load_file(saved).values())
    loaded, cfg, meta = load_ddpm(tmp_path / "d")
    assert cfg == TINY and not loaded.training
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, unet.state_dict()[k].half().float()), k
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(p.half().float())
        assert torch.equal(loaded(x, t).sample, unet.eval()(x, t).sample)
    assert build_ddpm(TINY).state_dict().keys() == unet.state_dict().keys()
    assert torch.equal(  # the weights come from cfg.seed alone
        build_ddpm(TINY).conv_in.weight, build_ddpm(TINY).conv_in.weight
    )
    sched = ddpm_scheduler(TINY)
    assert sched.config.num_train_timesteps == 1000 and sched.betas[0] == pytest.approx(1e-4)
    assert sched.betas[-1] == pytest.approx(0.02)


def test_corrupted_or_mismatched_checkpoint(tmp_path):
    save_ddpm(tmp_path / "d", build_ddpm(TINY), TINY)
    side = tmp_path / "d.json"
    meta = json.loads(side.read_text())
    meta["config"]["block_out_channels"] = [8, 24]  # weights of another UNet
    side.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"d does not match its DDPM config"):
        load_ddpm(tmp_path / "d")
    meta["config"]["block_out_channels"] = [8, 12]  # groups do not divide
    side.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="no valid DDPM config"):
        load_ddpm(tmp_path / "d")
    path = save_ddpm(tmp_path / "d", build_ddpm(TINY), TINY)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path}.*corrupted"):
        load_ddpm(tmp_path / "d")
    save_checkpoint(tmp_path / "m", "made", {"w": torch.zeros(2)}, {})
    with pytest.raises(CheckpointError, match="expected 'ddpm'"):
        load_ddpm(tmp_path / "m")


def test_sample_loop_ddim():
    from diffusers import DDIMScheduler

    unet = build_ddpm(TINY).eval()
    ddim = DDIMScheduler.from_config(ddpm_scheduler(TINY).config)
    a = sample_ddpm(unet, ddim, 3, torch.Generator().manual_seed(0), num_inference_steps=3)
    b = sample_ddpm(unet, ddim, 3, torch.Generator().manual_seed(0), 3, batch=2)
    assert a.shape == (3, 1, 28, 28) and a.abs().max() <= 1
    assert torch.allclose(a, b, atol=1e-5)


def _train(tmp_path, data, stem, *extra, sets=()):
    sets = [*TINY_SETS, "data=fashion-mnist", f"data_dir={data}", f"save_to={tmp_path / stem}",
            *sets]  # fmt: skip
    args = ["train", "ddpm", "--device", "cpu", "--out", str(tmp_path / "runs")]
    return main(args + [a for s in sets for a in ("--set", s)] + list(extra))


def test_trainer_refuses_overwrite_and_resumes(tmp_path, monkeypatch):
    import ffsolve.training as dt

    data = idx_folder(tmp_path / "fmnist", 10, 4)  # 3 batches of 4 a epoch: the order wraps
    sets = ["max_steps=4", "save_every_minutes=1e-9"]  # a resumable save after every step
    assert _train(tmp_path, data, "straight", sets=sets) == 0
    meta = json.loads((tmp_path / "straight.json").read_text())
    assert meta["kind"] == "ddpm" and meta["steps"] == 4 and meta["storage_dtype"] == "float16"
    assert np.isfinite(meta["test_denoising_loss"]) and meta["num_params"] > 0
    assert not (tmp_path / "straight.resume.pt").exists()  # finished: nothing to resume
    (run,) = (tmp_path / "runs" / "ddpm").iterdir()
    rec = json.loads((run / "records.json").read_text())
    assert [h["step"] for h in rec["history"]] == [0, 1, 2, 3, 4] and rec["device"] == "cpu"
    assert _train(tmp_path, data, "straight", sets=sets) == 2  # not overwritten silently
    assert _train(tmp_path, data, "none", "--resume") == 2  # nothing to resume
    # killed after the save at step 2, resumed: the same weights as a run never stopped
    save, calls = dt.save_train_state, []

    def killed_after_second_save(*args, **kwargs):
        save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(dt, "save_train_state", killed_after_second_save)
    assert _train(tmp_path, data, "split", sets=sets) == 130
    assert (tmp_path / "split.resume.pt").is_file() and not (tmp_path / "split.json").exists()
    monkeypatch.setattr(dt, "save_train_state", save)
    assert _train(tmp_path, data, "split", "--resume", sets=sets) == 0
    assert not (tmp_path / "split.resume.pt").exists()
    a, b = load_file(tmp_path / "straight.safetensors"), load_file(tmp_path / "split.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trainer_nan_loss_fails_without_checkpoint(tmp_path, capsys):
    data = idx_folder(tmp_path / "fmnist", 8, 4)
    assert _train(tmp_path, data, "nan", sets=["max_steps=3", "lr=1e30"]) == 2
    assert "training diverged" in capsys.readouterr().err
    assert not list(tmp_path.glob("nan*"))


def test_fid_identical_and_shifted():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(
        6, 6, generator=g, dtype=torch.float64
    )
    assert fid(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = torch.full((6,), 0.5, dtype=torch.float64)
    assert fid(a, a + shift) == pytest.approx(6 * 0.25, rel=1e-6)  # covariances equal
    b = torch.randn(500, 6, generator=g, dtype=torch.float64) * 2.0
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    root = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()  # eigenvalues of S1 S2
    mu = (a.mean(0) - b.mean(0)).numpy()
    expected = mu @ mu + np.trace(s1) + np.trace(s2) - 2 * root
    assert fid(a, b) == pytest.approx(expected, rel=1e-6) and fid(a, b) > 0
    with pytest.raises(ValueError, match="dimensions differ"):
        fid(a, b[:, :5])


def test_features_of_the_shipped_densenet():
    net = load_feature_net()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 28, 28)).astype(np.uint8)
    f8 = features(net, pixels)
    ff = features(net, torch.from_numpy(pixels).float()[:, None] / 127.5 - 1)
    assert f8.shape == (5, net.dims) == (5, 342) and f8.dtype == torch.float64
    assert torch.allclose(f8, ff, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        features(net, torch.full((2, 28, 28), 3.0))
