"""Sensitivity analysis (Han et al. 2015, Figure 5): one layer pruned at a time, no retraining."""
import json

import matplotlib.image
import numpy as np
import pytest

import tf_stdprune
from tf_stdprune.keras2.engine import keras
from tf_stdprune.procedure.sensitivity import (
    SensitivityRow, SensitivityTable, sensitivity_analysis, suggest_layer_quality)

QUALITIES = (0.0, 0.5, 1.5)


def small_model():
    model = keras.Sequential([
        keras.layers.Conv2D(4, 3, input_shape=(6, 6, 2), name="conv"),
        keras.layers.Flatten(),
        keras.layers.Dense(8, activation="relu", name="fc1"),
        keras.layers.Dense(3, name="fc2"),
    ])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def small_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 6, 6, 2)).astype("float32")
    return x, rng.integers(0, 3, size=48)


def reference_prune(kernel, q):
    """Han's rule in float64 numpy: keep |w| >= q * population std(w)."""
    kernel = kernel.astype(np.float64)
    return np.where(np.abs(kernel) >= q * kernel.std(), kernel, 0.0)


def test_each_evaluation_prunes_only_its_layer_by_the_rule_and_weights_come_back_exactly():
    model, data = small_model(), small_data()
    before = [w.numpy().copy() for w in model.weights]
    seen = []
    evaluate = model.evaluate

    def recording_evaluate(*args, **kwargs):
        seen.append([w.numpy().copy() for w in model.weights])
        return evaluate(*args, **kwargs)

    model.evaluate = recording_evaluate
    table = sensitivity_analysis(model, data, qualities=QUALITIES, batch_size=16)
    assert [(r.layer, r.q) for r in table.rows] == [
        (name, q) for name in ("conv", "fc1", "fc2") for q in QUALITIES]
    kernels = {w.name: i for i, w in enumerate(model.weights)}
    for row, weights in zip(table.rows, seen[1:]):  # seen[0]: the dense baseline
        index = kernels[f"{row.layer}/kernel:0"]
        expected = reference_prune(before[index], row.q)
        np.testing.assert_array_equal(weights[index], expected.astype(np.float32))
        assert row.zero_fraction == pytest.approx(np.mean(expected == 0))
        for i, (now, then) in enumerate(zip(weights, before)):
            if i != index:
                np.testing.assert_array_equal(now, then)
    for now, then in zip(model.weights, before):
        np.testing.assert_array_equal(now.numpy(), then)


def test_accuracy_at_q_zero_equals_the_dense_model():
    model, data = small_model(), small_data()
    dense = model.evaluate(*data, batch_size=16, verbose=0, return_dict=True)["accuracy"]
    table = sensitivity_analysis(model, data, qualities=QUALITIES, batch_size=16)
    assert table.baseline == dense
    zero_rows = [r for r in table.rows if r.q == 0.0]
    assert len(zero_rows) == 3
    assert all(r.accuracy == dense and r.zero_fraction == 0.0 for r in zero_rows)
    assert any(r.zero_fraction > 0.5 for r in table.rows if r.q == 1.5)


def test_pruned_model_is_analysed_under_its_original_names_and_suggestion_is_accepted():
    pruned = tf_stdprune.prune_low_std(small_model())
    pruned.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   metrics=["accuracy"])
    table = sensitivity_analysis(pruned, small_data(), qualities=QUALITIES, layers=["fc1", "fc2"])
    assert table.layers() == ["fc1", "fc2"]
    suggestion = suggest_layer_quality(table, max_drop=100.0, base_quality=0.5)
    assert suggestion == {"fc1": 3.0, "fc2": 3.0}
    tf_stdprune.prune_low_std(small_model(), layer_quality=suggestion)
    with pytest.raises(ValueError, match="layers names.*'nope'"):
        sensitivity_analysis(pruned, small_data(), layers=["nope"])


def test_suggest_layer_quality_keeps_the_largest_q_within_the_drop_on_a_hand_made_table():
    rows = [SensitivityRow("a", "conv", q, 0.0, acc)
            for q, acc in ((0.0, 0.90), (0.5, 0.897), (1.0, 0.894), (1.5, 0.80))]
    rows += [SensitivityRow("b", "dense", q, 0.0, acc)   # recovers at 1.5: still stops at 0.5
             for q, acc in ((0.0, 0.90), (0.5, 0.90), (1.0, 0.85), (1.5, 0.90))]
    rows += [SensitivityRow("c", "dense", q, 0.0, acc) for q, acc in ((0.5, 0.70), (1.0, 0.60))]
    table = SensitivityTable(rows, baseline=0.90, metric="accuracy")
    assert suggest_layer_quality(table, max_drop=0.5) == {"a": 0.5, "b": 0.5, "c": 0.0}
    assert suggest_layer_quality(table, max_drop=0.6, base_quality=0.5) == {
        "a": 2.0, "b": 1.0, "c": 0.0}
    with pytest.raises(ValueError, match="max_drop.*-1"):
        suggest_layer_quality(table, max_drop=-1)


def test_table_prints_serializes_and_plots_conv_and_dense_panels(tmp_path):
    model, data = small_model(), small_data()
    table = sensitivity_analysis(model, data, qualities=QUALITIES, batch_size=16)
    text = str(table)
    assert all(name in text for name in ("conv", "fc1", "fc2"))
    assert json.loads(json.dumps(table.to_dict()))["rows"][0]["layer"] == "conv"
    path = table.plot(str(tmp_path / "sensitivity.png"))
    image = matplotlib.image.imread(path)
    assert image.shape[1] > 1.8 * image.shape[0]  # two panels side by side
    assert [p.name for p in tmp_path.iterdir()] == ["sensitivity.png"]


def test_a_keras3_model_is_analysed_and_left_bit_identical():
    import keras as keras3
    model = keras3.Sequential([keras3.Input((6,)), keras3.layers.Dense(8, name="a"),
                               keras3.layers.Dense(3, name="b")])
    model.compile("sgd", keras3.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 6)).astype("float32"), np.arange(32) % 3
    before = [w.numpy().copy() for w in model.weights]
    table = sensitivity_analysis(model, (x, y), qualities=(0.0, 1.0))
    assert table.layers() == ["a", "b"]
    kernel = before[0].astype(np.float64)
    assert table.rows[1].zero_fraction == pytest.approx(np.mean(np.abs(kernel) < kernel.std()))
    for now, then in zip(model.weights, before):
        np.testing.assert_array_equal(now.numpy(), then)
