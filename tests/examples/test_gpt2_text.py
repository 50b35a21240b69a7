"""The KerasHub example end to end on tiny settings: dense baseline, pruning, resume."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir,
                       "examples", "gpt2_text.py")
TINY = ["--train_bytes=12000", "--held_out_bytes=3000", "--sequence_length=32",
        "--num_layers=1", "--num_heads=2", "--hidden_dim=32", "--intermediate_dim=64",
        "--batch_size=32", "--baseline_epochs=1", "--qualities=0.5,1.0",
        "--epochs_per_iteration=1"]


def _run(out_dir):
    result = subprocess.run([sys.executable, EXAMPLE, f"--out_dir={out_dir}", *TINY],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gpt2")
    return out_dir, _run(out_dir)


@pytest.mark.slow
def test_the_summary_reports_what_the_saved_pruned_model_holds(finished):
    """The zeros of summary.json are the zeros of final.keras's Dense/EinsumDense kernels,
    counted again with numpy, and the pruned model reproduces the pruned perplexity."""
    import keras
    import keras_hub  # noqa: F401  (registers the KerasHub classes for loading)

    out_dir, stdout = finished
    summary = json.loads((out_dir / "summary.json").read_text())
    assert "pruned perplexity" in stdout and (out_dir / "summary.md").exists()
    model = keras.saving.load_model(str(out_dir / "final.keras"))
    assert type(model).__name__ == "GPT2CausalLM"
    kernels = [keras.ops.convert_to_numpy(layer.kernel)
               for layer in model._flatten_layers(include_self=False)
               if type(layer).__name__ in ("Dense", "EinsumDense")]
    assert len(kernels) >= 6  # q, k, v, output projections and the two feedforward kernels
    zeros = sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels)
    assert zeros == pytest.approx(summary["kernel_zeros"], abs=1e-9)
    assert 0.2 < zeros < 1.0 and np.isfinite(summary["pruned_perplexity"])
    assert 1.0 < summary["dense_perplexity"] < 256.0
    assert 1.0 < summary["control_perplexity"] < 256.0
    assert summary["control_perplexity"] != summary["dense_perplexity"]  # it trained on


@pytest.mark.slow
def test_running_again_resumes_and_trains_nothing_more(finished):
    """A second run reloads the baseline and the dense control, finds every iteration
    finished and reports the same figures."""
    out_dir, _ = finished
    before = json.loads((out_dir / "summary.json").read_text())
    stdout = _run(out_dir)
    assert "dense baseline: reloaded" in stdout and "dense control: reloaded" in stdout
    assert "resuming after 2 finished iterations" in stdout
    after = json.loads((out_dir / "summary.json").read_text())
    assert after == before
