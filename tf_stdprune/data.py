"""Data: CIFAR-10 through tensorflow-datasets, and scikit-learn's digits for offline runs.

`cifar10` and `digits` both return ``(train, test, info)``: batched ``tf.data`` datasets
of ``(image, label)`` pairs and a `DataInfo`. Images are float32 ``(32, 32, 3)``,
normalised per channel from ``x`` in [0, 1]::

    x' = (x - mean_c) / std_c

labels are int64 class indices. Training images are augmented before normalisation as
torchvision's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` do: ``pad`` black
pixels on every side, a random crop back to the original size, and (CIFAR-10 only; digits
are not mirror-symmetric) a random left-right flip. Pipeline: cache (decoded images) ->
permute (training) -> augment + normalise (parallel) -> batch -> prefetch (AUTOTUNE).

All the training pipeline's randomness comes from one `tf.random.Generator`,
``info.generator``: each pass over the data (each epoch) draws one shuffle seed and one
augmentation seed from it, and every image's crop and flip use stateless ops seeded by
that seed and the image's position in the pass. Saving and restoring the generator's
state (e.g. ``restore_run(..., extras={"data_rng": info.generator})``) therefore repeats
the exact same epochs after a resume.
"""
import dataclasses
import math
import os
import urllib.request

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
PAD = 4
_PROBE_TIMEOUT_S = 5


class DatasetUnavailableError(FileNotFoundError):
    """A data set is neither prepared on disk nor downloadable from here."""


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a training script needs to know about a loaded data set."""

    name: str
    num_classes: int
    image_shape: tuple
    train_examples: int
    test_examples: int
    batch_size: int
    mean: tuple
    std: tuple
    generator: tf.random.Generator = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def steps_per_epoch(self):
        """Training batches per epoch, ``ceil(train_examples / batch_size)``."""
        return math.ceil(self.train_examples / self.batch_size)


def augment_image(image, seed, pad=PAD, flip=True):
    """Zero-pads ``pad`` pixels on each side, crops back to the input size at an offset
    drawn from ``seed`` (int64 [2], stateless), then flips left-right with probability
    1/2 if ``flip``."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.shape(image)
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.stateless_random_crop(image, shape, crop_seed)
    return tf.image.stateless_random_flip_left_right(image, flip_seed) if flip else image


def pipeline(data, mean, std, batch_size, training, augment=False, flip=True,
             shuffle_buffer=10_000, generator=None):
    """Batched ``(x', y)`` from unbatched ``(image, label)``; see the module docstring.

    ``image`` is uint8 in [0, 255] or float in [0, 1]. Training passes are full random
    permutations of the (cached) data; ``shuffle_buffer <= 1`` keeps the order instead
    (useful to compare against the source). ``generator``: the training
    pipeline's `tf.random.Generator` (default: seeded from the operating system).
    """
    mean, std = tf.constant(mean, tf.float32), tf.constant(std, tf.float32)

    def prepare(image, label, seed=None):
        image = tf.image.convert_image_dtype(image, tf.float32)  # uint8 / 255; floats as they are
        if seed is not None:
            image = augment_image(image, seed, PAD, flip)
        return (image - mean) / std, tf.cast(label, tf.int64)

    data = data.cache()
    if not training:
        return data.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(
            tf.data.AUTOTUNE)
    size = int(data.cardinality())
    generator = generator or _generator(None)

    shuffled = shuffle_buffer > 1

    @tf.autograph.experimental.do_not_convert
    def one_pass(_):
        seeds = generator.make_seeds(2)  # [2, 2]: the order's and the augmentation's
        examples = data.batch(size).get_single_element()  # the cached pass as two tensors
        order = tf.range(size, dtype=tf.int64)
        if shuffled:
            order = tf.random.experimental.stateless_shuffle(order, seeds[:, 0])

        def example(position, index):
            image, label = (tf.gather(t, index) for t in examples)
            return prepare(image, label, tf.stack([seeds[0, 1], position]) if augment else None)

        positions = tf.data.Dataset.range(size)
        return tf.data.Dataset.zip(positions, tf.data.Dataset.from_tensor_slices(order)).map(
            example, num_parallel_calls=tf.data.AUTOTUNE)

    # One element whose expansion draws the seeds: each new iterator (each epoch) draws anew.
    passes = tf.data.Dataset.from_tensors(0).flat_map(one_pass)
    passes = passes.apply(tf.data.experimental.assert_cardinality(size))
    return passes.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _generator(seed):
    """The training pipeline's generator: seeded by ``seed``, or by the system if None."""
    if seed is None:
        return tf.random.Generator.from_non_deterministic_state()
    return tf.random.Generator.from_seed(seed)


def _check_batch_size(batch_size):
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")


def _unreachable(url):
    """``None`` if ``url``'s server answers within a few seconds, else the error."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                               timeout=_PROBE_TIMEOUT_S).close()
    except urllib.request.HTTPError:
        return None  # the server answered
    except (OSError, ValueError) as error:  # URLError, timeouts, DNS failures
        return error
    return None


def _ensure_prepared(builder, download):
    """Downloads and prepares ``builder`` if needed and possible, else raises at once.

    Before a download the source is probed with one short request, so that a machine
    without network fails in seconds instead of in tfds's retry loop.
    """
    if builder.is_prepared():
        return
    reason = "download=False"
    if download:
        error = _unreachable(CIFAR10_URL)
        if error is None:
            try:
                builder.download_and_prepare()
                return
            except Exception as exc:  # tfds raises many kinds of download errors
                error = exc
        reason = f"download failed: {type(error).__name__}: {error}"
    raise DatasetUnavailableError(
        f"CIFAR-10 is not prepared in {builder.data_dir!r} and could not be downloaded "
        f"({reason}). To provide it, pass data_dir (--data_dir in the example) pointing at "
        "a tensorflow-datasets data directory that holds cifar10/: on a connected machine "
        "run `tfds build cifar10` (or `python -c \"import tensorflow_datasets as tfds; "
        "tfds.load('cifar10')\"`) and copy ~/tensorflow_datasets/cifar10 into it. "
        "To run offline without it, use --dataset=digits (tf_stdprune.data.digits)."
    )


def cifar10(data_dir=None, batch_size=128, augment=True, download=True,
            shuffle_buffer=10_000, max_train_examples=None, seed=None):
    """``(train, test, info)`` for CIFAR-10 via ``tfds.load("cifar10", data_dir=...)``.

    ``data_dir=None`` is tfds's default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    Raises `DatasetUnavailableError` within seconds when CIFAR-10 is not prepared there
    and cannot be downloaded (``download=False`` never touches the network).
    ``max_train_examples`` keeps only the first examples of the training split.
    """
    _check_batch_size(batch_size)
    generator = _generator(seed)
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    _ensure_prepared(tfds.builder("cifar10", data_dir=data_dir), download)
    (train, test), tfds_info = tfds.load(
        "cifar10", split=["train", "test"], data_dir=data_dir, download=False,
        as_supervised=True, with_info=True)
    if max_train_examples:
        train = train.take(max_train_examples)
    info = DataInfo("cifar10", tfds_info.features["label"].num_classes, (32, 32, 3),
                    int(train.cardinality()), int(test.cardinality()), batch_size,
                    CIFAR10_MEAN, CIFAR10_STD, generator)
    logging.info("cifar10: %d training and %d test images", info.train_examples, info.test_examples)
    train = pipeline(train, CIFAR10_MEAN, CIFAR10_STD, batch_size, training=True,
                     augment=augment, shuffle_buffer=shuffle_buffer, generator=generator)
    test = pipeline(test, CIFAR10_MEAN, CIFAR10_STD, batch_size, training=False)
    return train, test, info


def digits_arrays(image_size=32, test_fraction=0.2, seed=0):
    """scikit-learn's 1,797 real 8x8 digits as ``image_size``^2 x 3 float32 images in [0, 1].

    Pixels (0..16) are divided by 16, resized bilinearly (``tf.image.resize``), clipped to
    [0, 1] and replicated to 3 channels. The train/test split is fixed and stratified
    (``train_test_split(..., stratify=labels, random_state=seed)``).
    Returns ``(x_train, y_train, x_test, y_test)``.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError(
            "The digits data set comes with scikit-learn: pip install scikit-learn "
            "(or pip install 'tf_stdprune[test]')."
        ) from error
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be an integer >= 1 (32 for VGG19), got {image_size!r}.")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
    digits = load_digits()
    images = tf.image.resize(digits.images[..., None] / 16.0, [image_size, image_size])
    images = np.repeat(np.clip(images.numpy(), 0.0, 1.0).astype(np.float32), 3, axis=-1)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target.astype(np.int64), test_size=test_fraction,
        stratify=digits.target, random_state=seed)
    return x_train, y_train, x_test, y_test


def digits(image_size=32, test_fraction=0.2, seed=0, batch_size=64, augment=False,
           max_train_examples=None):
    """``(train, test, info)`` datasets of scikit-learn's digits (see `digits_arrays`).

    Normalised with the training split's mean and std (the same for the 3 replicated
    channels); ``augment`` pads 4 pixels and crops at random (no flip). The training
    set is reshuffled every epoch (seeded by ``seed``).
    """
    _check_batch_size(batch_size)
    x_train, y_train, x_test, y_test = digits_arrays(image_size, test_fraction, seed)
    if max_train_examples:
        x_train, y_train = x_train[:max_train_examples], y_train[:max_train_examples]
    mean, std = (float(x_train.mean()),) * 3, (float(x_train.std()),) * 3
    info = DataInfo("digits", 10, x_train.shape[1:], len(x_train), len(x_test), batch_size,
                    mean, std, _generator(seed))
    train = pipeline(tf.data.Dataset.from_tensor_slices((x_train, y_train)), mean, std,
                     batch_size, training=True, augment=augment, flip=False,
                     shuffle_buffer=len(x_train), generator=info.generator)
    test = pipeline(tf.data.Dataset.from_tensor_slices((x_test, y_test)), mean, std,
                    batch_size, training=False)
    return train, test, info
