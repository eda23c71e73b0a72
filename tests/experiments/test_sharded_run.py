"""`ffsolve run sharded` at tiny sizes on the CPU: in one process (with the sequential
baseline), and as 2 gloo processes started the way torchrun starts them (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR / MASTER_PORT), where only rank 0 makes a run folder and its records
agree with the single-process ones."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import ffsolve
from ffsolve.cli import main

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config", str(ROOT / "configs" / "sharded_tiny.yaml"),
        "--set", f"checkpoint={ROOT / 'checkpoints' / 'ddpm_mnist'}"]  # fmt: skip
CASES = {
    "ddim-10": {"picard(window=4)", "anderson(window=4)"},
    "gru-forward-T200": {"jacobi"},
    "gru-forward-T64": {"quasi_newton", "newton"},
    "gru-adjoint-T64": {"scan"},
}


def _rows(run_dir: Path) -> dict[tuple[str, str], dict]:
    rec = json.loads((run_dir / "records.json").read_text())
    return rec, {(r["case"], r["method"]): r for r in rec["rows"]}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The records of one process (world size 1)."""
    out = tmp_path_factory.mktemp("single")
    assert main(["run", "sharded", "--device", "cpu", "--out", str(out), "--quiet", *TINY]) == 0
    (run,) = (out / "sharded").iterdir()
    return _rows(run)


def test_one_process_runs_every_case_with_its_baseline(single):
    rec, rows = single
    assert rec["world_size"] == 1 and rec["backend"] is None
    assert {"device_name", "torch", "commit"} <= set(rec["env"])
    for case, methods in CASES.items():
        assert {m for c, m in rows if c == case} == {"sequential", *methods}, case
        for method in methods:
            row = rows[case, method]
            assert row["time_s"] > 0 and row["iters"] >= 1 and row["world_size"] == 1
            if case.startswith("gru"):  # stopped at atol 1e-5 on a contracting cell
                assert row["converged"] and row["max_diff"] < 1e-4, (case, method)
    assert rows["gru-adjoint-T64", "scan"]["iters"] == 1
    assert rows["gru-forward-T200", "sequential"]["iters"] == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_write_one_run_that_agrees(tmp_path, single):
    _, want = single
    out = tmp_path / "runs"
    port = _free_port()
    src = str(Path(ffsolve.__file__).resolve().parents[1])  # the ffsolve this test imported

    path = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])

    def env(rank: int) -> dict[str, str]:  # what torchrun sets
        return {**os.environ, "PYTHONPATH": path, "RANK": str(rank), "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1"}  # fmt: skip

    argv = [sys.executable, "-m", "ffsolve", "run", "sharded", "--device", "cpu", "--out",
            str(out), "--quiet", *TINY]  # fmt: skip
    procs = [
        subprocess.Popen(argv, env=env(r), cwd=str(tmp_path), stdout=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    try:
        stdout = [p.communicate(timeout=300)[0] for p in procs]
    finally:  # a rank that failed leaves the other waiting in a collective (torchrun kills it)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0]
    assert "x 2 processes" in stdout[0] and stdout[1] == ""  # only rank 0 prints
    (run,) = (out / "sharded").iterdir()  # only rank 0 makes a run folder
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]
    rec, got = _rows(run)
    assert rec["world_size"] == 2 and rec["backend"] == "gloo"
    assert set(got) == {k for k in want if k[1] != "sequential"}  # no baseline when sharded
    for key, row in got.items():
        ref = want[key]
        # the same sweeps and the same distance from the sequential answer, to rounding (a
        # rank evaluates fewer positions: other shapes, other kernels)
        assert row["iters"] == ref["iters"], key
        for k in ("max_diff", "max_diff_last"):
            assert abs(row[k] - ref[k]) <= 1e-5 * max(1.0, ref[k]), (key, k, row[k], ref[k])


def test_an_experiment_of_one_process_is_refused_under_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code = main(["run", "causal-net", "--device", "cpu", "--out", str(tmp_path)])
    assert code == 2
    assert "without torchrun" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
