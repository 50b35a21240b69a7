"""examples/vgg19_cifar10.py end to end: a tiny quick-preset run, and MirroredStrategy.

The CLI run happens in-process through the example's absl ``main``; the mirrored run in a
subprocess, since logical CPU devices must be configured before TensorFlow starts.
"""
import contextlib
import io
import json
import os
import re
import subprocess
import sys

from absl import app, flags
import numpy as np
import pytest
import tensorflow as tf

from tf_stdprune import data, sparsity_report
from tf_stdprune._keras import keras
from tf_stdprune.run_state import read_history

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples")
sys.path.insert(0, EXAMPLES)
import vgg19_cifar10 as example  # noqa: E402

TINY = ["--preset=quick", "--width=0.05", "--iterations=2", "--epochs_per_iteration=1",
        "--baseline_epochs=1", "--max_train_examples=128", "--batch_size=32",
        "--qualities=0.5,1.0", "--recalibration_batches=2", "--export_sparse", "--compress",
        "--quantize_bits=4", "--quantize_epochs=1"]


@contextlib.contextmanager
def _flags(*argv):
    """The example's absl flags parsed from ``argv``, reset on exit."""
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["vgg19_cifar10.py", *argv])
    try:
        yield
    finally:
        flags.FLAGS.unparse_flags()


def _main(out_dir):
    with _flags(f"--out_dir={out_dir}", *TINY), \
            contextlib.redirect_stdout(io.StringIO()) as stdout:
        example.main(["vgg19_cifar10.py"])
    return stdout.getvalue()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("example")
    return out_dir, _main(out_dir)


def _summary(out_dir):
    rows = re.findall(r"^\| ([^|]+) \| ([^|]+) \|$", (out_dir / "summary.md").read_text(), re.M)
    return {name.strip(): value.strip() for name, value in rows}


def _normalised_digits_test_set():
    _, _, info = data.digits(max_train_examples=128)  # the run's normalisation statistics
    _, _, x_test, y_test = data.digits_arrays()
    return (x_test - info.mean[0]) / info.std[0], y_test


def test_outputs_written(finished):
    out_dir, stdout = finished
    for path in ("baseline/weights.h5", "baseline/metrics.json", "run/history.jsonl",
                 "run/report.json", "final/model.keras", "final/model.h5",
                 "final/saved_model/saved_model.pb", "final/sparse_saved_model/saved_model.pb",
                 "final/model.tfspz", "summary.md"):
        assert (out_dir / path).exists(), path
    assert not [p for p in os.listdir(out_dir / "final") if p.startswith(".tmp")]
    history = read_history(str(out_dir / "run"))
    assert [r["iteration"] for r in history] == [1, 2] and [r["q"] for r in history] == [0.5, 1.0]
    assert "Final Parameters:" in stdout and "| zero weights |" in stdout


def test_summary_agrees_with_saved_model(finished):
    out_dir, _ = finished
    summary = _summary(out_dir)
    for name in ("model.keras", "model.h5"):
        report = sparsity_report(keras.models.load_model(out_dir / "final" / name))
        assert int(summary["total parameters"]) == report.total_parameters
        assert int(summary["total weights"]) == report.total_weights
        assert int(summary["zero weights"]) == report.zero_weights > 0
        assert float(summary["zero weights rate (%)"]) == pytest.approx(
            report.zero_weights_rate, abs=1e-4)
        assert float(summary["compression rate"].lstrip("x")) == pytest.approx(
            report.compression_rate, abs=1e-4)
    assert read_history(str(out_dir / "run"))[-1]["zero_weights"] == report.zero_weights
    for name in ("model.keras", "model.h5", "saved_model", "sparse_saved_model", "model.tfspz"):
        path = out_dir / "final" / name
        files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
        size, _ = summary[f"size of final/{name} (bytes, gzip bytes)"].split(", ")
        assert int(size) == sum(f.stat().st_size for f in files)


def test_summary_accuracies_match_reevaluation(finished):
    out_dir, _ = finished
    summary = _summary(out_dir)
    metrics = json.loads((out_dir / "baseline/metrics.json").read_text())
    assert float(summary["dense top-1 (%)"]) == pytest.approx(100 * metrics["top1"], abs=0.006)
    x_test, y_test = _normalised_digits_test_set()
    model = keras.models.load_model(out_dir / "final" / "model.keras")
    logits = model.predict(x_test, verbose=0)
    top1 = 100 * np.mean(np.argmax(logits, axis=1) == y_test)
    # With --quantize_bits the saved model is the fine-tuned shared-weight one.
    assert float(summary["top-1 after centroid fine-tuning (%)"]) == pytest.approx(top1, abs=0.006)
    for name in ("saved_model", "sparse_saved_model"):
        serve = tf.saved_model.load(str(out_dir / "final" / name)).signatures["serving_default"]
        (input_name,) = serve.structured_input_signature[1]
        (served,) = serve(**{input_name: tf.constant(x_test[:8])}).values()
        np.testing.assert_allclose(served, logits[:8], atol=1e-4)


def test_quantize_bits_shares_weights_and_keeps_zeros(finished):
    out_dir, stdout = finished
    summary = _summary(out_dir)
    assert 0 <= float(summary["top-1 after clustering (%)"]) <= 100
    model = keras.models.load_model(out_dir / "final" / "model.keras")
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            kernel = layer.kernel.numpy()
            assert len(np.unique(kernel[kernel != 0])) <= 2 ** 4, layer.name
    history = read_history(str(out_dir / "run"))
    assert sparsity_report(model).zero_weights == history[-1]["zero_weights"]
    assert (out_dir / "final" / "compression_stages.png").stat().st_size > 10_000
    assert "pruning+quantization+huffman" in stdout  # the compression report was printed


MIRRORED_WORKER = """
import sys
sys.path.insert(0, sys.argv[1])
import vgg19_cifar10 as example
example.split_cpu(2)  # before TensorFlow initialises its devices

import numpy as np
import tf_stdprune
from tf_stdprune._keras import keras
from tf_stdprune.prune import all_layers


def tiny(num_classes, width, input_shape):
    return keras.Sequential([
        keras.Input(input_shape), keras.layers.Conv2D(6, 3, strides=4),
        keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.Flatten(),
        keras.layers.Dense(num_classes)])


example.FLAGS(["vgg19_cifar10.py", "--out_dir=" + sys.argv[2], "--max_train_examples=64",
               "--batch_size=16", "--iterations=2", "--epochs_per_iteration=1",
               "--baseline_epochs=1", "--qualities=0.5,1.0", "--recalibration_batches=2"])
strategy = example.make_strategy("mirrored")
assert strategy.num_replicas_in_sync == 2, strategy.extended.worker_devices
pruned, _ = example.run(example.config(), strategy, build_model=tiny)
arrays = {}
for layer in all_layers(pruned):
    if isinstance(layer, tf_stdprune.PruneLowStd):
        for i, (weight, mask, _) in enumerate(layer.pruning_vars):
            for kind, variable in (("mask", mask), ("weight", weight)):
                arrays[f"{layer.name}/{i}/{kind}"] = np.stack([np.asarray(v) for v in variable.values])
np.savez(sys.argv[3], **arrays)
"""


def test_mirrored_strategy_keeps_masks_identical_on_both_replicas(tmp_path):
    arrays_path = tmp_path / "replicas.npz"
    process = subprocess.run(
        [sys.executable, "-c", MIRRORED_WORKER, EXAMPLES, str(tmp_path / "out"), str(arrays_path)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    arrays = np.load(arrays_path)
    masks = [k for k in arrays.files if k.endswith("/mask")]
    assert len(masks) == 3  # conv kernel, BN gamma, dense kernel
    pruned = 0
    for key in masks:
        replicas, weights = arrays[key], arrays[key.replace("/mask", "/weight")]
        assert replicas.shape[0] == 2, key
        np.testing.assert_array_equal(replicas[0], replicas[1], err_msg=key)
        np.testing.assert_array_equal(weights[0], weights[1], err_msg=key)
        assert np.all(weights[:, replicas[0] == 0] == 0.0), key
        pruned += int(np.sum(replicas[0] == 0))
    assert pruned > 0
    history = read_history(str(tmp_path / "out" / "run"))
    assert [r["q"] for r in history] == [0.5, 1.0]
    assert history[-1]["zero_weights"] >= pruned
    assert (tmp_path / "out" / "summary.md").exists()


def _config(*argv):
    with _flags(*argv):
        return example.config()


def test_quick_preset_runs_every_compression_stage_and_flags_turn_them_off():
    quick = _config("--preset=quick")
    assert (quick["quantize_bits"], quick["export_sparse"], quick["compress"]) == (5, True, True)
    off = _config("--preset=quick", "--quantize_bits=0", "--noexport_sparse", "--nocompress")
    assert (off["quantize_bits"], off["export_sparse"], off["compress"]) == (None, False, False)
    paper = _config("--preset=paper", "--quantize_bits=8")
    assert (paper["quantize_bits"], paper["export_sparse"], paper["compress"]) == (8, False, False)


def _files(out_dir):
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}


def test_resume_with_another_seed_is_refused_before_anything_changes(finished):
    out_dir, _ = finished
    before = _files(out_dir)
    with _flags(f"--out_dir={out_dir}", *TINY, "--seed=1"), \
            pytest.raises(app.UsageError, match=r"seed: 0 \(run directory\) vs 1 \(now\)"):
        example.main(["vgg19_cifar10.py"])
    assert _files(out_dir) == before


def test_a_resumed_run_sums_the_wall_time_of_every_process(finished):
    out_dir, _ = finished
    history = read_history(str(out_dir / "run"))
    recorded = json.loads((out_dir / "baseline" / "wall_time.json").read_text())["wall_time_s"]
    earlier = recorded + sum(r["wall_time_s"] for r in history)
    _main(out_dir)  # every iteration is finished: this process only writes the final outputs
    assert read_history(str(out_dir / "run")) == history
    assert float(_summary(out_dir)["wall time (s)"]) >= round(earlier)
