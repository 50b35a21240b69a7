"""Helpers of the example script's tests (tf_keras and Keras 3): flags, runs, outputs.

The runs build the example's model with a short plan (`TINY_VGG`): the same layer kinds,
names and classifier as VGG19-BN, at a fraction of the build and trace time.
"""
import contextlib
import functools
import io
import os
import re

from absl import flags
import numpy as np
import pytest

from tf_stdprune import data, models

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples")
# At the tests' --width=0.05: conv 8 and 16 units, 32x32 -> 2x2, Dense 32, 32, 10.
TINY_VGG = functools.partial(models.vgg19_bn, plan=(160, "M", 320, "M", "M", "M"),
                             dense_units=640)
# ``python -c TINY_SCRIPT ARGS``: the example script with `TINY_VGG`, as its __main__ runs.
TINY_SCRIPT = f"""
import sys
sys.path[:0] = [{os.path.dirname(os.path.abspath(__file__))!r}, {EXAMPLES!r}]
from absl import app
import example_runs, vgg19_cifar10 as example
with example_runs.tiny_model(example):
    app.run(example.main, argv=["vgg19_cifar10.py", *sys.argv[1:]])
"""


@contextlib.contextmanager
def example_flags(*argv):
    """The example script's absl flags parsed from ``argv``, reset on exit."""
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["vgg19_cifar10.py", *argv])
    try:
        yield
    finally:
        flags.FLAGS.unparse_flags()


@contextlib.contextmanager
def tiny_model(example):
    """``example.main`` builds `TINY_VGG` while the context is open."""
    run = example.run
    example.run = functools.partial(run, build_model=TINY_VGG)
    try:
        yield
    finally:
        example.run = run


def run_example(example, *argv):
    """Runs ``example.main`` with the flags ``argv`` and `TINY_VGG`; returns what it printed."""
    with example_flags(*argv), tiny_model(example), \
            contextlib.redirect_stdout(io.StringIO()) as stdout:
        example.main(["vgg19_cifar10.py"])
    return stdout.getvalue()


def finished_fixture(example, name, flags):
    """A module fixture: ``(out_dir, stdout)`` of one run of ``example`` with ``flags`` in
    a new directory, shared by the module's tests."""
    @pytest.fixture(scope="module")
    def finished(tmp_path_factory):
        out_dir = tmp_path_factory.mktemp(name)
        return out_dir, run_example(example, f"--out_dir={out_dir}", *flags)

    return finished


def summary_rows(out_dir):
    """``{measure: value}`` of the two-column rows of ``out_dir/summary.md``."""
    rows = re.findall(r"^\| ([^|]+) \| ([^|]+) \|$", (out_dir / "summary.md").read_text(), re.M)
    return {name.strip(): value.strip() for name, value in rows}


def digits_test_set():
    """The digits test split, normalised with the statistics of a run on 128 examples."""
    _, _, info = data.digits(max_train_examples=128)
    _, _, x_test, y_test = data.digits_arrays()
    return ((x_test - info.mean[0]) / info.std[0]).astype("float32"), y_test


def replica_masks_agree(arrays):
    """Asserts that the ``{layer/i/mask|weight: per-replica stack}`` arrays of a mirrored
    run hold 3 masks (conv kernel, BN gamma, dense kernel) identical on both replicas, and
    pruned tensors identical there and zero where their mask is; returns the zeros of
    the masks."""
    masks = [k for k in arrays.files if k.endswith("/mask")]
    assert len(masks) == 3
    pruned = 0
    for key in masks:
        replicas, weights = arrays[key], arrays[key.replace("/mask", "/weight")]
        assert replicas.shape[0] == 2, key
        np.testing.assert_array_equal(replicas[0], replicas[1], err_msg=key)
        np.testing.assert_array_equal(weights[0], weights[1], err_msg=key)
        assert np.all(weights[:, replicas[0] == 0] == 0.0), key
        pruned += int(np.sum(replicas[0] == 0))
    return pruned
