"""Keras 3 pruning under Keras's and TensorFlow's distribution engines: masks identical on
every replica, sharded like their kernels, and equal to a run on one device.

The runs happen in two subprocesses (distribution_run.py), one per backend, since the
device count and the backend are fixed before Keras starts: JAX gets 2 host devices,
TensorFlow 2 logical CPUs. Each subprocess runs all of its backend's cases in turn.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distribution_run.py")
pytestmark = pytest.mark.slow

RUNS = {"jax": [f"{model}:{mode}" for model in ("dense", "gemma")
                for mode in ("single", "data", "model")] + ["flat:outside"],
        "tensorflow": ["gpt2:single", "gpt2:mirrored"]}


def _run(out_dir, backend):
    result = subprocess.run([sys.executable, SCRIPT, str(out_dir), backend, *RUNS[backend]],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {run: dict(np.load(out_dir / f"{run.replace(':', '_')}.npz")) for run in RUNS[backend]}


@pytest.fixture(scope="module")
def jax_masks(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("jax"), "jax")


def _assert_same_masks(single, distributed):
    names = [k for k in single if ":" in k]
    assert names and sorted(names) == sorted(k for k in distributed if ":" in k)
    for name in names:
        assert 0 < (single[name] == 0).mean() < 1, name  # the run did prune
        np.testing.assert_array_equal(distributed[name], single[name], err_msg=name)


@pytest.mark.parametrize("model", ["dense", "gemma"])
def test_data_and_model_parallel_on_jax_give_the_masks_of_one_device(jax_masks, model):
    """DataParallel replicates each mask identically; ModelParallel (Gemma: KerasHub's
    get_layout_map) shards each mask as its kernel; both equal the single-device masks."""
    single = jax_masks[f"{model}:single"]
    for mode in ("data", "model"):
        distributed = jax_masks[f"{model}:{mode}"]
        _assert_same_masks(single, distributed)
        assert int(distributed["distinct"]) == 0
    assert int(distributed["unlike_kernel"]) == 0 and int(distributed["sharded"]) > 0
    assert int(jax_masks[f"{model}:data"]["copies"]) == 2


def test_mirrored_strategy_on_tensorflow_keeps_one_mask_on_every_replica(tmp_path):
    masks = _run(tmp_path, "tensorflow")
    mirrored = masks["gpt2:mirrored"]
    _assert_same_masks(masks["gpt2:single"], mirrored)
    assert int(mirrored["copies"]) == 2 and int(mirrored["distinct"]) == 0


def test_a_kernel_created_before_model_parallel_was_set_is_refused_naming_layer_and_fix(
        jax_masks):
    """Its mask could not be placed like it: the error names the layer and the fix."""
    error = str(jax_masks["flat:outside"]["error"])
    assert "dense_in" in error and "set_distribution" in error and "skip=" in error
