"""Script helpers: dataclass settings as absl flags, plain log lines without absl prefixes."""
import dataclasses
import logging
import os
from typing import Optional

from absl import app, flags
import pytest

from tf_stdprune import config_flags, console


@dataclasses.dataclass(frozen=True)
class Settings:
    width: float = config_flags.setting("Width.")
    steps: tuple[int, ...] = config_flags.setting("Steps.")
    mode: str = config_flags.setting("Mode.", "a", choices=["a", "b"])
    limit: Optional[int] = config_flags.setting("Limit.", None, lower_bound=1)
    pairs: Optional[dict] = config_flags.setting("Pairs.", None, parse=lambda t: dict(
        item.split("=") for item in t.split(",")) if "=" in t else int(t))


PRESETS = {"small": Settings(width=0.5, steps=(1, 2)), "large": Settings(width=2.0, steps=(9,))}


def _parse(*argv):
    values = flags.FlagValues()
    config_flags.define_flags(Settings, PRESETS, "small", values)
    values(["prog", *argv])
    return config_flags.from_flags(Settings, PRESETS, values)


def test_a_flag_given_replaces_its_field_and_the_rest_come_from_the_preset():
    assert _parse() == PRESETS["small"]
    assert _parse("--preset=large", "--steps=3,4", "--mode=b", "--limit=7") == Settings(
        width=2.0, steps=(3, 4), mode="b", limit=7)
    assert _parse("--pairs=x=1").pairs == {"x": "1"}


def test_a_bad_flag_value_is_a_usage_error_naming_the_flag():
    with pytest.raises(app.UsageError, match="--steps: invalid literal"):
        _parse("--steps=1,x")
    with pytest.raises(app.UsageError, match="--pairs=y: invalid literal"):
        _parse("--pairs=y")
    with pytest.raises(flags.IllegalFlagValueError):
        _parse("--limit=0")  # lower_bound reaches the absl flag


def _record(level, pathname):
    return logging.LogRecord("absl", level, pathname, 1, "%s done", ("step",), None)


def test_plain_lines_keep_warnings_of_anyone_and_info_of_the_package_only():
    own = os.path.join(console.PACKAGE, "procedure", "iterative.py")
    other = "/site-packages/tensorflow/python/checkpoint/functional_saver.py"
    formatter = console.PlainFormatter("%(message)s")
    assert formatter.format(_record(logging.INFO, own)) == "step done"
    assert formatter.format(_record(logging.WARNING, other)) == "warning: step done"
    assert console.own_info_only(_record(logging.INFO, own))
    assert not console.own_info_only(_record(logging.INFO, other))
    assert console.own_info_only(_record(logging.ERROR, other))
