"""Helpers of the example script's tests (tf_keras and Keras 3): flags, runs, outputs."""
import contextlib
import io
import re

from absl import flags

from tf_stdprune import data


@contextlib.contextmanager
def example_flags(*argv):
    """The example script's absl flags parsed from ``argv``, reset on exit."""
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["vgg19_cifar10.py", *argv])
    try:
        yield
    finally:
        flags.FLAGS.unparse_flags()


def run_example(example, *argv):
    """Runs ``example.main`` with the flags ``argv``; returns what it printed."""
    with example_flags(*argv), contextlib.redirect_stdout(io.StringIO()) as stdout:
        example.main(["vgg19_cifar10.py"])
    return stdout.getvalue()


def summary_rows(out_dir):
    """``{measure: value}`` of the two-column rows of ``out_dir/summary.md``."""
    rows = re.findall(r"^\| ([^|]+) \| ([^|]+) \|$", (out_dir / "summary.md").read_text(), re.M)
    return {name.strip(): value.strip() for name, value in rows}


def digits_test_set():
    """The digits test split, normalised with the statistics of a run on 128 examples."""
    _, _, info = data.digits(max_train_examples=128)
    _, _, x_test, y_test = data.digits_arrays()
    return ((x_test - info.mean[0]) / info.std[0]).astype("float32"), y_test
