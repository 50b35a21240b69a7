"""Crashes lose nothing: SIGKILL at many points, including mid-checkpoint, then resume.

A chain of runs of tests/keras2/resumable_run.py (dropout, augmentation and per-epoch shuffling
on) is killed at pseudo-random batches and at pseudo-random file replacements (inside
checkpoint/history/state writing); each rerun resumes from the last finished iteration.
The final weights, history (wall times aside) and report must equal an uninterrupted
run's bit for bit.
"""
import json
import os
import random
import subprocess
import sys

import pytest

from tf_stdprune.keras2 import run_state

SCRIPT = os.path.join(os.path.dirname(__file__), "resumable_run.py")
TOTAL_BATCHES = 4 * 2 * 4  # iterations x epochs x batches


def _run(run_dir, *flags):
    return subprocess.run([sys.executable, SCRIPT, str(run_dir), *flags],
                          capture_output=True, text=True, timeout=300)


def _committed(run_dir):
    """Finished iterations as recorded by state.json, the commit point of a checkpoint."""
    path = os.path.join(run_dir, run_state.STATE_FILE)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return json.load(f)["iteration"]


def _comparable(run_dir):
    history = run_state.read_history(run_dir)
    for record in history:
        record.pop("wall_time_s")
    with open(os.path.join(run_dir, "report.json")) as f, \
            open(os.path.join(run_dir, "weights.sha256")) as g:
        return history, json.load(f), g.read()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = _run(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return _comparable(run_dir)


def test_killed_runs_resume_to_the_same_result(tmp_path, uninterrupted):
    rng = random.Random(7)
    kills = [("--kill_after_batches", rng.randint(1, 12)) if i % 2 else
             ("--kill_on_replace", rng.randint(1, 5)) for i in range(4)]
    finished_before = []
    for flag, value in kills:
        result = _run(tmp_path, f"{flag}={value}")
        finished = _committed(tmp_path)
        if result.returncode == 0:  # the kill point lay beyond the end of this run
            break
        assert result.returncode == -9, result.stderr[-3000:]
        assert not finished_before or finished >= finished_before[-1]  # nothing lost
        finished_before.append(finished)
    assert len(finished_before) >= 3  # kills that hit a running process
    result = _run(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    history, report, weights = _comparable(tmp_path)
    expected_history, expected_report, expected_weights = uninterrupted
    assert weights == expected_weights
    assert report == expected_report
    assert [r["iteration"] for r in history] == [1, 2, 3, 4]
    assert json.dumps(history, sort_keys=True) == json.dumps(expected_history, sort_keys=True)


def test_unwritable_out_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="Choose a writable --out_dir"):
        run_state.check_writable(str(blocker / "run"))


def test_atomic_write_never_leaves_half_a_file(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    run_state.atomic_write(str(path), "old")

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_state.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        run_state.atomic_write(str(path), "new and longer")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_run_files_are_replaced_by_one_rename_of_the_one_atomic_writer(tmp_path, monkeypatch):
    """run_state writes through tf_stdprune.io, and a file is replaced by a single
    os.replace onto it: there is no moment at which history.jsonl is missing."""
    from tf_stdprune import io

    assert run_state.atomic_write is io.atomic_write
    path = tmp_path / "history.jsonl"
    run_state.atomic_write(str(path), "old\n")
    renames = []
    real_replace = os.replace

    def record(src, dst):
        renames.append((src, os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", record)
    run_state.atomic_write(str(path), "new\n")
    assert [dst for _, dst in renames] == [str(path)]
    assert path.read_text() == "new\n" and os.listdir(tmp_path) == ["history.jsonl"]


def test_atomic_write_never_replaces_a_directory(tmp_path):
    target = tmp_path / "report.json"
    target.mkdir()
    (target / "notes.txt").write_text("the user's")
    with pytest.raises(IsADirectoryError, match="Refusing to replace the directory"):
        run_state.atomic_write(str(target), "{}")
    assert (target / "notes.txt").read_text() == "the user's"
    assert os.listdir(tmp_path) == ["report.json"]
