"""A frozen dataclass of settings as command-line flags (absl): one flag per field, of the
same name, documented once in the field's metadata, and presets that fill the fields.

``--width=0.5``, ``--noaugment``, lists as ``--qualities=0.5,1.0``. `define_flags` makes
``--preset`` and the flags, every default None (not given); `from_flags` starts from the
chosen preset and replaces exactly the fields whose flag was given.
"""
import dataclasses
import typing
from typing import Union

from absl import app, flags


def setting(help, default=dataclasses.MISSING, **flag):
    """A dataclass field that is a flag: ``help`` is its help; ``flag`` holds ``choices``
    (an enum flag), ``lower_bound``/``upper_bound`` or ``parse`` (a string flag's parser).

    Examples:
      >>> width: float = setting("Width multiplier.", 1.0, lower_bound=0)
    """
    return dataclasses.field(default=default, metadata={"help": help, **flag})


def item_type(annotation):
    """``(int, None)`` for ``Optional[int]``, ``(tuple, float)`` for ``tuple[float, ...]``."""
    if typing.get_origin(annotation) is tuple:
        return tuple, typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is Union:
        return item_type(next(a for a in typing.get_args(annotation) if a is not type(None)))
    return annotation, None


def define_flags(cls, presets, default_preset, flag_values=flags.FLAGS):
    """``--preset`` (a key of ``presets``) and one flag per field of the dataclass ``cls``.

    Examples:
      >>> define_flags(Config, PRESETS, "quick")
    """
    flags.DEFINE_enum("preset", default_preset, list(presets), "Defaults of the flags below.",
                      flag_values=flag_values)
    define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
              str: flags.DEFINE_string, tuple: flags.DEFINE_list}
    for field in dataclasses.fields(cls):
        meta = dict(field.metadata)
        default = ("from --preset" if field.default is dataclasses.MISSING
                   else ",".join(map(str, field.default)) if isinstance(field.default, tuple)
                   else field.default)
        text = f"{meta.pop('help')} (default: {default})"
        meta.pop("parse", None)
        if "choices" in meta:
            flags.DEFINE_enum(field.name, None, meta.pop("choices"), text,
                              flag_values=flag_values)
            continue
        kind, _ = item_type(field.type)
        define.get(kind, flags.DEFINE_string)(field.name, None, text, flag_values=flag_values,
                                             **meta)


def parsed(field, value):
    """A flag's value as the field's type: lists parsed item by item, a ``parse``
    function's `ValueError` an `app.UsageError` naming the flag and its value."""
    if "parse" in field.metadata:
        try:
            return field.metadata["parse"](value)
        except ValueError as error:
            raise app.UsageError(f"--{field.name}={value}: {error}") from None
    kind, item = item_type(field.type)
    if kind is tuple:
        try:
            return tuple(item(v) for v in value)
        except ValueError as error:
            raise app.UsageError(f"--{field.name}: {error}") from error
    return value


def from_flags(cls, presets, flag_values=flags.FLAGS):
    """The chosen preset (an instance of ``cls``) with every field whose flag was given
    replaced.

    Examples:
      >>> cfg = from_flags(Config, PRESETS)
    """
    given = {field.name: parsed(field, flag_values[field.name].value)
             for field in dataclasses.fields(cls) if flag_values[field.name].present}
    return dataclasses.replace(presets[flag_values.preset], **given)
