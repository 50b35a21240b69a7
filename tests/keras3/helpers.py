"""Keras 3 test helpers: the backend under test and a tiny model (no tf_keras here)."""
import keras

BACKEND = keras.backend.backend()


def tiny_cnn(num_classes=3, l2=0.0):
    """Conv-BN-ReLU-pool, then Dense, as a Keras 3 Sequential model."""
    reg = keras.regularizers.L2(l2) if l2 else None
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3, padding="same", kernel_regularizer=reg, name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(num_classes, kernel_regularizer=reg, name="dense"),
    ])
