"""`PruneForLatencyOnXNNPack` on Keras 3: only 1x1 Conv2D wrapped; unsupported graphs refused."""
import keras
import pytest

import tf_stdprune
from tf_stdprune.keras3.prune import wrappers

L = keras.layers


def xnnpack_model(middle=None):
    inputs = keras.Input((16, 16, 3))
    hidden = L.ReLU()(L.Conv2D(8, 3, strides=2, padding="valid")(L.ZeroPadding2D(1)(inputs)))
    branch = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(8, 1, name="expand")(hidden)))
    branch = L.DepthwiseConv2D(3, padding="same")(branch)
    if middle is not None:
        branch = middle(branch)
    hidden = L.Add()([hidden, L.Conv2D(8, 1, name="project")(branch)])
    return keras.Model(inputs, L.Dense(2, name="head")(L.GlobalAveragePooling2D()(hidden)))


def test_only_the_1x1_convolutions_are_wrapped():
    pruned = tf_stdprune.prune_low_std(xnnpack_model(),
                                       pruning_policy=tf_stdprune.PruneForLatencyOnXNNPack())
    assert sorted(w.layer.name for w in wrappers(pruned)) == ["expand", "project"]
    without = tf_stdprune.prune_low_std(xnnpack_model())
    assert "head" in [w.layer.name for w in wrappers(without)]  # the policy made the difference


def test_keras_applications_mobilenet_v2_is_refused_at_its_asymmetric_padding():
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35)
    with pytest.raises(ValueError, match="block_1_depthwise"):
        tf_stdprune.prune_low_std(model, pruning_policy=tf_stdprune.PruneForLatencyOnXNNPack())


def test_a_layer_outside_xnnpack_sparse_inference_is_named():
    with pytest.raises(ValueError, match="MaxPooling2D"):
        tf_stdprune.prune_low_std(xnnpack_model(L.MaxPooling2D(1)),
                                  pruning_policy=tf_stdprune.PruneForLatencyOnXNNPack())
    with pytest.raises(TypeError, match="models only"):
        tf_stdprune.prune_low_std(L.Conv2D(2, 1),
                                  pruning_policy=tf_stdprune.PruneForLatencyOnXNNPack())
