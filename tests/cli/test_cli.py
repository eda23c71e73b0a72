import json
from dataclasses import dataclass

import pytest

from ffsolve.cli import main
from ffsolve.config import load_config
from ffsolve.errors import ConfigError


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "causal-net" in out and "jacobi_gs" in out


def test_run_writes_records_and_plot_redraws(tmp_path, capsys):
    args = ["run", "causal-net", "--device", "cpu", "--out", str(tmp_path)]
    sets = ["length=24", "channels=2", "hidden=32", "batch=2", "block_size=4", "window=5"]
    for s in [*sets, "repeats=1", "dtype=float64"]:
        args += ["--set", s]
    assert main(args) == 0
    (run_dir,) = (tmp_path / "causal-net").iterdir()
    rec = json.loads((run_dir / "records.json").read_text())
    assert rec["experiment"] == "causal-net"
    assert rec["env"]["torch"] and rec["env"]["device_name"] and rec["env"]["commit"]
    assert rec["config"]["length"] == 24
    methods = {m["method"]: m for m in rec["methods"]}
    assert set(methods) >= {"sequential", "jacobi"}
    for m in methods.values():
        for key in ("num_iters", "num_evals", "wall_time_s", "speedup_vs_sequential"):
            assert key in m
        assert m["max_abs_diff_vs_sequential"] == 0.0
    assert (run_dir / "config.yaml").is_file() and (run_dir / "env.json").is_file()
    png = run_dir / "convergence.png"
    assert png.is_file()
    png.unlink()
    assert main(["plot", str(run_dir)]) == 0
    assert png.is_file()
    assert "speed-up" in capsys.readouterr().out


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["run", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ffsolve: error: unknown experiment") and "causal-net" in err
    assert main(["run", "causal-net", "--set", "bogus=1", "--out", str(tmp_path)]) == 2
    assert "unknown config field(s) bogus" in capsys.readouterr().err
    assert main(["run", "causal-net", "--set", "length=abc", "--out", str(tmp_path)]) == 2
    assert "expected int" in capsys.readouterr().err
    assert main(["run", "causal-net", "--config", str(tmp_path / "x.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2
    assert "no records.json" in capsys.readouterr().err
    assert main(["train", "nothing", "--out", str(tmp_path)]) == 2
    capsys.readouterr()
    missing = ["--set", "data=cifar10", "--out", str(tmp_path / "t")]
    assert main(["train", "made", *missing]) == 2
    assert "cifar-10-batches-py" in capsys.readouterr().err
    assert not any((tmp_path / "t" / "made").iterdir())  # no empty run directory left


@dataclass(frozen=True)
class _Cfg:
    n: int = 1
    lr: float = 0.1
    sizes: tuple[int, ...] = (1, 2)
    name: str | None = None


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("n: 3\nlr: 1\nsizes: [4, 5]\n")
    cfg = load_config(_Cfg, f, ["name=abc", "n=7"])
    assert cfg == _Cfg(n=7, lr=1.0, sizes=(4, 5), name="abc")
    assert load_config(_Cfg, None, ["lr=1e-7"]).lr == 1e-7
    with pytest.raises(ConfigError, match="expected float"):
        load_config(_Cfg, None, ["lr=fast"])
    with pytest.raises(ConfigError, match="valid: lr, n, name, sizes"):
        load_config(_Cfg, None, ["m=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(_Cfg, None, ["n"])
    with pytest.raises(ConfigError, match="expected a list"):
        load_config(_Cfg, None, ["sizes=3"])
    f.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_Cfg, f)
