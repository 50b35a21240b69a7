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

from absl import app
import numpy as np
import pytest
import tensorflow as tf

from tf_stdprune import accuracy_change, sparsity_report
from tf_stdprune.keras2.engine import keras
from tf_stdprune.keras2.run_state import read_history

from example_runs import (EXAMPLES, TINY_VGG, digits_test_set, example_flags, finished_fixture,
                          replica_masks_agree, run_example, summary_rows, tiny_model)

sys.path.insert(0, EXAMPLES)
import vgg19_cifar10 as example  # noqa: E402

TINY = ["--preset=quick", "--width=0.05", "--iterations=2", "--epochs_per_iteration=1",
        "--baseline_epochs=1", "--max_train_examples=128", "--batch_size=32",
        "--qualities=0.5,1.0", "--recalibration_batches=2", "--export_sparse", "--compress",
        "--quantize_bits=4", "--quantize_epochs=1"]
# The end-to-end run below adds the sensitivity analysis and its per-layer q (a drop budget
# every layer meets, so each layer's factor is the largest tried q, 2).
RUN = [*TINY, "--layer_quality=auto", "--sensitivity_qualities=0,1,2",
       "--sensitivity_max_drop=100"]


def _main(out_dir, *argv):
    return run_example(example, f"--out_dir={out_dir}", *RUN, *argv)


finished = finished_fixture(example, "example", RUN)  # (out_dir, stdout) of one run


def test_outputs_written(finished):
    out_dir, stdout = finished
    for path in ("baseline/weights.h5", "baseline/metrics.json", "run/history.jsonl",
                 "run/report.json", "final/model.keras", "final/model.h5",
                 "final/saved_model/saved_model.pb", "final/sparse_saved_model/saved_model.pb",
                 "final/model.tfspz", "final/model.tflite", "final/model_int8.tflite",
                 "sensitivity/sensitivity.json", "sensitivity/sensitivity.md",
                 "sensitivity/sensitivity.png", "summary.md"):
        assert (out_dir / path).exists(), path
    assert not [p for p in os.listdir(out_dir / "final") if p.startswith(".tmp")]
    history = read_history(str(out_dir / "run"))
    assert [r["iteration"] for r in history] == [1, 2] and [r["q"] for r in history] == [0.5, 1.0]
    assert "Final Parameters:" in stdout and "| zero weights |" in stdout


def test_summary_agrees_with_saved_model(finished):
    out_dir, _ = finished
    summary = summary_rows(out_dir)
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
    for name in ("model.keras", "model.h5", "saved_model", "sparse_saved_model", "model.tfspz",
                 "model.tflite", "model_int8.tflite"):
        path = out_dir / "final" / name
        files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
        size, _ = summary[f"size of final/{name} (bytes, gzip bytes)"].split(", ")
        assert int(size) == sum(f.stat().st_size for f in files)


def test_summary_accuracies_match_reevaluation(finished):
    out_dir, _ = finished
    summary = summary_rows(out_dir)
    metrics = json.loads((out_dir / "baseline/metrics.json").read_text())
    assert float(summary["dense top-1 (%)"]) == pytest.approx(100 * metrics["top1"], abs=0.006)
    x_test, y_test = digits_test_set()
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


def test_each_forms_top1_change_is_the_mcnemar_change_against_the_reloaded_dense_baseline(finished):
    out_dir, _ = finished
    x_test, y_test = digits_test_set()
    dense = TINY_VGG(10, width=0.05, input_shape=(32, 32, 3))
    dense.load_weights(out_dir / "baseline" / "weights.h5")
    final = keras.models.load_model(out_dir / "final" / "model.keras")
    change = accuracy_change(dense.predict(x_test, verbose=0), final.predict(x_test, verbose=0),
                             y_test)
    expected = f"{change.change:+.2f} [{change.low:+.2f}, {change.high:+.2f}]"
    assert _forms(out_dir)["saved_model"][3] == expected
    assert change.images == len(y_test) == 360
    # The pruned model's change: its last iteration's record, and consistent with both top-1s.
    summary, record = summary_rows(out_dir), read_history(str(out_dir / "run"))[-1]
    row = summary["top-1 change, pruned - dense (points, exact McNemar 95 % interval)"]
    assert row.startswith(f"{record['val_top1_change']['change']:+.2f} [")
    assert record["val_top1_change"]["change"] == pytest.approx(
        float(summary["pruned top-1 (%)"]) - float(summary["dense top-1 (%)"]), abs=0.011)


def test_quantize_bits_shares_weights_and_keeps_zeros(finished):
    out_dir, stdout = finished
    summary = summary_rows(out_dir)
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
from tf_stdprune.keras2.engine import keras
from tf_stdprune.keras2.prune import all_layers


def tiny(num_classes, width, input_shape):
    return keras.Sequential([
        keras.Input(input_shape), keras.layers.Conv2D(6, 3, strides=4),
        keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.Flatten(),
        keras.layers.Dense(num_classes)])


example.FLAGS(["vgg19_cifar10.py", "--out_dir=" + sys.argv[2], "--max_train_examples=64",
               "--batch_size=16", "--iterations=2", "--epochs_per_iteration=1",
               "--baseline_epochs=1", "--qualities=0.5,1.0", "--recalibration_batches=2",
               "--quantize_bits=0", "--noexport_sparse", "--nocompress", "--notflite",
               "--latency_threads="])
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
    pruned = replica_masks_agree(np.load(arrays_path))
    assert pruned > 0
    history = read_history(str(tmp_path / "out" / "run"))
    assert [r["q"] for r in history] == [0.5, 1.0]
    assert history[-1]["zero_weights"] >= pruned
    assert (tmp_path / "out" / "summary.md").exists()


def _config(*argv):
    with example_flags(*argv):
        return example.config()


def test_quick_preset_runs_every_compression_stage_and_flags_turn_them_off():
    quick = _config("--preset=quick")
    assert (quick.quantize_bits, quick.export_sparse, quick.compress, quick.tflite) == (
        5, True, True, True)
    off = _config("--preset=quick", "--quantize_bits=0", "--noexport_sparse", "--nocompress",
                  "--notflite")
    assert (off.quantize_bits, off.export_sparse, off.compress, off.tflite) == (
        None, False, False, False)
    paper = _config("--preset=paper", "--quantize_bits=8")
    assert (paper.quantize_bits, paper.export_sparse, paper.compress, paper.tflite) == (
        8, False, False, False)


def _files(out_dir):
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}


def test_resume_with_another_seed_is_refused_before_anything_changes(finished):
    out_dir, _ = finished
    before = _files(out_dir)
    with example_flags(f"--out_dir={out_dir}", *RUN, "--seed=1"), \
            pytest.raises(app.UsageError, match=r"seed: 0 \(run directory\) vs 1 \(now\)"):
        example.main(["vgg19_cifar10.py"])
    assert _files(out_dir) == before


FORM_FILES = {"saved_model", "sparse_saved_model", "model.tflite", "model_int8.tflite",
              "model.tfspz"}


def _forms(out_dir):
    """``{file: (form, bytes, top-1 %, change text, [ms at 1 thread, ms at 2 threads])}``
    from summary.md's forms table."""
    latency = r" ([\d.]+), [\d.]+ \[[\d.]+, [\d.]+\] \|"
    rows = re.findall(r"^\| ([^|]+) \| final/(\S+) \| (\d+) \| ([\d.]+) \| ([^|]+) \|"
                      + 2 * latency + "$", (out_dir / "summary.md").read_text(), re.M)
    return {file: (name, int(size), float(top1), change.strip(), [float(one), float(two)])
            for name, file, size, top1, change, one, two in rows}


def _interpreter_top1(path, x, y):
    """Top-1 (%) of a TFLite file, one image per invoke (the independent reference)."""
    interpreter = tf.lite.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]["index"]
    target = interpreter.get_output_details()[0]["index"]
    hits = 0
    for image, label in zip(x, y):
        interpreter.set_tensor(source, image[None].astype(np.float32))
        interpreter.invoke()
        hits += int(np.argmax(interpreter.get_tensor(target)[0]) == label)
    return 100 * hits / len(y)


def test_the_forms_table_gives_every_exported_form_its_size_latency_and_top1(finished):
    out_dir, _ = finished
    forms = _forms(out_dir)
    assert set(forms) == FORM_FILES
    assert "decompressed, then run as the Keras model" in forms["model.tfspz"][0]
    for file, (_, size, _, change, latencies) in forms.items():
        path = out_dir / "final" / file
        files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
        assert size == sum(f.stat().st_size for f in files), file
        assert min(latencies) > 0, file
        assert re.fullmatch(r"[+-][\d.]+ \[[+-][\d.]+, [+-][\d.]+\]", change), change
    x_test, y_test = digits_test_set()
    keras_top1 = 100 * np.mean(np.argmax(keras.models.load_model(
        out_dir / "final" / "model.keras").predict(x_test, verbose=0), axis=1) == y_test)
    for file in ("saved_model", "sparse_saved_model", "model.tfspz"):  # the same weights
        assert forms[file][2] == pytest.approx(keras_top1, abs=0.006), file
    for file in ("model.tflite", "model_int8.tflite"):
        assert forms[file][2] == pytest.approx(
            _interpreter_top1(out_dir / "final" / file, x_test, y_test), abs=0.006), file
    assert forms["model.tflite"][2] == pytest.approx(keras_top1, abs=1.0)


def test_layer_quality_auto_writes_the_analysis_and_prunes_with_its_suggestion(finished):
    out_dir, stdout = finished
    saved = json.loads((out_dir / "sensitivity" / "sensitivity.json").read_text())
    layers = list(dict.fromkeys(row["layer"] for row in saved["rows"]))
    assert len(layers) == 2 + 3  # the tiny plan's conv and Dense layers, not BatchNormalization
    assert {row["kind"] for row in saved["rows"]} == {"conv", "dense"}
    assert sorted({row["q"] for row in saved["rows"]}) == [0.0, 1.0, 2.0]
    for row in saved["rows"]:
        if row["q"] == 0:  # q = 0 prunes nothing: the model's own accuracy
            assert row["zero_fraction"] == 0.0
            assert row["accuracy"] == pytest.approx(saved["baseline"], abs=1e-6)
    # Every drop is within the budget of 100 points: each layer keeps the largest q tried.
    assert saved["layer_quality"] == {name: 2.0 for name in layers}
    recorded = json.loads((out_dir / "run" / "run.json").read_text())["layer_quality"]
    assert recorded == saved["layer_quality"]  # what prune_low_std was given
    table = (out_dir / "sensitivity" / "sensitivity.md").read_text()
    assert all(f"| {name} | 2 |" in table for name in layers)
    assert (out_dir / "sensitivity" / "sensitivity.png").stat().st_size > 10_000
    assert "Sensitivity (top1, dense" in stdout


RESUMABLE = ["--preset=quick", "--width=0.05", "--epochs_per_iteration=1", "--baseline_epochs=1",
             "--max_train_examples=128", "--batch_size=32", "--qualities=0.5,1.0",
             "--recalibration_batches=2", "--augment", "--noexport_sparse", "--nocompress",
             "--notflite", "--quantize_bits=0", "--latency_threads="]


def _final_weights(out_dir):
    return keras.models.load_model(out_dir / "final" / "model.h5", compile=False).get_weights()


@pytest.mark.slow
def test_a_run_stopped_after_one_iteration_and_resumed_repeats_the_uninterrupted_run(tmp_path):
    """Augmentation, per-epoch reshuffling and Dropout on: one process runs iteration 1,
    a second resumes for iteration 2 (the data generator and the layers' generators come
    back from the checkpoint). History, summary and final weights equal those of one
    uninterrupted process bit for bit (wall times aside)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    for out_dir, iterations in ((whole, [2]), (split, [1, 2])):
        for count in iterations:
            keras.backend.clear_session()  # layer names as in a new process
            with example_flags(f"--out_dir={out_dir}", *RESUMABLE, f"--iterations={count}"), \
                    tiny_model(example), contextlib.redirect_stdout(io.StringIO()):
                example.main(["vgg19_cifar10.py"])
    histories = [read_history(str(d / "run")) for d in (whole, split)]
    for history in histories:
        for record in history:
            record.pop("wall_time_s")
    assert [r["iteration"] for r in histories[0]] == [1, 2]
    assert json.dumps(histories[0], sort_keys=True) == json.dumps(histories[1], sort_keys=True)
    # Every figure of the summary; not the wall time, nor file sizes (gzip headers and
    # SavedModel graphs carry timestamps and names of the process that wrote them).
    summaries = [{k: v for k, v in summary_rows(d).items()
                  if k != "wall time (s)" and not k.startswith("size of")} for d in (whole, split)]
    assert len(summaries[0]) >= 8 and summaries[0] == summaries[1]
    for a, b in zip(_final_weights(whole), _final_weights(split)):
        np.testing.assert_array_equal(a, b)


# Last: it rewrites the shared run's summary.md (without latency columns, to save time).
def test_a_resumed_run_sums_the_wall_time_of_every_process(finished):
    out_dir, _ = finished
    history = read_history(str(out_dir / "run"))
    recorded = json.loads((out_dir / "baseline" / "wall_time.json").read_text())["wall_time_s"]
    earlier = recorded + sum(r["wall_time_s"] for r in history)
    _main(out_dir, "--latency_threads=")  # every iteration is finished: only the final outputs
    assert read_history(str(out_dir / "run")) == history
    assert float(summary_rows(out_dir)["wall time (s)"]) >= round(earlier)
