"""Data loading: CIFAR-10 through tfds (mocked), its offline failure, and the digits set."""
import sys
import urllib.error
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tf_stdprune import data

MEAN, STD = np.array(data.CIFAR10_MEAN), np.array(data.CIFAR10_STD)
EXAMPLES = 24


@pytest.fixture
def mocked_cifar10():
    """tfds with random deterministic CIFAR-10 examples, reported as prepared on disk."""
    with tfds.testing.mock_data(num_examples=EXAMPLES), \
            mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True):
        raw = list(tfds.load("cifar10", split="test", as_supervised=True).as_numpy_iterator())
        yield np.stack([x for x, _ in raw]), np.array([y for _, y in raw])


def _batches(dataset):
    batches = list(dataset.as_numpy_iterator())
    return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches]), batches


def _crops(image, pad, flip):
    """Every image that pad + crop (+ flip) can make of ``image`` (numpy, zero padding)."""
    h, w = image.shape[:2]
    padded = np.pad(image, [(pad, pad), (pad, pad), (0, 0)])
    crops = [padded[i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    return np.stack(crops + [c[:, ::-1] for c in crops] if flip else crops)


def _is_augmentation_of(augmented, raw01, mean, std, flip):
    candidates = (_crops(raw01, data.PAD, flip) - mean) / std
    return np.any(np.all(np.isclose(candidates, augmented, atol=1e-5), axis=(1, 2, 3)))


def test_cifar10_shapes_dtypes_batches(mocked_cifar10):
    train, test, info = data.cifar10("/unused", batch_size=10)
    assert (info.name, info.num_classes, info.image_shape) == ("cifar10", 10, (32, 32, 3))
    assert (info.train_examples, info.test_examples) == (EXAMPLES, EXAMPLES)
    assert info.steps_per_epoch == 3
    for dataset in (train, test):
        x, y, batches = _batches(dataset)
        assert [len(b[1]) for b in batches] == [10, 10, 4]
        assert x.shape == (EXAMPLES, 32, 32, 3) and x.dtype == np.float32 and y.dtype == np.int64
    _, _, small = data.cifar10("/unused", batch_size=4, max_train_examples=6)
    assert (small.train_examples, small.steps_per_epoch) == (6, 2)


def test_cifar10_normalisation(mocked_cifar10):
    raw_x, raw_y = mocked_cifar10
    _, test, _ = data.cifar10(batch_size=7)
    x, y, _ = _batches(test)
    np.testing.assert_allclose(x, (raw_x / 255.0 - MEAN) / STD, atol=1e-5)
    np.testing.assert_array_equal(y, raw_y)


def test_cifar10_augmentation_changes_images_not_labels(mocked_cifar10):
    raw_x, raw_y = mocked_cifar10
    tf.random.set_seed(1)
    train, _, _ = data.cifar10(batch_size=8, shuffle_buffer=1)  # order kept to compare
    x, y, _ = _batches(train)
    np.testing.assert_array_equal(y, raw_y)
    plain = (raw_x / 255.0 - MEAN) / STD
    changed = [not np.allclose(a, p, atol=1e-5) for a, p in zip(x, plain)]
    assert sum(changed) >= EXAMPLES // 2  # 161 of 162 crop/flip choices change the image
    for augmented, raw in zip(x, raw_x):
        assert _is_augmentation_of(augmented, raw / 255.0, MEAN, STD, flip=True)
    unaugmented, _, _ = data.cifar10(batch_size=8, shuffle_buffer=1, augment=False)
    np.testing.assert_allclose(_batches(unaugmented)[0], plain, atol=1e-5)


def test_cifar10_reshuffles_training_set(mocked_cifar10):
    _, raw_y = mocked_cifar10
    train, _, _ = data.cifar10(batch_size=EXAMPLES, augment=False, seed=3)
    first, second = (next(iter(train))[1].numpy() for _ in range(2))
    np.testing.assert_array_equal(np.sort(first), np.sort(raw_y))
    assert not np.array_equal(first, second)


@pytest.fixture
def no_download(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("download_and_prepare must not be called")
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", forbidden)


def _check_message(error, data_dir):
    message = str(error)
    assert isinstance(error, FileNotFoundError)
    for hint in (str(data_dir), "--data_dir", "tfds build cifar10",
                 "~/tensorflow_datasets/cifar10", "--dataset=digits"):
        assert hint in message, hint


def test_cifar10_absent_without_download(tmp_path, no_download):
    with pytest.raises(data.DatasetUnavailableError) as error:
        data.cifar10(str(tmp_path), download=False)
    _check_message(error.value, tmp_path)
    assert "download=False" in str(error.value)


def test_cifar10_absent_and_unreachable_fails_before_download(tmp_path, monkeypatch,
                                                               no_download):
    def offline(request, timeout):
        assert timeout <= 10 and request.get_method() == "HEAD"
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(data.DatasetUnavailableError) as error:
        data.cifar10(str(tmp_path))
    _check_message(error.value, tmp_path)
    assert "Name or service not known" in str(error.value)


def test_cifar10_failed_download_is_wrapped(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout: mock.MagicMock())

    def broken(self, *args, **kwargs):
        raise ConnectionResetError("connection reset by peer")
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", broken)
    with pytest.raises(data.DatasetUnavailableError, match="ConnectionResetError") as error:
        data.cifar10(str(tmp_path))
    _check_message(error.value, tmp_path)


def test_digits_arrays_fixed_stratified_split():
    from sklearn.datasets import load_digits
    digits = load_digits()
    x_train, y_train, x_test, y_test = data.digits_arrays(image_size=8)
    assert len(x_train) + len(x_test) == 1797 and len(x_test) == 360
    # At 8x8 the resize is the identity: the split is a partition of the 1,797 images.
    both = np.concatenate([x_train, x_test])
    assert np.array_equal(both[..., 0], both[..., 2])
    key = lambda images: sorted(i.tobytes() for i in images)  # noqa: E731
    assert key(both[..., 0]) == key((digits.images / 16.0).astype(np.float32))
    counts = np.bincount(digits.target)
    np.testing.assert_array_equal(np.bincount(np.concatenate([y_train, y_test])), counts)
    assert np.all(np.abs(np.bincount(y_test) - 0.2 * counts) <= 1)  # stratified
    again = data.digits_arrays(image_size=8)
    np.testing.assert_array_equal(again[0], x_train)
    np.testing.assert_array_equal(again[3], y_test)
    assert not np.array_equal(data.digits_arrays(image_size=8, seed=1)[3], y_test)


def _bilinear_matrix(size_in, size_out):
    """Rows: the weights of bilinear resizing with half-pixel centres, edge-clamped."""
    matrix = np.zeros((size_out, size_in))
    for i in range(size_out):
        source = min(max((i + 0.5) * size_in / size_out - 0.5, 0.0), size_in - 1)
        low = int(np.floor(source))
        high = min(low + 1, size_in - 1)
        matrix[i, low] += 1 - (source - low)
        matrix[i, high] += source - low
    return matrix


def test_digits_resized_to_32():
    x8 = data.digits_arrays(image_size=8)[0]
    x32, y32 = data.digits_arrays(image_size=32)[:2]
    assert x32.shape == (1437, 32, 32, 3) and x32.dtype == np.float32 and y32.dtype == np.int64
    np.testing.assert_array_equal(x32[..., 0], x32[..., 1])
    resize = _bilinear_matrix(8, 32)  # same split order: the 8x8 images upsampled by hand
    expected = np.clip(np.einsum("ij,njk,lk->nil", resize, x8[..., 0], resize), 0, 1)
    np.testing.assert_allclose(x32[..., 0], expected, atol=1e-5)


def test_digits_datasets_normalised():
    x_train, y_train, x_test, y_test = data.digits_arrays()
    train, test, info = data.digits(batch_size=100)
    mean, std = x_train.mean(), x_train.std()
    assert info.mean == (pytest.approx(mean),) * 3 and info.std == (pytest.approx(std),) * 3
    assert (info.num_classes, info.train_examples, info.test_examples) == (10, 1437, 360)
    x, y, batches = _batches(test)
    assert len(batches) == 4 and x.dtype == np.float32
    np.testing.assert_allclose(x, (x_test - mean) / std, atol=1e-5)
    np.testing.assert_array_equal(y, y_test)
    x, y, batches = _batches(train)
    assert len(batches) == info.steps_per_epoch == 15
    assert abs(x.mean()) < 1e-4 and abs(x.std() - 1.0) < 1e-4
    np.testing.assert_array_equal(np.sort(y), np.sort(y_train))
    assert not np.array_equal(y, y_train)  # shuffled
    _, _, small = data.digits(batch_size=8, max_train_examples=20)
    assert (small.train_examples, small.steps_per_epoch) == (20, 3)


def test_digits_augmentation_shifts_without_flipping():
    x_train, y_train = data.digits_arrays()[:2]
    images, labels = x_train[:16], y_train[:16]
    tf.random.set_seed(2)
    dataset = data.pipeline(tf.data.Dataset.from_tensor_slices((images, labels)), 0.3, 0.3,
                            batch_size=16, training=True, augment=True, flip=False,
                            shuffle_buffer=1)
    x, y, _ = _batches(dataset)
    np.testing.assert_array_equal(y, labels)
    assert sum(not np.allclose(a, (i - 0.3) / 0.3, atol=1e-5) for a, i in zip(x, images)) >= 8
    for augmented, image in zip(x, images):
        assert _is_augmentation_of(augmented, image, 0.3, 0.3, flip=False)


def test_restoring_the_generator_repeats_order_and_augmentation_bit_for_bit():
    """Two epochs, then the generator's state put back: the same two epochs again (order
    and crops); a third epoch differs. A checkpoint of info.generator is an exact resume."""
    train, _, info = data.digits(image_size=12, batch_size=32, augment=True, seed=4,
                                 max_train_examples=64)
    start = info.generator.state.numpy()
    epochs = [_batches(train)[:2] for _ in range(2)]
    info.generator.reset(start)
    for expected in epochs:
        again = _batches(train)[:2]
        np.testing.assert_array_equal(again[0], expected[0])
        np.testing.assert_array_equal(again[1], expected[1])
    assert not np.array_equal(epochs[0][0], epochs[1][0])
    assert not np.array_equal(_batches(train)[0], epochs[1][0])
    _, _, other = data.digits(image_size=12, batch_size=32, seed=4, max_train_examples=64)
    np.testing.assert_array_equal(other.generator.state.numpy(), start)  # seeded by seed


def test_digits_needs_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        data.digits()


@pytest.mark.parametrize("call, argument", [
    (lambda: data.digits(batch_size=0), "batch_size"),
    (lambda: data.digits(test_fraction=1.0), "test_fraction"),
    (lambda: data.digits(image_size=0), "image_size"),
    (lambda: data.cifar10(batch_size=-1), "batch_size"),
])
def test_bad_arguments(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()
