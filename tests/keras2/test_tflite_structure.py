"""What `export_tflite(sparse=True)` writes for each structure: TFLite's block-sparse
FullyConnected for blocks of four inputs, a densified tensor for other patterns."""
import collections

import numpy as np
import pytest
import tensorflow as tf

import tf_stdprune
from tf_stdprune import mask_rule
from tf_stdprune.keras2.engine import keras


def _ops(path):
    interpreter = tf.lite.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    return collections.Counter(op["op_name"] for op in interpreter._get_ops_details())


def _block_pruned(block):
    model = keras.Sequential([keras.layers.Dense(32, input_shape=(64,), name="d")])
    pruned = tf_stdprune.prune_low_std(model, block_size=block)
    pooled = mask_rule.block_magnitudes(model.layers[0].kernel, block, "AVG").numpy()
    pruned.layers[0].pruning_obj.update_masks(np.quantile(pooled, 0.8) / pooled.std())
    return tf_stdprune.strip_pruning(pruned)


@pytest.mark.parametrize("block, densified", [((4, 1), False), ((1, 4), True)])
def test_blocks_of_four_inputs_reach_the_block_sparse_fully_connected_kernel(
        tmp_path, block, densified):
    """(4, 1) blocks of the [in, out] kernel are TFLite's 1x4: no DENSIFY, same outputs."""
    model = _block_pruned(block)
    assert 0.5 < np.mean(model.layers[0].kernel.numpy() == 0) < 1.0
    path = tf_stdprune.export_tflite(model, tmp_path / "m.tflite")
    ops = _ops(path)
    assert ops["FULLY_CONNECTED"] == 1 and (ops["DENSIFY"] == 1) == densified
    x = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
    with open(path, "rb") as f:
        got = tf_stdprune.keras2.tflite.run_tflite(f.read(), x)[0]
    np.testing.assert_allclose(got, model(x).numpy(), atol=1e-5)


def test_pruned_1x1_convolutions_are_stored_sparse_and_densified_for_xnnpack(tmp_path):
    """A pruned 1x1 kernel is written in the sparse format with a DENSIFY op before it."""
    model = keras.Sequential([keras.layers.Conv2D(16, 1, input_shape=(6, 6, 16), name="c")])
    pruned = tf_stdprune.prune_low_std(model)
    pruned.layers[0].pruning_obj.update_masks(1.5)
    path = tf_stdprune.export_tflite(tf_stdprune.strip_pruning(pruned), tmp_path / "c.tflite")
    assert _ops(path)["DENSIFY"] == 1
    with open(path, "rb") as f:
        assert tf_stdprune.compression.litert.sparse_tensor_count(f.read()) == 1
