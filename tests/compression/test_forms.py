"""compare_forms: every exported form's size, top-1 and per-thread latency, side by side."""
import numpy as np
import pytest

from tf_stdprune.compression.compressed_file import compress
from tf_stdprune.compression.forms import FormRow, compare_forms, forms_markdown
from tf_stdprune.compression.serving import disk_size
from tf_stdprune.keras2.export import export_dense_saved_model
from tf_stdprune.keras2.tflite import export_tflite

from conftest import tiny_arrays, tiny_cnn, zero_out


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    directory = tmp_path_factory.mktemp("final")
    model = tiny_cnn()
    zero_out(model, 0.5)
    x, y = tiny_arrays()
    export_dense_saved_model(model, str(directory / "saved_model"))
    export_tflite(model, str(directory / "model.tflite"))
    compress(model, str(directory / "model.tfspz"))
    logits = model.predict(x, verbose=0)
    reference = np.where(np.arange(len(y)) < 8, (y + 1) % 3, np.argmax(logits, 1))  # 8 flipped
    rows = compare_forms(str(directory), x, y, reference, threads=(1, 2), rounds=3, calls=2)
    return directory, model, (x, y, logits), rows


def test_each_present_form_gets_its_size_top1_and_change_vs_the_reference(forms):
    directory, _, (x, y, logits), rows = forms
    assert [r.file for r in rows] == ["saved_model", "model.tflite", "model.tfspz"]
    keras_top1 = 100 * np.mean(np.argmax(logits, 1) == y)
    for row in rows:
        assert row.bytes == disk_size(str(directory / row.file))["bytes"]
        assert row.top1 == pytest.approx(keras_top1, abs=100 / len(y) + 1e-9), row.name
    change = rows[0].change  # the SavedModel computes what the Keras model computes
    hits = np.argmax(logits, 1) == y
    assert change.pruned_only == int(np.sum(hits[:8] & ((y[:8] + 1) % 3 != y[:8])))
    assert change.dense_only == 0 and change.images == len(y)


def test_latency_comes_per_thread_count_with_the_ratio_to_the_first_form(forms):
    *_, rows = forms
    for row in rows:
        assert set(row.latency) == {1, 2}
        for ms, (ratio, low, high) in row.latency.values():
            assert ms > 0 and low <= ratio <= high
    assert all(q == (1.0, 1.0, 1.0) for _, q in rows[0].latency.values())  # itself
    table = forms_markdown(rows, 64, rounds=3, calls=2)
    assert table.count("\n| ") == 1 + len(rows)
    assert "| 1 thread: ms, x dense SavedModel per round [95 %] |" in table


def test_a_bad_thread_count_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"threads=\(1, 0\)\): each must be an integer >= 1"):
        compare_forms(str(tmp_path), np.zeros((1, 8, 8, 3)), [0], [0], threads=(1, 0))


def test_a_form_that_did_not_load_for_timing_says_why_and_the_ratios_use_the_next_form(forms):
    *_, rows = forms
    broken = FormRow(rows[0].name, rows[0].file, rows[0].bytes, rows[0].top1, rows[0].change,
                     {1: "InvalidArgumentError: no such device", 2: "InvalidArgumentError: x"})
    table = forms_markdown([broken, *rows[1:]], 64)
    assert "| not measured: InvalidArgumentError: no such device |" in table
    assert f"1 thread: ms, x {rows[1].name} per round" in table
