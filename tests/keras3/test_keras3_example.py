"""examples/vgg19_cifar10.py with --keras=3: a tiny run end to end on the backend under test.

The run happens in-process through the example's absl ``main``, as in tests/examples/test_example.py;
its outputs are checked against the saved Keras 3 model re-evaluated with NumPy.
"""
import os
import re
import subprocess
import sys

from absl import app
import keras
import numpy as np
import pytest

import tf_stdprune
from tf_stdprune.keras2.run_state import read_history
from tf_stdprune.procedure import experiment
from tf_stdprune.procedure.run_directory import NonFiniteError
from keras3.helpers import BACKEND, IMPORT_CHECK
from example_runs import EXAMPLES, digits_test_set, example_flags, finished_fixture, \
    replica_masks_agree, run_example, summary_rows

sys.path.insert(0, EXAMPLES)
import vgg19_cifar10 as example  # noqa: E402

TINY = ["--preset=quick", "--keras=3", "--width=0.05", "--iterations=2",
        "--epochs_per_iteration=1", "--baseline_epochs=1", "--max_train_examples=128",
        "--batch_size=32", "--qualities=0.5,1.0", "--recalibration_batches=2",
        "--export_sparse", "--compress", "--quantize_bits=4", "--quantize_epochs=1",
        "--latency_threads="]  # the forms' latency is tested in tests/examples/test_example.py


def _main(out_dir, *argv):
    return run_example(example, f"--out_dir={out_dir}", *TINY, *argv)


finished = finished_fixture(example, "keras3_example", TINY)  # (out_dir, stdout) of one run


def _weights(model):
    return [keras.ops.convert_to_numpy(w) for w in model.weights]


@pytest.mark.slow
def test_a_keras3_run_writes_the_keras3_outputs_only(finished):
    out_dir, stdout = finished
    expected = ["baseline/weights.weights.h5", "baseline/metrics.json", "run/history.jsonl",
                "final/model.keras", "final/model.tfspz", "summary.md"]
    on_tensorflow = ["final/saved_model/saved_model.pb", "final/sparse_saved_model/saved_model.pb"]
    for path in expected + (on_tensorflow if BACKEND == "tensorflow" else []):
        assert (out_dir / path).exists(), path
    for path in ["baseline/weights.h5", "final/model.h5", "final/model.tflite"] + (
            [] if BACKEND == "tensorflow" else on_tensorflow):
        assert not (out_dir / path).exists(), path
    assert "no TFLite files for a Keras 3 model" in stdout
    assert ("no SavedModel" in stdout) == (BACKEND != "tensorflow")
    assert f"Keras 3 ({BACKEND} backend)" in (out_dir / "summary.md").read_text().split("\n")[0]


@pytest.mark.slow
def test_a_keras3_run_prunes_more_weights_each_iteration(finished):
    out_dir, _ = finished
    history = read_history(str(out_dir / "run"))
    assert [r["q"] for r in history] == [0.5, 1.0]
    assert 0 < history[0]["zero_weights"] < history[1]["zero_weights"]
    summary = summary_rows(out_dir)
    model = keras.saving.load_model(out_dir / "final" / "model.keras")
    zeros = sum(int(np.sum(keras.ops.convert_to_numpy(layer.kernel) == 0))
                for layer in model.layers if isinstance(layer, (keras.layers.Conv2D,
                                                                keras.layers.Dense)))
    assert int(summary["zero weights"]) == zeros == history[-1]["zero_weights"]


@pytest.mark.slow
def test_the_saved_keras3_model_scores_the_summarys_top1(finished):
    out_dir, _ = finished
    summary = summary_rows(out_dir)
    x_test, y_test = digits_test_set()
    model = keras.saving.load_model(out_dir / "final" / "model.keras")
    logits = keras.ops.convert_to_numpy(model.predict(x_test, verbose=0))
    top1 = 100 * np.mean(np.argmax(logits, axis=1) == y_test)
    # With --quantize_bits the saved model is the fine-tuned shared-weight one.
    assert float(summary["top-1 after centroid fine-tuning (%)"]) == pytest.approx(top1, abs=0.006)
    # The exported forms' table: | form | file | size | top-1 | change | latencies |
    forms = re.search(r"\| final/model\.tfspz \| \d+ \| ([\d.]+) \|",
                      (out_dir / "summary.md").read_text())
    assert float(forms.group(1)) == pytest.approx(top1, abs=0.006)


@pytest.mark.slow
def test_the_compressed_file_decompresses_to_the_saved_weights(finished):
    out_dir, _ = finished
    saved = keras.saving.load_model(out_dir / "final" / "model.keras")
    restored = tf_stdprune.decompress(str(out_dir / "final" / "model.tfspz"))
    assert type(restored).__module__.startswith("keras")
    for got, want in zip(_weights(restored), _weights(saved), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_resuming_a_keras3_run_with_keras2_is_refused(finished):
    out_dir, _ = finished
    refusal = r'keras: "3" \(run directory\) vs "2" \(now\)'
    with example_flags(f"--out_dir={out_dir}", *TINY, "--keras=2"), \
            pytest.raises(app.UsageError, match=refusal):
        example.main(["vgg19_cifar10.py"])


@pytest.mark.parametrize("flag", ["--strategy=multi_worker", "--mixed_precision", "--jit_compile"])
def test_keras3_refuses_tf_keras_only_flags_before_anything_is_written(tmp_path, flag):
    out_dir = tmp_path / "out"
    with example_flags(f"--out_dir={out_dir}", *TINY, flag), \
            pytest.raises(app.UsageError, match=f"{flag}.*--keras=2"):
        example.main(["vgg19_cifar10.py"])
    assert not out_dir.exists()


@pytest.mark.skipif(BACKEND == "tensorflow", reason="tf.distribute runs on this backend")
@pytest.mark.parametrize("flag", ["--strategy=mirrored", "--cpu_replicas=2"])
def test_keras3_refuses_tf_distribute_on_another_backend_naming_tensorflow(tmp_path, flag):
    out_dir = tmp_path / "out"
    with example_flags(f"--out_dir={out_dir}", *TINY, flag), \
            pytest.raises(app.UsageError, match="KERAS_BACKEND=tensorflow"):
        example.main(["vgg19_cifar10.py"])
    assert not out_dir.exists()


# A tiny --keras=3 run under MirroredStrategy over two logical CPUs (TensorFlow backend, in a
# fresh interpreter: the CPU is split before TensorFlow starts); saves every replica's copy
# of each mask and pruned tensor.
_KERAS3_MIRRORED = """
import os, sys
os.environ["KERAS_BACKEND"] = "tensorflow"
sys.path.insert(0, sys.argv[1])
import vgg19_cifar10 as example
example.split_cpu(2)
import keras, numpy as np
from tf_stdprune.keras3.prune import wrappers


def tiny(num_classes, width, input_shape, keras_module):
    return keras.Sequential([
        keras.Input(input_shape), keras.layers.Conv2D(6, 3, strides=4),
        keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.Flatten(),
        keras.layers.Dense(num_classes)])


example.FLAGS(["vgg19_cifar10.py", "--keras=3", "--strategy=mirrored", "--out_dir=" + sys.argv[2],
               "--max_train_examples=64", "--batch_size=16", "--iterations=2",
               "--epochs_per_iteration=1", "--baseline_epochs=1", "--qualities=0.5,1.0",
               "--recalibration_batches=2", "--quantize_bits=0", "--noexport_sparse",
               "--nocompress", "--notflite", "--latency_threads="])
cfg = example.config()
example.validate(cfg)
strategy = example.make_strategy("mirrored")
assert strategy.num_replicas_in_sync == 2, strategy.extended.worker_devices
pruned, _ = example.run(cfg, strategy, build_model=tiny)
arrays = {}
for state in wrappers(pruned):
    for i, (mask, weight) in enumerate(zip(state.masks, state.pruned_weights)):
        for kind, variable in (("mask", mask), ("weight", weight)):
            value = variable.value
            arrays[f"{state.name}/{i}/{kind}"] = np.stack(
                [np.asarray(v) for v in getattr(value, "values", [value])])
np.savez(sys.argv[3], **arrays)
"""


@pytest.mark.slow
def test_a_keras3_run_under_mirrored_strategy_keeps_one_mask_on_both_replicas(tmp_path):
    """--keras=3 --strategy=mirrored (TensorFlow backend): every replica holds the same
    masks and pruned tensors, zero where the mask is, and the iterations ran."""
    arrays_path = tmp_path / "replicas.npz"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_USE_LEGACY_KERAS", None)
    process = subprocess.run([sys.executable, "-c", _KERAS3_MIRRORED, EXAMPLES,
                              str(tmp_path / "out"), str(arrays_path)],
                             capture_output=True, text=True, timeout=600, env=env)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert replica_masks_agree(np.load(arrays_path)) > 0
    assert [r["q"] for r in read_history(str(tmp_path / "out" / "run"))] == [0.5, 1.0]


# Builds the example's dense and pruned models with --keras=3 in a fresh interpreter (the
# test process may hold tf_keras already) and prints which Keras-2 packages got loaded.
_KERAS3_ONLY = """
import sys, types
sys.path.insert(0, sys.argv[1])
from absl import flags
import vgg19_cifar10 as example
flags.FLAGS(["vgg19_cifar10.py", "--keras=3", "--width=0.05"])
cfg = example.config()
example.validate(cfg)
strategy = example.make_strategy(cfg.strategy)
info = types.SimpleNamespace(num_classes=10, image_shape=(32, 32, 3))
dense = example.build_dense(cfg, strategy, info, example.models.vgg19_bn)
pruned = example.pruned_model(cfg, dense, strategy, steps_per_epoch=2)
print(type(pruned).__module__.split(".")[0], pruned.optimizer is not dense.optimizer,
      [m for m in ("tf_keras", "tensorflow_model_optimization") if m in sys.modules])
"""


@IMPORT_CHECK
def test_the_keras3_path_of_the_example_never_loads_tf_keras_or_tfmot():
    root = os.path.join(EXAMPLES, os.pardir)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root, os.environ.get("PYTHONPATH", "")]), TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_USE_LEGACY_KERAS", None)  # the suite's conftest sets it; a Keras 3 user does not
    result = subprocess.run([sys.executable, "-c", _KERAS3_ONLY, EXAMPLES], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == "keras True []"


def test_a_keras3_baseline_with_a_nan_weight_is_named_and_refused():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="fc")])
    kernel = np.ones((3, 2), "float32")
    model.get_layer("fc").kernel.assign(kernel)
    assert experiment.non_finite_weights(model) == []
    kernel[1, 0] = np.nan
    model.get_layer("fc").kernel.assign(kernel)
    assert experiment.non_finite_weights(model) == [model.get_layer("fc").kernel.path]
    with pytest.raises(NonFiniteError, match=r"fc/kernel.*lower --baseline_lr"):
        experiment.check_finite(model, {"loss": 1.0}, fix="lower --baseline_lr")
