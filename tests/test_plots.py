"""Figures from a run directory: real PNGs, layer kinds in their colours, gaps tolerated,
and plots.py runs in an interpreter that never imports TensorFlow."""
import json
import os
import subprocess
import sys

import matplotlib.colors
import matplotlib.image
import numpy as np

from tf_stdprune import plots

import synthetic_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def has_colour(image, name):
    """Whether some pixel of ``image`` (RGB(A) floats) is the matplotlib colour ``name``."""
    rgb = np.array(matplotlib.colors.to_rgb(name))
    return bool(np.any(np.all(np.abs(image[..., :3] - rgb) < 1.5 / 255, axis=-1)))


def check_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert os.path.getsize(path) > 8_000
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height >= 400 and width >= 600


def test_five_figures_with_layer_kinds_in_their_colours(tmp_path):
    synthetic_run.write(str(tmp_path))
    paths = plots.write_figures(str(tmp_path))
    assert [os.path.basename(p) for p in paths] == list(plots.FIGURES)
    for path in paths:
        check_png(path)
    assert sorted(os.listdir(tmp_path / "figures")) == sorted(plots.FIGURES)  # no temporaries
    layers = matplotlib.image.imread(paths[3])
    assert all(has_colour(layers, plots.KIND_COLOURS[kind]) for kind in ("conv", "bn", "dense"))

    report = json.loads((tmp_path / "report.json").read_text())
    report["layers"] = [l for l in report["layers"] if l["kind"] != "bn"]
    (tmp_path / "report.json").write_text(json.dumps(report))
    layers = matplotlib.image.imread(plots.write_figures(str(tmp_path))[3])
    assert has_colour(layers, plots.KIND_COLOURS["conv"])
    assert not has_colour(layers, plots.KIND_COLOURS["bn"])


def test_records_without_metrics_or_quality_still_plot(tmp_path):
    """No validation data, an iteration that did not prune, no baseline or report yet."""
    synthetic_run.write(str(tmp_path))
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    for record in history:
        record["before"], record["after"] = {}, {}
    history[-1]["q"] = None
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    os.remove(tmp_path / "baseline.json")
    os.remove(tmp_path / "report.json")
    for path in plots.write_figures(str(tmp_path)):
        with open(path, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE


def test_plots_run_without_tensorflow(tmp_path):
    synthetic_run.write(str(tmp_path))
    os.remove(tmp_path / "baseline.json")
    package = os.path.dirname(plots.__file__)
    code = (  # tf_stdprune's own modules only, without the package's __init__
        "import importlib.util, sys, types\n"
        "package = types.ModuleType('tf_stdprune')\n"
        f"package.__path__ = [{package!r}]\n"
        "sys.modules['tf_stdprune'] = package\n"
        f"spec = importlib.util.spec_from_file_location('plots', {plots.__file__!r})\n"
        "plots = importlib.util.module_from_spec(spec); spec.loader.exec_module(plots)\n"
        f"plots.write_figures({str(tmp_path)!r})\n"
        "assert 'tensorflow' not in sys.modules, 'plots.py imported TensorFlow'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in plots.FIGURES:
        check_png(tmp_path / "figures" / name)


def test_an_unbounded_compression_rate_is_left_out_of_figure_3(tmp_path):
    """A last iteration with every weight pruned records compression_rate null: the
    figures are still written, and Figure 3 is the one drawn without that point."""
    synthetic_run.write(str(tmp_path))
    history = tmp_path / "history.jsonl"
    records = [json.loads(line) for line in history.read_text().splitlines()]
    history.write_text("".join(json.dumps(r) + "\n" for r in records[:-1]))
    plots.write_figures(str(tmp_path))
    without = matplotlib.image.imread(tmp_path / "figures" / plots.FIGURES[2])
    records[-1]["compression_rate"] = None
    history.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
    for path in plots.write_figures(str(tmp_path)):
        check_png(path)
    with_null = matplotlib.image.imread(tmp_path / "figures" / plots.FIGURES[2])
    np.testing.assert_array_equal(with_null, without)


def test_a_directory_in_place_of_a_figure_is_kept(tmp_path):
    synthetic_run.write(str(tmp_path))
    blocker = tmp_path / "figures" / plots.FIGURES[0]
    blocker.mkdir(parents=True)
    (blocker / "notes.txt").write_text("the user's")
    try:
        plots.write_figures(str(tmp_path))
    except IsADirectoryError as error:
        assert "Refusing to replace the directory" in str(error)
    else:
        raise AssertionError("a directory was replaced by a figure")
    assert (blocker / "notes.txt").read_text() == "the user's"
