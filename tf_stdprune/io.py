"""Atomic writes and safe replacement of files and directories: the one implementation.

Every file or directory the library writes goes through `write_atomically`:

1. the content is written under a temporary name next to the target,
   ``.<name>.tmp-<random>``, and flushed to disk;
2. a file is renamed onto the target file in one atomic step; a directory cannot be,
   so an existing target directory (which may be replaced) is first renamed aside to
   ``.<name>.old-<random>``,
3. then the temporary is renamed to the target and the old copy is deleted.

A reader therefore sees the old or the new version, never half of one. A process killed
between the two renames of a directory's replacement leaves the old version under its
``.old-`` name;
`clean_temporaries` (called when a run directory or an output directory is opened
again) renames it back when the target is missing and deletes leftover temporaries
otherwise.

`check_replaceable` refuses to replace what the user cannot mean: the working directory,
any parent of it, the filesystem root and the home directory, and, when the caller gives
a marker file name, a non-empty directory that does not carry that marker (a directory
that this library did not write).
"""
import os
import shutil
import tempfile

TEMPORARY = ".tmp-"
OLD = ".old-"


def _is_ours(name, kind):
    return name.startswith(".") and kind in name


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def clean_temporaries(directory, target_name=None):
    """Restores or deletes what an interrupted `write_atomically` left in ``directory``.

    ``.<name>.old-*`` goes back to ``<name>`` when ``<name>`` is missing (the process died
    between the two renames), else it is deleted; ``.<name>.tmp-*`` is deleted. With
    ``target_name``, only the leftovers of that one target are touched.
    Returns the list of paths it restored or removed.
    """
    if not os.path.isdir(directory):
        return []
    touched = []
    names = sorted(os.listdir(directory))
    if target_name is not None:
        prefixes = (f".{target_name}{OLD}", f".{target_name}{TEMPORARY}")
        names = [n for n in names if n.startswith(prefixes)]
    for name in names:
        path = os.path.join(directory, name)
        if _is_ours(name, OLD):
            target = os.path.join(directory, name[1:name.rindex(OLD)])
            if not os.path.lexists(target):
                os.replace(path, target)
            else:
                _remove(path)
            touched.append(path)
        elif _is_ours(name, TEMPORARY):
            _remove(path)
            touched.append(path)
    return touched


def check_replaceable(path, marker=None):
    """Raises unless the existing ``path`` may be replaced by a new version.

    Never replaceable: the filesystem root, the home directory, the working directory
    and its parents. With ``marker`` (a file name), a non-empty directory must hold that
    file, i.e. it must be an earlier output of the same writer.
    """
    path = os.path.realpath(os.fspath(path))
    protected = {os.path.realpath(os.sep), os.path.realpath(os.path.expanduser("~"))}
    cwd = os.path.realpath(os.getcwd())
    if path in protected or cwd == path or cwd.startswith(path.rstrip(os.sep) + os.sep):
        raise ValueError(
            f"Refusing to replace {path!r}: it is the filesystem root, the home directory, "
            "the working directory or one of its parents. Give the path of the output "
            "itself, e.g. 'exports/model'."
        )
    if marker and os.path.isdir(path) and os.listdir(path) \
            and not os.path.exists(os.path.join(path, marker)):
        raise ValueError(
            f"Refusing to replace {path!r}: it is a non-empty directory that this library "
            f"did not write (it has no {marker!r} file). Choose a new path, or move that "
            "directory away yourself."
        )


def _check_same_kind(path, temporary):
    """Raises if the new output and the existing ``path`` are not both files or both
    directories."""
    if not os.path.lexists(path) or os.path.isdir(path) == os.path.isdir(temporary):
        return
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"Refusing to replace the directory {path!r} by a file. Give the path of the "
            f"file itself, e.g. {os.path.join(path, 'output')!r}.")
    raise NotADirectoryError(
        f"Refusing to replace the file {path!r} by a directory. Give another path, or move "
        "that file away yourself.")


def write_atomically(path, save, overwrite=True, marker=None):
    """Calls ``save(temporary_path)``, then moves the result to ``path`` atomically.

    ``save`` must create a file or a directory at the path it is given (which does not
    exist yet), e.g. ``model.save`` or ``lambda p: tf.saved_model.save(m, p)``. An
    existing ``path`` raises `FileExistsError` unless ``overwrite``; with ``overwrite`` it
    must pass `check_replaceable` (with ``marker``) before anything is written. An empty
    directory counts as absent. A file never replaces a directory, nor a directory a
    file (`IsADirectoryError` / `NotADirectoryError`, ``path`` untouched). If ``save``
    fails, ``path`` is untouched. Returns the absolute path.
    """
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    exists = os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path))
    if exists and not overwrite:
        raise FileExistsError(f"{path!r} exists; pass overwrite=True to replace it.")
    if os.path.lexists(path):  # an empty working directory may not be replaced either
        check_replaceable(path, marker)
    os.makedirs(directory, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{name}{TEMPORARY}", dir=directory)
    temporary = os.path.join(scratch, name)
    try:
        save(temporary)
        _check_same_kind(path, temporary)
        if os.path.isdir(temporary):
            os.chmod(temporary, 0o755)
        elif os.path.isfile(temporary):
            os.chmod(temporary, 0o644)
        if os.path.lexists(path) and os.path.isdir(path):
            aside = tempfile.mkdtemp(prefix=f".{name}{OLD}", dir=directory)
            os.rmdir(aside)
            os.replace(path, aside)
            os.replace(temporary, path)
            _remove(aside)
        else:  # a file replaces a file in one atomic rename
            os.replace(temporary, path)
    finally:
        _remove(scratch)
    return path


def atomic_write(path, data):
    """Writes ``data`` (str or bytes) to the file ``path`` atomically (`write_atomically`)."""
    mode = "wb" if isinstance(data, bytes) else "w"

    def save(temporary):
        with open(temporary, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return write_atomically(path, save)
