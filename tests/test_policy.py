"""`PruneForLatencyOnXNNPack` (either Keras): the layers it lets the std rule prune and the
models it refuses, against tfmot's policy of that name on tf_keras."""
import pytest

import tf_stdprune
from tf_stdprune.keras2.engine import PruneLowMagnitude, keras, tfmot

L = keras.layers


def xnnpack_model(first_padding="valid", middle=None):
    """ZeroPadding(1) + 3x3/2 conv over 3 channels, 1x1 convs, depthwise, residual, GAP."""
    inputs = keras.Input((16, 16, 3))
    start = L.ZeroPadding2D(1)(inputs) if first_padding == "valid" else inputs
    hidden = L.ReLU()(L.Conv2D(8, 3, strides=2, padding=first_padding)(start))
    branch = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(8, 1)(hidden)))
    branch = L.DepthwiseConv2D(3, padding="same")(branch)
    if middle is not None:
        branch = middle(branch)
    hidden = L.Add()([hidden, L.Conv2D(8, 1)(branch)])
    return keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D(keepdims=True)(hidden)))


def wrapped_kinds(model):
    return sorted(f"{type(l.layer).__name__}{tuple(l.layer.kernel_size)}" for l in model.layers
                  if isinstance(l, PruneLowMagnitude))


def test_the_policy_wraps_the_same_layers_as_tfmots_on_tf_keras():
    theirs = tfmot.sparsity.keras.prune_low_magnitude(
        xnnpack_model(), pruning_policy=tfmot.sparsity.keras.PruneForLatencyOnXNNPack())
    ours = tf_stdprune.prune_low_std(xnnpack_model(),
                                     pruning_policy=tf_stdprune.PruneForLatencyOnXNNPack())
    assert wrapped_kinds(ours) == wrapped_kinds(theirs) == ["Conv2D(1, 1)", "Conv2D(1, 1)"]


@pytest.mark.parametrize("model", [
    lambda: keras.Sequential([L.Dense(2, input_shape=(3,))]),  # no start convolution
    lambda: xnnpack_model(middle=L.MaxPooling2D(1)),  # a layer XNNPACK cannot run NCHW
    lambda: keras.Model(*(lambda i: (i, L.Flatten()(L.Conv2D(4, 3, strides=2)(L.ZeroPadding2D(1)(i)))))(
        keras.Input((8, 8, 3)))),  # no global average pooling at the end
])
def test_the_policy_refuses_the_models_tfmot_refuses(model):
    with pytest.raises(ValueError):
        tfmot.sparsity.keras.PruneForLatencyOnXNNPack().ensure_model_supports_pruning(model())
    with pytest.raises(ValueError, match="PruneForLatencyOnXNNPack"):
        tf_stdprune.prune_low_std(model(), pruning_policy=tf_stdprune.PruneForLatencyOnXNNPack())


def test_a_same_padded_start_is_accepted_as_the_padded_valid_one():
    """'same' on the 3x3/2 start convolution is the padded 'valid' one for XNNPACK."""
    ours = tf_stdprune.prune_low_std(xnnpack_model("same"),
                                     pruning_policy=tf_stdprune.PruneForLatencyOnXNNPack())
    assert wrapped_kinds(ours) == ["Conv2D(1, 1)", "Conv2D(1, 1)"]
