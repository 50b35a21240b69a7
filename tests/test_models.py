"""vgg19_bn: the reference experiment's exact parameter counts, its layer order, L2 and width scaling."""
import numpy as np
import pytest
import tensorflow as tf

import tf_stdprune
from tf_stdprune.keras2.engine import keras
from tf_stdprune.models import vgg19_bn

# The reference experiment's table, written out again here (not imported from the module under test).
SEED_CONVS = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]


def arithmetic_counts(width=1.0, dense_units=4096, num_classes=10, channels=3):
    """(parameters, weights) by hand: conv 3x3 + bias + BN (4 per channel); dense + bias.

    Weights in the reference experiment's sense are kernels and BN gammas (no biases, betas, moving stats).
    """
    scale = lambda units: max(1, int(round(units * width)))  # noqa: E731
    parameters = weights = 0
    c_in = channels
    for units in SEED_CONVS:
        c = scale(units)
        parameters += 9 * c_in * c + c + 4 * c
        weights += 9 * c_in * c + c
        c_in = c
    # five 2x2 poolings take 32x32 to 1x1: the flattened size is the last conv's channels
    n_in = c_in
    for n in (scale(dense_units), scale(dense_units), num_classes):
        parameters += n_in * n + n
        weights += n_in * n
        n_in = n
    return parameters, weights


@pytest.fixture(scope="module")
def full_model():
    return vgg19_bn()


def test_seed_counts_at_width_one(full_model):
    assert arithmetic_counts() == (38_969_930, 38_939_712)
    assert arithmetic_counts(dense_units=4906) != (38_969_930, 38_939_712)  # the reference experiment's typo
    assert full_model.count_params() == 38_969_930
    report = tf_stdprune.sparsity_report(full_model)
    assert report.total_parameters == 38_969_930
    assert report.total_weights == 38_939_712
    # 39M random floats hold a few exact zeros; count them independently
    tensors = [l.kernel for l in full_model.layers if hasattr(l, "kernel")]
    tensors += [l.gamma for l in full_model.layers if hasattr(l, "gamma")]
    assert report.zero_weights == sum(int(np.sum(t.numpy() == 0)) for t in tensors)


def test_seed_layer_order(full_model):
    kinds = {keras.layers.Conv2D: "C", keras.layers.BatchNormalization: "B",
             keras.layers.ReLU: "R", keras.layers.MaxPooling2D: "M", keras.layers.Flatten: "F",
             keras.layers.Dense: "D", keras.layers.Dropout: "O", keras.layers.Activation: "A"}
    code = "".join(kinds[type(l)] for l in full_model.layers)
    block = lambda n: "CBR" * n + "M"  # noqa: E731
    assert code == block(2) + block(2) + block(4) + block(4) + block(4) + "F" + "DO" * 2 + "DA"
    convs = [l for l in full_model.layers if isinstance(l, keras.layers.Conv2D)]
    assert [l.filters for l in convs] == SEED_CONVS
    for conv in convs:
        assert conv.kernel_size == (3, 3) and conv.strides == (1, 1) and conv.padding == "same"
        assert conv.use_bias
    dense = [l for l in full_model.layers if isinstance(l, keras.layers.Dense)]
    assert [l.units for l in dense] == [4096, 4096, 10]
    assert [l.activation.__name__ for l in dense] == ["relu", "relu", "linear"]
    assert [l.rate for l in full_model.layers if isinstance(l, keras.layers.Dropout)] == [0.5, 0.5]
    assert full_model.output_shape == (None, 10)


@pytest.mark.parametrize("width", [0.25, 0.05, 0.001])
def test_width_scaling_matches_arithmetic(width):
    model = vgg19_bn(num_classes=7, width=width)
    parameters, weights = arithmetic_counts(width, num_classes=7)
    assert model.count_params() == parameters
    report = tf_stdprune.sparsity_report(model)
    assert (report.total_parameters, report.total_weights) == (parameters, weights)
    convs = [l.filters for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert min(convs) >= 1


def test_l2_on_kernels_only():
    model = vgg19_bn(width=0.05, weight_decay=1e-3, dense_units=64)
    kernels = [l.kernel.numpy() for l in model.layers
               if isinstance(l, (keras.layers.Conv2D, keras.layers.Dense))]
    expected = sorted(1e-3 * float(np.sum(np.square(k, dtype=np.float64))) for k in kernels)
    np.testing.assert_allclose(sorted(float(v) for v in model.losses), expected, rtol=1e-5)
    assert vgg19_bn(width=0.05, weight_decay=0.0, dense_units=64).losses == []


def test_dense_units_and_input_shape():
    model = vgg19_bn(num_classes=3, width=0.1, dense_units=100, input_shape=(64, 64, 1))
    dense = [l.units for l in model.layers if isinstance(l, keras.layers.Dense)]
    assert dense == [10, 10, 3]
    # 64x64 after five poolings is 2x2: flatten = 4 * last conv channels
    assert model.layers[-6].input_shape == (None, 4 * 51)
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 1)).astype("float32")
    assert model(x).shape == (2, 3)


def test_a_short_plan_builds_its_convolutions_and_the_same_classifier():
    model = vgg19_bn(num_classes=3, plan=(8, "M", 16, "M"), dense_units=32, input_shape=(8, 8, 3))
    kinds = [type(l).__name__ for l in model.layers]
    assert kinds == ["Conv2D", "BatchNormalization", "ReLU", "MaxPooling2D"] * 2 + [
        "Flatten", "Dense", "Dropout", "Dense", "Dropout", "Dense", "Activation"]
    # conv: 9 c_in c + c + 4 c; dense: n_in n + n (flatten = 2 x 2 x 16)
    expected = (9 * 3 * 8 + 5 * 8) + (9 * 8 * 16 + 5 * 16) + (64 * 32 + 32) + (32 * 32 + 32) + (
        32 * 3 + 3)
    assert model.count_params() == expected


def test_logits_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = vgg19_bn(width=0.05, dense_units=32)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.layers[0].compute_dtype == "bfloat16"
    logits = model(tf.zeros((2, 32, 32, 3)), training=False)
    assert logits.dtype == tf.float32


@pytest.mark.parametrize("kwargs, argument", [
    (dict(width=0), "width"), (dict(width=-1.0), "width"), (dict(num_classes=0), "num_classes"),
    (dict(num_classes=2.5), "num_classes"), (dict(dropout=1.0), "dropout"),
    (dict(weight_decay=-1e-4), "weight_decay"), (dict(plan=()), "plan"),
    (dict(plan=(8, "P")), "plan"), (dict(plan=(0, "M")), "plan"),
])
def test_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        vgg19_bn(**kwargs)
