"""What a script shows on its terminal: TensorFlow's start-up lines kept off it, and log
lines as plain text, without absl's ``I1207 06:31:50.215672 1234 file.py:169]`` prefix.

For scripts (the examples); the library itself configures no logging and sets no
environment variable on import.
"""
import contextlib
import logging
import os
import sys
import warnings

from absl import flags
from absl import logging as absl_logging

FLAGS = flags.FLAGS


PACKAGE = os.path.dirname(os.path.abspath(__file__))


def own_info_only(record):
    """A log filter: warnings and errors from anywhere, INFO lines from tf_stdprune only
    (not TensorFlow's checkpoint and converter chatter)."""
    return record.levelno >= logging.WARNING or record.pathname.startswith(PACKAGE)


class PlainFormatter(logging.Formatter):
    """The message alone; ``warning: ``/``error: `` before warnings and errors."""

    def format(self, record):
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def plain_logs(keep_prefixes=None):
    """Makes absl's handler (the one ``app.run`` installs) write plain lines
    (`PlainFormatter`), INFO lines of tf_stdprune only (`own_info_only`), and hides
    ``tf.lite.Interpreter``'s deprecation notice, unless
    ``keep_prefixes``; by default prefixes are kept when ``--alsologtostderr``,
    ``--logtostderr`` or ``--verbosity`` was given. Call it after the flags are parsed.

    Examples:
      >>> def main(argv):
      ...     plain_logs()
    """
    if keep_prefixes is None:
        keep_prefixes = (FLAGS.alsologtostderr or FLAGS.logtostderr
                         or FLAGS["verbosity"].present)
    if not keep_prefixes:
        handler = absl_logging.get_absl_handler()
        handler.setFormatter(PlainFormatter("%(message)s"))
        if own_info_only not in handler.filters:
            handler.addFilter(own_info_only)
        warnings.filterwarnings("ignore", message=r"\s*Warning: tf.lite.Interpreter is deprecated")


@contextlib.contextmanager
def quiet_start():
    """Keeps TensorFlow's start-up log lines (CUDA probing, CPU feature notes, XLA service
    lines) off the terminal while the body runs.

    Sets ``TF_CPP_MIN_LOG_LEVEL=3`` unless it is set (C++ errors off too: TensorFlow logs
    notes such as unknown graph attributes as errors; set it to 0-2 to see them), and,
    unless it is set to ``0`` or ``1``, sends file descriptor 2 to ``os.devnull`` for the body: some of those lines are
    written before TensorFlow reads the variable. If the body imported TensorFlow, its
    devices are probed before stderr is back and its Python logger is set to WARNING (no
    INFO lines from SavedModel and TFLite writers). An exception raised in the body is
    reported after stderr is back. Call it from a script's ``__main__`` only (importing the
    library sets no environment variable).
    """
    level = os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if level in ("0", "1"):
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
        tf = sys.modules.get("tensorflow")
        if tf is not None:  # imported in the body
            tf.config.list_physical_devices()  # the device probing logs its lines here
            tf.get_logger().setLevel("WARNING")  # no INFO lines from savers and converters
    finally:
        sys.stderr.flush()  # what was written in the body goes to os.devnull too
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
