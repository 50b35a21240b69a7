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


def _damage_history(run_dir):
    """Replaces line 2 of history.jsonl by garbage and appends a record without fields."""
    path = os.path.join(run_dir, "history.jsonl")
    with open(path) as f:
        lines = f.readlines()
    lines[1] = "{garbage\n"
    lines.append('{"iteration": 5}\n')
    with open(path, "w") as f:
        f.writelines(lines)


def _rows(stdout):
    return [line.split()[:2] for line in stdout.splitlines()
            if line.split()[:1] in (["1"], ["2"], ["3"], ["4"], ["5"])]


def test_garbage_history_lines_are_named_and_the_rest_reported(tmp_path, capsys):
    synthetic_run.write(str(tmp_path))
    _damage_history(str(tmp_path))
    code, captured = _report(capsys, tmp_path)
    assert code == 1
    assert "Final Parameters:" in captured.out
    assert _rows(captured.out) == [["1", "0.5"], ["3", "1.5"], ["4", "0"]]
    assert "history.jsonl, line 2: not an iteration record: '{garbage'" in captured.err
    assert "line 5: not an iteration record" in captured.err
    for name in plots.FIGURES:
        assert os.path.getsize(tmp_path / "figures" / name) > 8_000


def _report(capsys, run_dir, *options):
    """The exit code of ``report RUN_DIR OPTIONS`` and its captured output."""
    return cli.main(["report", str(run_dir), *options]), capsys.readouterr()


def _report_with(capsys, run_dir, name, text):
    """`_report` of a synthetic run whose file ``name`` holds ``text``."""
    synthetic_run.write(str(run_dir))
    (run_dir / name).write_text(text)
    return _report(capsys, run_dir)


def test_an_unwritable_figures_directory_writes_no_figures_but_prints_the_report(tmp_path, capsys):
    code, captured = _report_with(capsys, tmp_path, "figures", "a file where the figures would go")
    assert code == 1
    assert "Final Parameters:" in captured.out and len(_rows(captured.out)) == 4
    assert "wrote no figures" in captured.err and "--figures_dir" in captured.err
    assert (tmp_path / "figures").read_text() == "a file where the figures would go"
    assert cli.main(["report", str(tmp_path), f"--figures_dir={tmp_path / 'elsewhere'}"]) == 0
    assert sorted(os.listdir(tmp_path / "elsewhere")) == sorted(plots.FIGURES)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_run_directory_is_reported_without_figures(tmp_path, capsys):
    run_dir = tmp_path / "run"
    synthetic_run.write(str(run_dir))
    os.chmod(run_dir, 0o555)
    try:
        assert cli.main(["report", str(run_dir)]) == 1
    finally:
        os.chmod(run_dir, 0o755)
    captured = capsys.readouterr()
    assert len(_rows(captured.out)) == 4 and "wrote no figures" in captured.err
    assert not (run_dir / "figures").exists()


def test_an_unreadable_report_json_is_named_and_the_history_still_printed(tmp_path, capsys):
    code, captured = _report_with(capsys, tmp_path, "report.json", "{not json")
    assert code == 1
    assert "report.json: unreadable" in captured.err and len(_rows(captured.out)) == 4
