"""``python -m tf_stdprune report RUN_DIR`` and the ``tf-stdprune`` console script."""
import os
import subprocess
import sys
from importlib import metadata

import pytest

from tf_stdprune import __main__ as cli
from tf_stdprune import plots

import synthetic_run


def test_module_command_prints_the_report_and_redraws_the_figures(tmp_path):
    history, _ = synthetic_run.write(str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "tf_stdprune", "report", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    parameters = sum(total + extra for _, _, total, extra in synthetic_run.LAYERS)
    weights = sum(total for _, _, total, _ in synthetic_run.LAYERS)
    zeros = sum(int(0.86 * total) for _, kind, total, _ in synthetic_run.LAYERS if kind != "bn")
    lines = result.stdout.splitlines()
    assert lines[:4] == ["Final Parameters:", f"total parameters: {parameters},",
                         f"Total weights: {weights},", f"Zero weights: {zeros},"]
    assert f"Compression rate: x{parameters / (parameters - zeros):.8f} times" in lines
    rows = [line.split() for line in lines if line.split()[:1] in (["1"], ["2"], ["3"], ["4"])]
    assert [row[:2] for row in rows] == [["1", "0.5"], ["2", "1"], ["3", "1.5"], ["4", "0"]]
    assert [float(row[-1]) for row in rows] == pytest.approx(
        [100 * r["after"]["val_top1"] for r in history], abs=0.01)
    for name in plots.FIGURES:
        assert os.path.getsize(tmp_path / "figures" / name) > 8_000


def test_console_script_is_the_cli():
    (script,) = [e for e in metadata.entry_points(group="console_scripts") if e.name == "tf-stdprune"]
    assert script.load() is cli.main


def test_a_directory_without_a_run_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "missing report.json, history.jsonl" in capsys.readouterr().err
