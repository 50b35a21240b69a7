"""Pruning under tf.distribute: masks, thresholds and sigmas identical on every replica.

Each strategy runs in a subprocess (tests/keras2/distributed_worker.py), since logical devices and
TF_CONFIG must be configured before TensorFlow initialises.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import free_port

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")


def _run(strategy, out, env=None):
    return subprocess.Popen([sys.executable, WORKER, strategy, str(out)],
                            env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process):
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "masks.npz"
    _finish(_run("single", out))
    return np.load(out)


def _assert_replicas_agree(result, single):
    pruning_keys = [k for k in result.files if not k.endswith("/weight")]
    assert pruning_keys
    for key in pruning_keys:
        replicas = result[key]
        for replica in replicas[1:]:
            np.testing.assert_array_equal(replica, replicas[0], err_msg=key)
    masks = [k for k in result.files if k.endswith("kernel/mask")]
    # Masks of the first pruning come from the (identical) initial weights; later ones
    # from weights trained on split batches, so compare the final sparsity loosely.
    # (BN gammas start at 1.0: sigma_0 = 0, nothing to prune from a fresh model.)
    for key in masks:
        weights = result[key.replace("/mask", "/weight")]
        for weight, mask in zip(weights, result[key]):
            assert np.all(weight[mask == 0] == 0.0), key
        assert 0.2 < 1 - result[key][0].mean() < 0.95, key
        overlap = np.mean(result[key][0] == single[key][0])
        assert overlap > 0.97, (key, overlap)


def test_mirrored_two_devices(tmp_path, single):
    out = tmp_path / "mirrored.npz"
    _finish(_run("mirrored", out))
    result = np.load(out)
    assert result[[k for k in result.files if k.endswith("/mask")][0]].shape[0] == 2
    _assert_replicas_agree(result, single)


def test_multi_worker_two_processes(tmp_path, single):
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    processes = [
        _run("multi_worker", tmp_path / f"worker{i}.npz",
             {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
        for i in range(2)
    ]
    for process in processes:
        _finish(process)
    results = [np.load(tmp_path / f"worker{i}.npz") for i in range(2)]
    for key in results[0].files:
        np.testing.assert_array_equal(results[0][key], results[1][key], err_msg=key)
    _assert_replicas_agree(results[0], single)
