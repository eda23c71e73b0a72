"""Every Python snippet in the README and docs/ runs as written, and docs/problems.md's worked
example (a new problem family as new files only) runs end to end from the command line."""

import importlib.util
import re
import warnings
from pathlib import Path

import pytest

import ffsolve.experiments as registry
from ffsolve import ConvergenceWarning
from ffsolve.cli import main

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


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


def test_new_problem_family_runs_from_the_command_line(clean_registry, tmp_path, capsys):
    doc = ROOT / "docs" / "problems.md"
    namespace: dict = {"__name__": "ffsolve_docs_ar_process"}
    for code in blocks(doc, "python"):
        exec(compile(code, doc.name, "exec"), namespace)
    assert "ar-process" in registry.EXPERIMENTS  # registered by the module alone
    (yaml_text,) = blocks(doc, "yaml")
    config = tmp_path / "ar_process.yaml"
    config.write_text(yaml_text)
    argv = ["run", "ar-process", "--config", str(config), "--set", "length=300"]
    assert main([*argv, "--device", "cpu", "--out", str(tmp_path / "runs"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "jacobi" in out and "gs_jacobi(window=128)" in out
    (run_dir,) = (tmp_path / "runs" / "ar-process").iterdir()
    assert (run_dir / "records.json").is_file()
