"""A run directory that survives crashes, has one owner, and resumes only the run it holds.

Layout of ``run_dir``::

    run.json               the settings that define the run (`run_settings`), written at
                           the first start; a later start with other settings is refused
    lock                   {"pid", "host", "started"} of the process that owns the run
    history.jsonl          one JSON line per finished iteration
    checkpoints/iter-NNNN/ the checkpoint of model (weights, masks, sigmas, steps),
                           optimizer (slots, iteration count) and random generator
                           states, in the format of the model's Keras (a
                           `CheckpointFormat`), plus meta.json {"iteration", "epoch",
                           "random"}; the newest two are kept
    state.json             {"iteration", "epoch", "checkpoint"}, written LAST

Every file is written with `tf_stdprune.io.write_atomically`, so a reader sees either the
old or the new version, never half of one. ``state.json`` names only a checkpoint that
was completely written, so a run killed at any moment resumes from the last finished
iteration; `restore_directory` first puts back or deletes what a killed write left
behind (`tf_stdprune.io.clean_temporaries`).

This module imports no Keras: what differs between tf_keras and Keras 3 (how a
checkpoint is written, checked and read) comes in as a `CheckpointFormat`
(`keras2.run_state.TFCheckpoint`, `tf_stdprune.keras3.iterative.VariablesCheckpoint`).
"""
import atexit
import datetime
import hashlib
import json
import os
import random
import re
import shutil
import socket
import tempfile

from absl import logging
import numpy as np

from tf_stdprune.io import atomic_write, clean_temporaries, write_atomically
from tf_stdprune.validate import NonFiniteError  # noqa: F401 (its home is validate)

STATE_FILE = "state.json"
HISTORY_FILE = "history.jsonl"
RUN_FILE = "run.json"
LOCK_FILE = "lock"
CHECKPOINTS = "checkpoints"
KEPT_CHECKPOINTS = 2
# Settings that a later start may extend: a list may grow at its end, a count may grow.
EXTENSIBLE_LISTS = ("schedule.qualities", "qualities", "initial_lrs")
EXTENSIBLE_COUNTS = ("iterations",)


class RunDirectoryError(ValueError):
    """A run directory that cannot be resumed as it is (damaged, locked or another run)."""


def check_not_a_file(run_dir):
    """Raises `RunDirectoryError` if ``run_dir`` exists and is not a directory (the file
    is the user's: it is neither replaced nor removed)."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirectoryError(
            f"The run directory {run_dir!r} is a file, not a directory: pass the path of a "
            "directory (a new one for a new run); the file is left as it is.")


def check_writable(run_dir):
    """Raises a clear error now, not after hours of training, if ``run_dir`` is unusable."""
    check_not_a_file(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
        atomic_write(os.path.join(run_dir, ".write-test"), "ok")
        os.remove(os.path.join(run_dir, ".write-test"))
    except OSError as error:
        raise OSError(
            f"Cannot write to the run directory {run_dir!r} ({error.strerror}). "
            "Choose a writable --out_dir with free space."
        ) from error


# ----------------------------------------------------------------------------- settings

def unwrapped_layers(model):
    """Every layer, nested models' layers included, wrappers replaced by what they wrap."""
    for layer in getattr(model, "layers", []):
        inner = getattr(layer, "layer", None)
        if inner is not None and hasattr(layer, "pruning_schedule"):
            yield layer, inner
        else:
            yield layer, layer
            if hasattr(layer, "layers"):
                yield from unwrapped_layers(layer)


def _plain(value):
    """``value`` as JSON-comparable data (numpy scalars to floats, tuples to lists)."""
    def default(v):
        return v.tolist() if hasattr(v, "tolist") else str(v)

    return json.loads(json.dumps(value, default=default))


def _schedule_config(wrapper):
    try:
        return _plain(wrapper.pruning_schedule.get_config())
    except (ValueError, NotImplementedError):  # e.g. callable qualities
        return {"class_name": type(wrapper.pruning_schedule).__name__, "config": "not serializable"}


def _one_or_per_layer(values):
    """A single value if every layer has it, else ``{layer: value}``."""
    distinct = {json.dumps(v, sort_keys=True) for v in values.values()}
    return next(iter(values.values())) if len(distinct) == 1 else values


def run_settings(model, epochs_per_iteration=None, **extra):
    """The settings that define a pruning run of ``model``, as JSON-ready data.

    * ``architecture``: sha256 of the unwrapped layers' class names and weight shapes,
      in order (layer names are left out: Keras numbers automatic names by how many
      layers the process built before); ``parameters``: their total count;
    * ``schedule``: the pruning schedule's ``get_config()``; ``std_mode``; and
      ``layer_quality``: ``{layer: multiplier}`` of the layers whose multiplier of ``q``
      (``quality_multiplier`` on tf_keras, ``layer_quality`` on Keras 3) is not 1 (one
      value per setting when all wrappers agree, else one per layer);
    * ``optimizer``: its class and its config without the learning rate (set per epoch);
    * ``epochs_per_iteration`` when given, and every keyword in ``extra``.

    Only generic attributes are read (``type(layer).__name__``, weight shapes and the
    wrapper attributes ``pruning_schedule``, ``std_mode``, ``quality_multiplier`` or
    ``layer_quality``), so any wrapper that carries them is described the same way.
    """
    digest, parameters = hashlib.sha256(), 0
    schedules, std_modes, qualities = {}, {}, {}
    for wrapper, layer in unwrapped_layers(model):
        shapes = [[int(d) for d in w.shape] for w in layer.weights]
        digest.update(json.dumps([type(layer).__name__, shapes]).encode())
        parameters += sum(int(np.prod(s)) for s in shapes)
        if wrapper is not layer:
            schedules[layer.name] = _schedule_config(wrapper)
            std_modes[layer.name] = getattr(wrapper, "std_mode", None)
            quality = float(getattr(wrapper, "quality_multiplier",
                                    getattr(wrapper, "layer_quality", 1.0)))
            if quality != 1.0:
                qualities[layer.name] = quality
    settings = {"architecture": digest.hexdigest(), "parameters": parameters}
    if schedules:
        settings.update(schedule=_one_or_per_layer(schedules),
                        std_mode=_one_or_per_layer(std_modes), layer_quality=qualities)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        config = {k: v for k, v in optimizer.get_config().items()
                  if k not in ("learning_rate", "lr", "jit_compile", "name")}
        settings["optimizer"] = _plain({"class_name": type(optimizer).__name__, "config": config})
    if epochs_per_iteration is not None:
        settings["epochs_per_iteration"] = int(epochs_per_iteration)
    settings.update(_plain(extra))
    return settings


def _flatten(settings, prefix=""):
    flat = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key in ("schedule", "config", "optimizer"):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _allowed_change(name, old, new):
    """True when ``new`` only extends ``old`` (a longer list, a larger count)."""
    short = name.replace("schedule.config.", "schedule.")
    if short in EXTENSIBLE_LISTS and isinstance(old, list) and isinstance(new, list):
        return new[:len(old)] == old
    return (short in EXTENSIBLE_COUNTS and isinstance(old, int) and isinstance(new, int)
            and new >= old)


def setting_differences(old, new):
    """``["name: old -> new", ...]`` for every setting of ``new`` that ``old`` holds
    differently, except allowed extensions. Settings only one side has are ignored."""
    old, new = _flatten(old), _flatten(new)
    return [f"{name}: {json.dumps(old[name])} (run directory) vs {json.dumps(value)} (now)"
            for name, value in new.items()
            if name in old and old[name] != value and not _allowed_change(name, old[name], value)]


def check_run_settings(run_dir, settings, write=True):
    """Refuses to continue ``run_dir`` with settings other than those it was started with.

    Compares ``settings`` with ``run_dir/run.json``; raises ONE `RunDirectoryError` (a
    ``ValueError``) naming each differing setting, before anything is written. Allowed:
    a schedule's ``qualities`` (or a ``qualities`` / ``initial_lrs`` list) that keeps the
    earlier values and appends more, and a larger ``iterations``. With ``write``, the
    file is (re)written with the union of both, the new values winning.
    """
    path = os.path.join(run_dir, RUN_FILE)
    old = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (ValueError, OSError) as error:
            raise RunDirectoryError(
                f"{path} is unreadable ({error}). It records the settings of the run; restore "
                "it from a backup, or start the run anew in another directory.") from error
    differences = setting_differences(old, settings)
    if differences:
        raise RunDirectoryError(
            f"{run_dir} holds a run made with other settings, so it cannot be continued:\n  "
            + "\n  ".join(differences)
            + "\nUse the run's original settings to continue it (more iterations appended to "
            "the same qualities are allowed), or choose a new directory for a new run.")
    merged = dict(old, **settings)
    if write and merged != old:
        atomic_write(path, json.dumps(merged, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------- lock

_HELD = {}


def _pid_alive(pid):
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False  # not a process id: an unreadable lock
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, OSError):
        return None


def acquire_lock(run_dir):
    """Makes this process the one owner of ``run_dir`` (``run_dir/lock``, O_EXCL).

    Returns True when it took the lock now, False when it held it already. A lock left
    by a process that is gone (same host, pid not running) is taken over with a
    warning; a live owner raises `RunDirectoryError` naming its pid and host. The lock
    is released by `release_lock` or when the process exits.
    """
    check_not_a_file(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.realpath(os.path.join(run_dir, LOCK_FILE))
    if path in _HELD:
        return False
    host = socket.gethostname()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_lock(path)
            stale = owner is None or (owner.get("host") == host
                                      and not _pid_alive(owner.get("pid")))
            if not stale:
                raise RunDirectoryError(
                    f"{run_dir} is in use by process {owner.get('pid')} on host "
                    f"{owner.get('host')!r} (since {owner.get('started')}). Wait for it to "
                    f"finish, or stop it; if that process is gone, delete {path}.") from None
            logging.warning("Taking over %s: its owner %s is no longer running.", path,
                            owner or "(unreadable lock file)")
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": host,
                       "started": datetime.datetime.now(datetime.timezone.utc).isoformat()}, f)
            f.flush()
            os.fsync(f.fileno())
        if not _HELD:
            atexit.register(release_all_locks)
        _HELD[path] = os.getpid()
        return True
    raise RunDirectoryError(f"Could not take the lock {path}: other processes keep taking it.")


def release_lock(run_dir):
    """Gives up this process's ownership of ``run_dir`` (nothing if it has none)."""
    path = os.path.realpath(os.path.join(run_dir, LOCK_FILE))
    if _HELD.pop(path, None) is None:
        return
    owner = _read_lock(path)
    if owner is not None and owner.get("pid") == os.getpid():
        os.remove(path)


def release_all_locks():
    for path in list(_HELD):
        release_lock(os.path.dirname(path))


# ----------------------------------------------------------------------------- history

RECORD_KEYS = ("iteration", "q", "zero_weights_rate", "zero_parameters_rate",
               "compression_rate", "before", "after")


def is_record(record):
    """True for a complete iteration record of ``history.jsonl``."""
    return (isinstance(record, dict) and all(k in record for k in RECORD_KEYS)
            and isinstance(record["before"], dict) and isinstance(record["after"], dict))


def parse_history(run_dir, valid=is_record):
    """``(records, bad)``: the history's lines that parse as JSON and pass ``valid``
    (complete records, `is_record`), and ``[(line number, first 80 characters)]`` of the
    lines that do not."""
    path = os.path.join(run_dir, HISTORY_FILE)
    records, bad = [], []
    if not os.path.exists(path):
        return records, bad
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if valid(record):
                records.append(record)
            else:
                bad.append((number, line.decode("utf-8", "replace").strip()[:80]))
    return records, bad


def read_history(run_dir):
    """The finished iterations' records (a list of dicts).

    A line that is not an iteration record raises `RunDirectoryError` naming the file and
    line.
    """
    records, bad = parse_history(
        run_dir, valid=lambda record: isinstance(record, dict) and "iteration" in record)
    if bad:
        number, text = bad[0]
        raise RunDirectoryError(f"{os.path.join(run_dir, HISTORY_FILE)}, line {number}, is "
                                f"not an iteration record: {text!r}.")
    return records


def _write_history(run_dir, history):
    atomic_write(os.path.join(run_dir, HISTORY_FILE),
                 "".join(json.dumps(record) + "\n" for record in history))


# ----------------------------------------------------------------------------- random state

def _python_random_state():
    return {"numpy": _plain(np.random.get_state(legacy=False)),
            "python": _plain(random.getstate())}


def _set_python_random_state(state):
    if not state:
        return
    numpy_state = state["numpy"]
    numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], np.uint32)
    np.random.set_state(numpy_state)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------- checkpoints

class CheckpointFormat:
    """How one Keras writes, checks and reads the checkpoint of a run's model.

    ``write(directory)`` writes model, optimizer and random states into the existing
    ``directory``; ``check(directory)`` reads every saved value back (it raises one of
    ``errors``, or ``OSError``/``ValueError``/``KeyError``, for a damaged checkpoint);
    ``read(directory)`` restores them into the model (raising `RunDirectoryError` if the
    checkpoint does not fit it).
    """

    errors = ()

    def write(self, directory):
        raise NotImplementedError

    def check(self, directory):
        raise NotImplementedError

    def read(self, directory):
        raise NotImplementedError


def save_iteration_with(checkpoint, run_dir, iteration, epoch, history, chief=True):
    """Checkpoints the run after ``iteration`` with ``checkpoint`` (a `CheckpointFormat`).

    Writes ``checkpoints/iter-NNNN`` (with ``meta.json``: iteration, epoch, numpy's and
    Python's random states), then ``history.jsonl``, then ``state.json`` (the commit
    point), then deletes all but the newest `KEPT_CHECKPOINTS` checkpoints. A worker
    that is not the ``chief`` writes to a scratch directory that is then deleted (the
    write may run collectives every worker must join), and records nothing.
    """
    meta = json.dumps({"iteration": iteration, "epoch": epoch, "random": _python_random_state()})
    if not chief:
        scratch = tempfile.mkdtemp(prefix="tf-stdprune-worker-")
        try:
            checkpoint.write(scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return

    def save(path):
        os.makedirs(path)
        checkpoint.write(path)
        atomic_write(os.path.join(path, "meta.json"), meta)

    name = f"iter-{iteration:04d}"
    directory = os.path.join(run_dir, CHECKPOINTS)
    write_atomically(os.path.join(directory, name), save)
    _write_history(run_dir, history)
    atomic_write(os.path.join(run_dir, STATE_FILE), json.dumps(
        {"iteration": iteration, "epoch": epoch, "checkpoint": f"{CHECKPOINTS}/{name}"}))
    kept = sorted(n for n in os.listdir(directory) if re.fullmatch(r"iter-\d+", n)
                  and int(n[5:]) <= iteration)[-KEPT_CHECKPOINTS:]
    for other in os.listdir(directory):
        if other not in kept and re.fullmatch(r"iter-\d+", other):
            _delete_tree(os.path.join(directory, other))


def _delete_tree(path):
    shutil.rmtree(path, ignore_errors=True)


def _check_checkpoint(checkpoint, run_dir, relative):
    """``(meta, directory)`` of an intact checkpoint; raises `RunDirectoryError` otherwise."""
    directory = os.path.join(run_dir, relative)
    try:
        with open(os.path.join(directory, "meta.json")) as f:
            meta = json.load(f)
        checkpoint.check(directory)
    except (OSError, ValueError, KeyError, IndexError, RuntimeError) + tuple(checkpoint.errors) \
            as error:
        reason = getattr(error, "message", None) or str(error)
        raise RunDirectoryError(
            f"the checkpoint {directory} is damaged ({reason.splitlines()[0][:200]})") from error
    return meta, directory


def _read_state(run_dir):
    path = os.path.join(run_dir, STATE_FILE)
    try:
        with open(path) as f:
            state = json.load(f)
        if not isinstance(state, dict) or not {"iteration", "epoch", "checkpoint"} <= set(state):
            raise ValueError("fields missing")
        return state
    except (OSError, ValueError) as error:
        raise RunDirectoryError(f"{path} is damaged ({error})") from error


def _checkpoint_candidates(run_dir):
    """Checkpoint directories of ``run_dir``, newest first, as relative paths."""
    directory = os.path.join(run_dir, CHECKPOINTS)
    names = [n for n in os.listdir(directory) if re.fullmatch(r"iter-\d+", n)] \
        if os.path.isdir(directory) else []
    return [f"{CHECKPOINTS}/{n}" for n in sorted(names, reverse=True)]


def _history_prefix(run_dir):
    """The valid records before the first bad line, and the error of that line (or None)."""
    try:
        return read_history(run_dir), None
    except RunDirectoryError as error:
        good = []
        with open(os.path.join(run_dir, HISTORY_FILE), "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    break
                if not isinstance(record, dict) or "iteration" not in record:
                    break
                good.append(record)
        return good, error


def _choose_checkpoint(checkpoint, run_dir):
    """``(meta, directory, problems)``: the checkpoint ``state.json`` names if it and
    the history are intact (``problems`` empty), else the newest intact fallback."""
    problems, state = [], None
    history, history_error = _history_prefix(run_dir)
    if history_error is not None:
        problems.append(str(history_error).rstrip("."))
    try:
        state = _read_state(run_dir)
    except RunDirectoryError as error:
        problems.append(str(error))
    finished = {r["iteration"] for r in history}
    for relative in ([state["checkpoint"]] if state else []) + _checkpoint_candidates(run_dir):
        if (state and relative != state["checkpoint"]
                and _iteration_of(relative) >= state["iteration"]):
            continue  # newer than the commit point: not finished
        try:
            meta, directory = _check_checkpoint(checkpoint, run_dir, relative)
        except RunDirectoryError as error:
            if str(error) not in problems:
                problems.append(str(error))
            continue
        if not set(range(1, meta["iteration"] + 1)) <= finished:
            if relative == (state or {}).get("checkpoint"):
                problems.append(f"{os.path.join(run_dir, HISTORY_FILE)} lacks iterations up to "
                                f"{meta['iteration']}")
            continue
        return meta, directory, problems
    return None, None, problems


def _history_lines(run_dir):
    path = os.path.join(run_dir, HISTORY_FILE)
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _iteration_of(relative):
    return int(relative.rsplit("-", 1)[1])


def restore_directory(checkpoint, run_dir, settings, fall_back=False, chief=True):
    """Restores the last finished iteration of ``run_dir`` with ``checkpoint`` (a
    `CheckpointFormat` bound to the model); returns the epoch to resume at, 0 for a new run.

    First it takes the directory's lock (`acquire_lock`), puts back or deletes what a
    killed write left, and checks ``settings`` (`run_settings` of the model) against
    ``run.json`` (`check_run_settings`): another architecture, schedule, ``std_mode``,
    ``layer_quality`` or optimizer raises before anything changes. A damaged directory
    (a truncated or corrupt checkpoint, an unreadable ``state.json``, a bad
    ``history.jsonl`` line) raises `RunDirectoryError` naming the file; with
    ``fall_back=True`` the newest intact earlier checkpoint is used instead (and the
    history cut back to it). Numpy's and Python's random states are restored too.
    """
    check_not_a_file(run_dir)
    if not os.path.isdir(run_dir):
        return 0
    took = chief and acquire_lock(run_dir)
    try:
        check_run_settings(run_dir, settings, write=False)
        return _restore(checkpoint, run_dir, fall_back, chief)
    except BaseException:
        if took:
            release_lock(run_dir)
        raise


def _restore(checkpoint, run_dir, fall_back, chief):
    if chief:
        clean_temporaries(run_dir)
        clean_temporaries(os.path.join(run_dir, CHECKPOINTS))
    if not os.path.exists(os.path.join(run_dir, STATE_FILE)) and not _history_lines(run_dir):
        return 0  # no iteration finished: a new run (a checkpoint without state.json is partial)
    meta, directory, problems = _choose_checkpoint(checkpoint, run_dir)
    if problems and (meta is None or not fall_back):
        how = (f"restore_run(model, run_dir, fall_back=True) resumes from the intact "
               f"iteration {meta['iteration']} ({directory}) and drops what came "
               "after it" if meta is not None else
               "no intact checkpoint is left: start the run anew in a new directory")
        raise RunDirectoryError(f"{run_dir} cannot be resumed as it is: "
                                + "; ".join(problems) + f". To go on: {how}.")
    if problems:
        logging.warning("%s: %s. Falling back to iteration %d.", run_dir, "; ".join(problems),
                        meta["iteration"])
    checkpoint.read(directory)
    _set_python_random_state(meta.get("random"))
    if chief:
        history = [r for r in _history_prefix(run_dir)[0] if r["iteration"] <= meta["iteration"]]
        _write_history(run_dir, history)
        if problems:
            atomic_write(os.path.join(run_dir, STATE_FILE), json.dumps(
                {"iteration": meta["iteration"], "epoch": meta["epoch"],
                 "checkpoint": os.path.relpath(directory, run_dir)}))
    return meta["epoch"]


def saved_epoch(run_dir):
    """The epoch of ``run_dir``'s last checkpoint, or ``None`` if it has none."""
    path = os.path.join(run_dir, STATE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["epoch"]
