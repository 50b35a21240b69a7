"""Block sparsity on Keras 3 (any backend): blocks kept by pooled magnitude vs q * sigma."""
import keras
import numpy as np
import pytest
from reference import reference_pooled

import tf_stdprune
from tf_stdprune.keras3.prune import wrappers


@pytest.mark.parametrize("block, pooling", [((2, 3), "AVG"), ((3, 2), "MAX"), ((4, 1), "AVG")])
def test_block_sparsity_keeps_blocks_whose_pooled_magnitude_reaches_q_sigma(block, pooling):
    """The mask is the numpy oracle's kept blocks, expanded and cropped to the kernel."""
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(7, name="d")])
    pruned = tf_stdprune.prune_low_std(model, block_size=block, block_pooling_type=pooling)
    (wrapper,) = wrappers(pruned)
    kernel = keras.ops.convert_to_numpy(wrapper.layer.kernel)
    pooled = reference_pooled(kernel, block, pooling)
    middle = np.sort(pooled, axis=None)[pooled.size // 2 - 1: pooled.size // 2 + 1].mean()
    q = float(middle / np.std(pooled))  # half the blocks fall below q * sigma, none near it
    wrapper.update_masks(q)
    keep = pooled >= q * np.std(pooled)
    expected = np.kron(keep, np.ones(block, bool))[:kernel.shape[0], :kernel.shape[1]]
    assert 0 < keep.sum() < keep.size
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(wrapper.masks[0]).astype(bool),
                                  expected)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(wrapper.layer.kernel),
                                  np.where(expected, kernel, 0.0))
    assert wrapper.get_config()["block_size"] == list(block)


def test_block_sparsity_refuses_kernels_that_are_not_2d_and_bad_arguments():
    conv = keras.Sequential([keras.Input((5, 5, 1)), keras.layers.Conv2D(2, 3)])
    with pytest.raises(ValueError, match="2-D"):
        tf_stdprune.prune_low_std(conv, block_size=(2, 2))
    with pytest.raises(ValueError, match="block_pooling_type"):
        tf_stdprune.prune_low_std(conv, block_size=(2, 2), block_pooling_type="SUM")
    with pytest.raises(ValueError, match="exclude each other"):
        tf_stdprune.prune_low_std(conv, block_size=(1, 4), sparsity_m_by_n=(2, 4))
