"""Data: CIFAR-10 through tensorflow-datasets, and scikit-learn's digits for offline runs.

CIFAR-10 training images get the usual augmentation (pad 4, random 32x32 crop,
horizontal flip); all images are normalised per channel, ``x' = (x/255 - mean) / std``.
"""
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class DatasetUnavailableError(FileNotFoundError):
    """A data set is neither on disk nor downloadable here."""


def _normalise(image, mean, std):
    return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def _augment(image):
    image = tf.image.resize_with_crop_or_pad(image, 40, 40)
    image = tf.image.random_crop(image, [32, 32, 3])
    return tf.image.random_flip_left_right(image)


def pipeline(images, labels, batch_size, training, mean, std, augment=True, seed=0):
    """A ``tf.data`` pipeline: cache, (shuffle, augment), normalise, batch, prefetch."""
    data = tf.data.Dataset.from_tensor_slices((images, labels)).cache()
    if training:
        data = data.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
        if augment:
            data = data.map(lambda x, y: (_augment(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    data = data.map(lambda x, y: (_normalise(x, mean, std), y), num_parallel_calls=tf.data.AUTOTUNE)
    return data.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def cifar10(data_dir=None, batch_size=128, augment=True, download=True):
    """``(train, test, info)`` for CIFAR-10 from tensorflow-datasets.

    Raises `DatasetUnavailableError` at once (no network retries) when the data set is
    not prepared in ``data_dir`` and cannot be downloaded.
    """
    builder = tfds.builder("cifar10", data_dir=data_dir)
    if not builder.is_prepared():
        error = None
        if download:
            try:
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(max_examples_per_split=None))
            except Exception as exc:  # tfds raises many kinds of network errors
                error = exc
        if error is not None or not builder.is_prepared():
            raise DatasetUnavailableError(
                f"CIFAR-10 is not prepared in {builder.data_dir!r} and could not be downloaded "
                f"({type(error).__name__ if error else 'download disabled'}). Either pass "
                "--data_dir=DIR pointing at a tensorflow-datasets directory that holds cifar10/ "
                "(run `tfds build cifar10` on a connected machine and copy "
                "~/tensorflow_datasets/cifar10 here), or run offline with --dataset=digits."
            ) from error
    splits = {split: tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
              for split in ("train", "test")}
    mean, std = np.array(CIFAR10_MEAN, np.float32), np.array(CIFAR10_STD, np.float32)
    train = pipeline(splits["train"]["image"], splits["train"]["label"], batch_size, True,
                     mean, std, augment)
    test = pipeline(splits["test"]["image"], splits["test"]["label"], batch_size, False, mean, std)
    return train, test, builder.info


def digits_arrays(image_size=32, test_fraction=0.2, seed=0):
    """scikit-learn's 1,797 real 8x8 digits as uint8 ``image_size``^2 x 3 images.

    Returns ``(x_train, y_train, x_test, y_test)`` from a fixed stratified split.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError("The digits data set needs scikit-learn: pip install scikit-learn") from error
    digits = load_digits()
    images = digits.images[..., None] * (255.0 / 16.0)
    images = tf.image.resize(images, [image_size, image_size], method="bilinear")
    images = np.repeat(np.clip(np.round(images.numpy()), 0, 255).astype(np.uint8), 3, axis=-1)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, stratify=digits.target, random_state=seed)
    return x_train, y_train, x_test, y_test


def digits(batch_size=64, image_size=32, test_fraction=0.2, seed=0, augment=False):
    """``(train, test, num_classes)`` datasets of the digits, normalised with their own
    per-channel mean and std (computed on the training split)."""
    x_train, y_train, x_test, y_test = digits_arrays(image_size, test_fraction, seed)
    mean = np.full(3, x_train.mean() / 255.0, np.float32)
    std = np.full(3, x_train.std() / 255.0, np.float32)
    train = pipeline(x_train, y_train, batch_size, True, mean, std, augment, seed)
    test = pipeline(x_test, y_test, batch_size, False, mean, std)
    return train, test, 10
