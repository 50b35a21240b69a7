"""The experiment's stages: settings checks, the baseline's finiteness check, the summary rows."""
import json

import numpy as np
import pytest

import tf_stdprune
from tf_stdprune.keras2.engine import keras
from tf_stdprune.procedure import experiment
from tf_stdprune.procedure.run_directory import NonFiniteError, release_lock

SETTINGS = dict(qualities=(0.5, 1.0), initial_lrs=(0.01,), lr_drops=(2,), epochs_per_iteration=3,
                baseline_lr=0.01, baseline_lr_drops=(6,), baseline_epochs=8, width=0.25,
                q_step=0.1, target_drop=None, sensitivity_max_drop=1.0,
                sensitivity_qualities=None, layer_quality=None)


def test_the_summary_reports_target_modes_kept_and_rejected_q(tmp_path):
    assert experiment.target_rows(str(tmp_path)) == []
    (tmp_path / "target.json").write_text(json.dumps({
        "kept_iteration": 3, "kept_q": 1.2000000000000002, "rejected_iteration": 4,
        "rejected_q": 1.3, "rejected_accuracy_drop": 0.8123}))
    assert experiment.target_rows(str(tmp_path)) == [
        ("target mode: kept iteration", "3"), ("target mode: kept q", "1.2"),
        ("target mode: rejected q (drop, points)", "1.3 (0.81)")]


@pytest.mark.parametrize("change, named", [
    ({"qualities": (0.5, float("nan"))}, "qualities=0.5,nan: every q must be a finite number"),
    ({"width": 0.0}, "width=0.0: every value must be a finite number > 0"),
    ({"lr_drops": (-1,)}, "lr_drops=-1: drops are epochs >= 0"),
    ({"layer_quality": {"fc": -1.0}}, "layer_quality: the factors {'fc': -1.0}"),
    ({"target_drop": float("inf")}, "target_drop=inf: give the largest accepted drop"),
])
def test_a_bad_setting_is_named_with_the_callers_prefix(change, named):
    experiment.check_settings(**SETTINGS)  # the good settings pass
    with pytest.raises(ValueError, match=f"^{named}"):
        experiment.check_settings(**dict(SETTINGS, **change))
    with pytest.raises(ValueError, match=f"^--{named}"):
        experiment.check_settings("--", **dict(SETTINGS, **change))


def test_layer_quality_text_parses_to_factors_or_names_the_bad_item():
    assert experiment.parse_layer_quality("fc1=0.8, conv2d_3=1.2") == {"fc1": 0.8, "conv2d_3": 1.2}
    assert (experiment.parse_layer_quality("auto"), experiment.parse_layer_quality("")) == (
        "auto", None)
    with pytest.raises(ValueError, match="'fc1' is not name=factor"):
        experiment.parse_layer_quality("fc1")


def test_a_tf_keras_baseline_with_an_infinite_weight_is_named_and_refused():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="fc")])
    assert experiment.non_finite_weights(model) == []
    kernel = np.ones((3, 2), "float32")
    kernel[0, 1] = np.inf
    model.get_layer("fc").kernel.assign(kernel)
    assert experiment.non_finite_weights(model) == [model.get_layer("fc").kernel.name]
    with pytest.raises(NonFiniteError, match=r"fc/kernel.*loss = nan.*lower the rate and"):
        experiment.check_finite(model, {"loss": float("nan")}, fix="lower the rate")


def test_a_directory_with_other_settings_is_refused_and_its_lock_released(tmp_path):
    experiment.claim_out_dir(str(tmp_path), {"seed": 0})
    release_lock(str(tmp_path))
    with pytest.raises(experiment.SettingsError, match=r"seed: 0 \(run directory\) vs 1"):
        experiment.claim_out_dir(str(tmp_path), {"seed": 1})
    assert not (tmp_path / "lock").exists()
    experiment.claim_out_dir(str(tmp_path), {"seed": 0})  # the same settings resume
    assert (tmp_path / "lock").exists()
    release_lock(str(tmp_path))


def test_the_summary_rows_carry_the_paired_change_and_every_count():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, use_bias=False)])
    model.layers[0].kernel.assign(np.array([[0, 1, 2]] * 4, "float32"))
    report = tf_stdprune.sparsity_report(model)
    change = tf_stdprune.accuracy_change([0, 0, 1, 1], [0, 1, 1, 0], [0, 0, 1, 1])
    rows = dict(experiment.summary_rows(1.0, 0.5, change.to_dict(), report,
                                        {"m": {"bytes": 9, "gzip_bytes": 7}},
                                        [("extra", "x")]))
    assert rows["zero weights"] == "4" and rows["total weights"] == "12"
    assert rows["dense top-1 (%)"] == "100.00" and rows["pruned top-1 (%)"] == "50.00"
    assert rows["top-1 change, pruned - dense (points, exact McNemar 95 % interval)"].startswith(
        f"{change.change:+.2f} [{change.low:+.2f}, {change.high:+.2f}], p = 0.5")
    assert rows["extra"] == "x" and rows["size of final/m (bytes, gzip bytes)"] == "9, 7"
    table = experiment.markdown_table("t", list(rows.items()))
    assert table.startswith("# t\n\n| measure | value |") and "| zero weights | 4 |" in table
