"""Keras 3 pruning under Keras's and TensorFlow's distribution engines: masks identical on
every replica, sharded like their kernels, and equal to a run on one device.

Each run is a subprocess (distribution_run.py): the device count and the backend are
fixed before Keras starts. JAX gets 2 host devices, TensorFlow 2 logical CPUs.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distribution_run.py")
pytestmark = pytest.mark.slow


def _masks(tmp_path, mode, model):
    out = tmp_path / f"{mode}_{model}.npz"
    result = subprocess.run([sys.executable, SCRIPT, str(out), mode, model],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(out))


def _assert_same_masks(single, distributed):
    names = [k for k in single if ":" in k]
    assert names and sorted(names) == sorted(k for k in distributed if ":" in k)
    for name in names:
        assert 0 < (single[name] == 0).mean() < 1, name  # the run did prune
        np.testing.assert_array_equal(distributed[name], single[name], err_msg=name)


@pytest.mark.parametrize("model", ["dense", "gemma"])
def test_data_and_model_parallel_on_jax_give_the_masks_of_one_device(tmp_path, model):
    """DataParallel replicates each mask identically; ModelParallel (Gemma: KerasHub's
    get_layout_map) shards each mask as its kernel; both equal the single-device masks."""
    single = _masks(tmp_path, "single", model)
    for mode in ("data", "model"):
        distributed = _masks(tmp_path, mode, model)
        _assert_same_masks(single, distributed)
        assert int(distributed["distinct"]) == 0
    assert int(distributed["unlike_kernel"]) == 0 and int(distributed["sharded"]) > 0


def test_mirrored_strategy_on_tensorflow_keeps_one_mask_on_every_replica(tmp_path):
    single = _masks(tmp_path, "single_tf", "gpt2")
    mirrored = _masks(tmp_path, "mirrored", "gpt2")
    _assert_same_masks(single, mirrored)
    assert int(mirrored["copies"]) == 2 and int(mirrored["distinct"]) == 0
