"""sparsity_report against an independent count, and the reference experiment's "Final Parameters" block."""
import json

import numpy as np
import pytest
import tensorflow_model_optimization as tfmot

import tf_stdprune
from tf_stdprune.keras2.engine import keras
from tf_stdprune.report import LayerSparsity, SparsityReport

L = keras.layers

# The reference experiment's block, verbatim (the document puts a blank line between paragraphs).
SEED_BLOCK = """Final Parameters:

total parameters: 38969930,

Total weights: 38939712,

Zero weights: 34244952,

Zero weights rate (%): 87.9435163773,

Zero parameters rate in model (%): 87.8753233583

Compression rate: x8.24764263 times"""
PRUNABLE_SUFFIXES = ("/kernel:0", "/depthwise_kernel:0", "/pointwise_kernel:0", "/gamma:0")


def model_with_every_kind():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.DepthwiseConv2D(3, name="dw")(x)
    x = L.SeparableConv2D(4, 3, name="sep")(x)
    x = L.BatchNormalization(center=False, name="bn_no_beta")(x)
    x = L.Flatten()(x)
    return keras.Model(inputs, L.Dense(3, name="fc")(L.Dense(8, use_bias=False, name="fc0")(x)))


def independent_count(model):
    """Counts over model.weights/get_weights() by variable name (no library code)."""
    total_parameters = total_weights = zero_weights = 0
    for variable, value in zip(model.weights, model.get_weights()):
        total_parameters += value.size
        if variable.name.endswith(PRUNABLE_SUFFIXES):
            total_weights += value.size
            zero_weights += int(np.sum(value == 0))
    return total_parameters, total_weights, zero_weights


@pytest.fixture(scope="module")
def pruned_and_stripped():
    """Trained once for the module: a pruned model and its stripped copy."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(64, 8, 8, 3)).astype("float32"), rng.integers(0, 3, size=64)
    pruned = tf_stdprune.prune_low_std(
        model_with_every_kind(), pruning_schedule=tf_stdprune.StdPruningSchedule([0.7, 1.2], 4))
    pruned.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruned.fit(*data, batch_size=8, epochs=1, verbose=0,
               callbacks=[tf_stdprune.UpdatePruningStep()])
    return pruned, tf_stdprune.strip_pruning(pruned)


def test_report_matches_independent_count(pruned_and_stripped):
    pruned, stripped = pruned_and_stripped
    total_parameters, total_weights, zero_weights = independent_count(stripped)
    report = tf_stdprune.sparsity_report(stripped)
    assert (report.total_parameters, report.total_weights, report.zero_weights) == (
        total_parameters, total_weights, zero_weights)
    assert 0 < zero_weights < total_weights < total_parameters
    assert report.zero_weights_rate == 100 * zero_weights / total_weights
    assert report.zero_parameters_rate == 100 * zero_weights / total_parameters
    assert report.compression_rate == total_parameters / (total_parameters - zero_weights)
    kinds = {l.name: l.kind for l in report.layers}
    assert kinds == {"conv": "conv", "bn": "bn", "dw": "conv", "sep": "conv", "bn_no_beta": "bn",
                     "fc0": "dense", "fc": "dense"}
    for layer in report.layers:
        values = [w for v, w in zip(stripped.get_layer(layer.name).weights,
                                    stripped.get_layer(layer.name).get_weights())
                  if v.name.endswith(PRUNABLE_SUFFIXES)]
        assert (layer.total, layer.zeros) == (sum(v.size for v in values),
                                              sum(int((v == 0).sum()) for v in values))
        assert layer.rate == 100 * layer.zeros / layer.total


def test_printing_a_report_shows_the_totals_then_one_row_per_layer(pruned_and_stripped):
    report = tf_stdprune.sparsity_report(pruned_and_stripped[1])
    summary, table = str(report).split("\n\n")
    assert summary == report.summary() and summary.startswith("Final Parameters:")
    rows = table.splitlines()[1:]
    assert [row.split()[0] for row in rows] == [l.name for l in report.layers]
    assert [int(row.split()[3]) for row in rows] == [l.zeros for l in report.layers]


def test_wrapped_and_stripped_reports_equal(pruned_and_stripped):
    pruned, stripped = pruned_and_stripped
    wrapped = tf_stdprune.sparsity_report(pruned)
    assert wrapped.to_dict() == tf_stdprune.sparsity_report(stripped).to_dict()
    masks = sum(int((m.numpy() == 0).sum()) for l in pruned.layers
                if isinstance(l, tf_stdprune.PruneLowStd) for _, m, _ in l.pruning_vars)
    assert wrapped.zero_weights == masks  # every pruned entry is an exact zero, and only those


def test_every_form_of_a_model_counts_the_same_weights(pruned_and_stripped, tmp_path):
    """Wrapped by prune_low_std, stripped, quantized and decompressed: one set of counts,
    that of an independent count of the stripped model (shared values keep every zero)."""
    pruned, stripped = pruned_and_stripped
    quantized = tf_stdprune.quantize_weights(pruned, bits=3)
    decompressed = tf_stdprune.decompress(tf_stdprune.compress(quantized, tmp_path / "m.tfspz"))
    expected = independent_count(stripped)
    for form in (pruned, stripped, quantized, decompressed):
        report = tf_stdprune.sparsity_report(form)
        assert (report.total_parameters, report.total_weights, report.zero_weights) == expected
        assert [(l.name, l.kind, l.total, l.zeros) for l in report.layers] == [
            (l.name, l.kind, l.total, l.zeros)
            for l in tf_stdprune.sparsity_report(stripped).layers]


def test_tfmot_wrapped_model_and_shared_layer_counted_once():
    inputs = keras.Input((4,))
    shared = L.Dense(4, name="shared")
    magnitude = tfmot.sparsity.keras.prune_low_magnitude(
        L.Dense(3, name="mag"), tfmot.sparsity.keras.ConstantSparsity(0.5, 0))
    model = keras.Model(inputs, magnitude(L.Add()([shared(inputs), shared(inputs * 2.0)])))
    magnitude.layer.kernel.assign(np.array([[0, 1, 2]] * 4, np.float32))
    report = tf_stdprune.sparsity_report(model)
    assert (report.total_parameters, report.total_weights, report.zero_weights) == (
        4 * 4 + 4 + 4 * 3 + 3, 16 + 12, 4)  # no masks, thresholds or step counters


def test_seed_final_parameters_block_exact():
    report = SparsityReport(total_parameters=38969930, total_weights=38939712,
                            zero_weights=34244952, layers=[])
    assert report.summary() == "\n".join(line for line in SEED_BLOCK.splitlines() if line)
    assert str(report) == report.summary()  # no layers: no table
    assert f"{report.zero_weights_rate:.10f}" == "87.9435163773"
    assert f"{report.zero_parameters_rate:.10f}" == "87.8753233583"
    assert f"{report.compression_rate:.8f}" == "8.24764263"


def test_dict_and_json_round_trip():
    report = SparsityReport(100, 80, 30, [LayerSparsity("c", "conv", 50, 20),
                                          LayerSparsity("bn", "bn", 30, 10)])
    data = json.loads(report.to_json())
    assert data["zero_weights_rate"] == 37.5 and data["compression_rate"] == 100 / 70
    assert data["layers"][0] == {"name": "c", "kind": "conv", "total": 50, "zeros": 20,
                                 "rate": 40.0}
    assert SparsityReport.from_dict(data) == report
    assert report.table().splitlines()[1].split() == ["c", "conv", "50", "20", "40.00"]


def test_empty_and_fully_zero_models():
    empty = tf_stdprune.sparsity_report(keras.Sequential([L.ReLU(input_shape=(3,))]))
    assert (empty.total_parameters, empty.total_weights, empty.zero_weights) == (0, 0, 0)
    assert empty.zero_weights_rate == 0.0 and empty.compression_rate == 1.0
    zero = keras.Sequential([L.Dense(2, use_bias=False, kernel_initializer="zeros",
                                     input_shape=(3,))])
    report = tf_stdprune.sparsity_report(zero)
    assert report.zero_weights == report.total_parameters == 6
    assert report.compression_rate == float("inf")


def refuse_constant(name):
    raise AssertionError(f"non-standard JSON constant {name}")


def test_a_fully_pruned_model_writes_strict_json_and_says_all_weights_pruned():
    """No bias, every kernel weight zero: the rate is unbounded, so JSON holds null (no
    Infinity) and the text says so."""
    zero = keras.Sequential([L.Dense(2, use_bias=False, kernel_initializer="zeros",
                                     input_shape=(3,))])
    report = tf_stdprune.sparsity_report(zero)
    assert report.compression_rate == float("inf") and report.all_pruned
    data = json.loads(report.to_json(), parse_constant=refuse_constant)
    assert data["compression_rate"] is None and data["zero_weights_rate"] == 100.0
    assert report.summary().splitlines()[-1] == "Compression rate: all weights pruned"
    assert SparsityReport.from_dict(data) == report
    assert not SparsityReport(6, 6, 5, []).all_pruned
