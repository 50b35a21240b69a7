"""`vgg19_bn`: the reference experiment's VGG19_BN_drop_10 for 32x32x3 images.

Convolutions (3x3, stride 1, same padding, with bias), each followed by
BatchNormalization and ReLU; ``M`` is 2x2 max pooling::

    [64, 64, M, 128, 128, M, 256 x4, M, 512 x4, M, 512 x4, M]

then Flatten -> Dense 4096 -> ReLU -> Dropout -> Dense 4096 -> ReLU -> Dropout -> Dense 10
(logits). The reference note's "4906" is a typo for 4096: only 4096 gives its counts. At width 1 the
model has exactly 38,969,930 parameters (BN moving statistics included) of which
38,939,712 are "weights" in the reference experiment's sense (kernels + BN gammas)::

    parameters = sum_conv (9 c_in c + c + 4 c) + sum_dense (n_in n + n)
    weights    = sum_conv (9 c_in c + c)     + sum_dense (n_in n)

(``4 c`` = BN gamma, beta, moving mean, moving variance; ``c`` of the first sum = gamma.)

The same function builds it with tf_keras (default) or with Keras 3 (``keras_module=keras``).
"""
from tf_stdprune import dispatch


VGG19_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def _scaled(units, width):
    """``max(1, round(units * width))``."""
    return max(1, int(round(units * width)))


def vgg19_bn(num_classes=10, width=1.0, dropout=0.5, weight_decay=5e-4,
             input_shape=(32, 32, 3), dense_units=4096, name="vgg19_bn", keras_module=None,
             plan=VGG19_CONFIG):
    """The reference experiment's VGG19-BN; ``width`` scales every conv and hidden dense layer's units.

    ``plan`` lists the feature extractor: conv units, and ``"M"`` for each pooling; the
    default is VGG19's. A shorter plan (e.g. ``(8, "M", 16, "M")``) gives a small model of
    the same kinds of layers, for tests.

    ``weight_decay`` is the L2 factor on every kernel (``loss += wd * sum(w^2)``; biases
    and BN parameters are not decayed). The logits are returned in float32 under a
    mixed-precision policy (a parameter-free float32 ``logits`` activation ends the model).
    ``keras_module`` is the Keras that builds it: ``tf_keras`` when None, or Keras 3's
    ``keras`` module.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}.")
    if not width > 0:
        raise ValueError(f"width must be > 0 (1.0 is the reference model), got {width!r}.")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1) (the reference experiment uses 0.5), got {dropout!r}.")
    if weight_decay is not None and not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0 (the reference experiment uses 5e-4), got {weight_decay!r}.")
    keras = dispatch.keras_module(dispatch.TF_KERAS) if keras_module is None else keras_module
    layers = keras.layers
    l2 = keras.regularizers.l2(weight_decay) if weight_decay else None
    model = keras.Sequential(name=name)
    model.add(keras.Input(input_shape))
    if not plan or any(item != "M" and not (isinstance(item, int) and item > 0) for item in plan):
        raise ValueError(f"plan must list conv units (integers > 0) and 'M' for pooling, "
                         f"got {plan!r}.")
    for item in plan:
        if item == "M":
            model.add(layers.MaxPooling2D())
            continue
        model.add(layers.Conv2D(_scaled(item, width), 3, padding="same", kernel_regularizer=l2))
        model.add(layers.BatchNormalization())
        model.add(layers.ReLU())
    model.add(layers.Flatten())
    for _ in range(2):
        model.add(layers.Dense(_scaled(dense_units, width), activation="relu",
                               kernel_regularizer=l2))
        model.add(layers.Dropout(dropout))
    model.add(layers.Dense(num_classes, kernel_regularizer=l2))
    model.add(layers.Activation("linear", dtype="float32", name="logits"))
    return model
