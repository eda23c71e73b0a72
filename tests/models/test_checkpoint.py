import json

import pytest
import torch

from ffsolve.checkpoint import load_checkpoint, save_checkpoint
from ffsolve.errors import CheckpointError


def test_roundtrip_and_errors(tmp_path):
    t = {"w": torch.randn(3, 4), "mask": torch.ones(4, dtype=torch.bool)}
    path = save_checkpoint(tmp_path / "m", "made", t, {"hidden": [8]})
    tensors, meta = load_checkpoint(path, "made")
    assert torch.equal(tensors["w"], t["w"]) and meta["config"] == {"hidden": [8]}
    with pytest.raises(CheckpointError, match="expected 'pixelcnn'"):
        load_checkpoint(tmp_path / "m", "pixelcnn")
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "other", "made")
    # corrupt one byte of the tensors
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path, "made")
    side = tmp_path / "m.json"
    meta = json.loads(side.read_text())
    meta["format_version"] = 99
    side.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path, "made")
    side.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path, "made")


def test_train_state_refuses_other_training_settings(tmp_path):
    import pytest
    import torch

    from ffsolve.checkpoint import load_train_state, save_train_state
    from ffsolve.errors import CheckpointError, ConfigError

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "m.resume.pt"
    g = torch.Generator().manual_seed(5)
    torch.rand(3, generator=g)
    save_train_state(path, model, opt, None, 3, config={"lr": 0.1, "hidden": 8}, generator=g)
    expected = torch.rand(4, generator=g)  # what the data generator draws next
    g2 = torch.Generator().manual_seed(0)
    state = load_train_state(path, model, opt, config={"lr": 0.1, "hidden": 8}, generator=g2)
    assert state["epoch"] == 3
    assert torch.equal(torch.rand(4, generator=g2), expected)  # the generator resumes too
    with pytest.raises(ConfigError, match="other values of: hidden"):
        load_train_state(path, model, opt, config={"lr": 0.1, "hidden": 16})
    save_train_state(path, model, opt, None, 3)  # saved without a generator
    with pytest.raises(CheckpointError, match="no data generator state"):
        load_train_state(path, model, opt, generator=g2)


def test_an_explicit_commit_wins_over_the_checkout(monkeypatch):
    import torch

    from ffsolve.runs import environment

    monkeypatch.setenv("FFSOLVE_COMMIT", "abc1234")
    assert environment(torch.device("cpu"))["commit"] == "abc1234"
    monkeypatch.delenv("FFSOLVE_COMMIT")
    assert environment(torch.device("cpu"))["commit"] != "abc1234"
