"""Every Python snippet in the README and docs/ runs as written, and docs/problems.md's worked
example (a new problem family as new files only) runs end to end from the command line, each
block saved as the file the page names."""

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import ffsolve.experiments as registry
from ffsolve import ConvergenceWarning
from ffsolve.cli import main

ROOT = Path(__file__).resolve().parents[2]
PROBLEMS = ROOT / "docs" / "problems.md"
# problems.md's blocks are files of a package, not one script: its own test below saves them
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p != PROBLEMS)]


def blocks(path: Path, lang: str) -> list[str]:
    """The fenced code blocks of one language in a markdown file, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", path.read_text(), flags=re.S | re.M)


@pytest.fixture
def clean_registry():
    """Experiments a snippet registers are gone afterwards."""
    before = dict(registry.EXPERIMENTS)
    yield
    registry.EXPERIMENTS.clear()
    registry.EXPERIMENTS.update(before)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_snippets_run(path, clean_registry, monkeypatch, tmp_path):
    """One namespace per file, blocks in order (a later block may use an earlier one's
    names), from the repository root (snippets name shipped checkpoints)."""
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    warnings.simplefilter("ignore", ConvergenceWarning)  # a snippet may stop early on purpose
    for i, code in enumerate(blocks(path, "python")):
        first = code.splitlines()[0]
        if first.startswith("# needs: "):  # an optional extra (make lm): run where installed
            module = first.removeprefix("# needs: ").split()[0]
            if importlib.util.find_spec(module) is None:
                continue
        try:
            exec(compile(code, f"{path.name}[python block {i}]", "exec"), namespace)
        except Exception as e:  # say which block, then fail
            raise AssertionError(f"{path.name}, python block {i} fails: {e!r}") from e


def saved_as(code: str) -> str | None:
    """The file a block is saved as, named by its first line (`# src/ffsolve/...py`)."""
    first = code.splitlines()[0]
    m = re.fullmatch(r"# ((?:src|configs)/\S+\.(?:py|yaml))", first)
    return m.group(1) if m else None


def test_new_problem_family_runs_from_the_command_line(tmp_path):
    """A copy of the package plus the page's files, each block saved where the page says (no
    shared namespace: a block that forgets an import fails here as it would for a user); the
    other blocks run as scripts, then the experiment from the command line."""
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    files, scripts = {}, []
    for lang in ("python", "yaml"):
        for code in blocks(PROBLEMS, lang):
            path = saved_as(code)
            if path is not None:
                files[path] = code
            elif lang == "python":
                scripts.append(code)
    assert set(files) == {
        "src/ffsolve/problems/ar_process.py",
        "src/ffsolve/experiments/ar_process.py",
        "configs/ar_process.yaml",
    }
    for path, code in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(code)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src"), "OMP_NUM_THREADS": "1"}

    def python(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, f"{args}: {done.stderr}"
        return done.stdout

    outs = []
    for i, code in enumerate(scripts):  # the usage example
        (tmp_path / f"snippet_{i}.py").write_text(code)
        outs.append(python(f"snippet_{i}.py"))
    assert any("sweeps instead of" in out for out in outs)
    argv = ["run", "ar-process", "--config", "configs/ar_process.yaml", "--set", "length=300"]
    out = python("-m", "ffsolve", *argv, "--device", "cpu", "--out", "runs", "--quiet")
    assert "jacobi" in out and "gs_jacobi(window=128)" in out
    (run_dir,) = (tmp_path / "runs" / "ar-process").iterdir()
    assert (run_dir / "records.json").is_file()


def test_readme_plot_command_works_on_a_fresh_run(tmp_path, monkeypatch, capsys):
    """The README's `ffsolve plot runs/causal-net/<timestamp> ...` on a run just made (which
    has drawn its figures already) does what its comment says."""
    monkeypatch.chdir(tmp_path)
    sets = ["length=6", "channels=1", "hidden=4", "batch=1", "block_size=2", "window=3"]
    argv = ["run", "causal-net", *[x for s in sets for x in ("--set", s)], "--quiet"]
    assert main([*argv, "--device", "cpu"]) == 0
    (run_dir,) = (tmp_path / "runs" / "causal-net").iterdir()
    (command,) = re.findall(r"^ffsolve (plot .*?)\s+#", (ROOT / "README.md").read_text(), re.M)
    argv = shlex.split(command.replace("<timestamp>", run_dir.name))
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    drawn = [Path(line.removeprefix("figure: ")) for line in capsys.readouterr().out.splitlines()]
    assert drawn and all(p.is_file() for p in drawn)


def test_readme_says_where_the_commands_are():
    """`make` installs the `ffsolve` command into .venv/bin/, which is not on a fresh shell's
    PATH: the README says so right after the make block, before the first `ffsolve` command."""
    readme = (ROOT / "README.md").read_text()
    assert 'ffsolve = "ffsolve.cli:main"' in (ROOT / "pyproject.toml").read_text()
    where = readme.index(". .venv/bin/activate")
    assert readme.index("make test") < where < readme.index("```bash\nffsolve ")
