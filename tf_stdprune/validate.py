"""Argument checks shared by every module: each returns the value or raises a clear error."""
from tf_stdprune.schedule import _check_quality


def check_quality(q, where):
    """Returns ``q`` as a float; raises ValueError unless it is a finite number >= 0."""
    return _check_quality(q, where)
