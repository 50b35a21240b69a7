"""The example checks every flag, and refuses to resume --out_dir with other settings,
before the dense baseline trains (nothing here trains or loads data)."""
import contextlib
import json
import logging
import os
import sys

from absl import app, flags
import pytest

from tf_stdprune import run_state

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples")
sys.path.insert(0, EXAMPLES)
import vgg19_cifar10 as example  # noqa: E402

TINY = ["--preset=quick", "--width=0.05", "--iterations=2", "--epochs_per_iteration=1",
        "--baseline_epochs=1", "--max_train_examples=128", "--batch_size=32",
        "--qualities=0.5,1.0", "--recalibration_batches=2"]


@contextlib.contextmanager
def parsed(*argv):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["vgg19_cifar10.py", *argv])
    try:
        yield
    finally:
        flags.FLAGS.unparse_flags()


@pytest.fixture
def no_data(monkeypatch):
    """Fails the test if the example gets as far as loading data."""
    def load_data(cfg):
        raise AssertionError("the example loaded data before refusing its flags")

    monkeypatch.setattr(example, "load_data", load_data)


@pytest.mark.parametrize("flag, named", [
    ("--qualities=-1", "--qualities=-1.0: every q must be a finite number >= 0"),
    ("--qualities=0.5,nan", "--qualities=0.5,nan"),
    ("--initial_lrs=0.1,0", "--initial_lrs=0.1,0.0: every value must be a finite number > 0"),
    ("--baseline_lr=-0.1", "--baseline_lr=-0.1"),
    ("--width=0", "--width=0.0"),
    ("--lr_drops=-1", "--lr_drops=-1: drops are epochs >= 0"),
    ("--qualities=a", "--qualities: could not convert string to float"),
])
def test_a_bad_flag_fails_before_anything_trains(tmp_path, no_data, flag, named):
    with parsed(*TINY, f"--out_dir={tmp_path}", flag), pytest.raises(app.UsageError) as error:
        example.main(["vgg19_cifar10.py"])
    assert named in str(error.value)
    assert os.listdir(tmp_path) == []


def test_learning_rate_drops_that_never_fire_are_named(tmp_path, caplog):
    with parsed(*TINY, f"--out_dir={tmp_path}", "--lr_drops=0,1,4", "--baseline_lr_drops=1"):
        with caplog.at_level(logging.WARNING):
            example.validate(example.config())
    assert "lr_drops [1, 4] never take effect" in caplog.text
    assert "--baseline_lr_drops [1] never take effect" in caplog.text


def _start(out_dir, *argv):
    """What a first start records in ``out_dir`` (its settings), then the lock released."""
    with parsed(*TINY, f"--out_dir={out_dir}", *argv):
        example.claim_out_dir(example.config(), chief=True)
    run_state.release_lock(str(out_dir))


@pytest.mark.parametrize("changed, named", [
    ("--seed=1", "seed: 0 (run directory) vs 1 (now)"),
    ("--epochs_per_iteration=2", "epochs_per_iteration: 1 (run directory) vs 2 (now)"),
    ("--qualities=0.6,1.0", "qualities: [0.5, 1.0] (run directory) vs [0.6, 1.0] (now)"),
    ("--std_mode=surviving", 'std_mode: "initial" (run directory) vs "surviving" (now)'),
    ("--max_train_examples=64", "max_train_examples: 128"),
    ("--width=0.1", "width: 0.05"),
])
def test_resume_with_a_changed_flag_is_refused_and_changes_nothing(tmp_path, no_data, changed, named):
    _start(tmp_path)
    before = (tmp_path / "run.json").read_bytes()
    with parsed(*TINY, f"--out_dir={tmp_path}", changed), pytest.raises(app.UsageError) as error:
        example.main(["vgg19_cifar10.py"])
    assert named in str(error.value)
    assert sorted(os.listdir(tmp_path)) == ["run.json"]
    assert (tmp_path / "run.json").read_bytes() == before


def test_more_iterations_with_extended_qualities_are_allowed(tmp_path):
    _start(tmp_path)
    _start(tmp_path, "--iterations=3", "--qualities=0.5,1.0,1.5")
    recorded = json.loads((tmp_path / "run.json").read_text())
    assert recorded["iterations"] == 3 and recorded["qualities"] == [0.5, 1.0, 1.5]
    with pytest.raises(app.UsageError, match="iterations: 3 .* vs 2"):
        _start(tmp_path)


def test_a_second_process_on_the_out_dir_is_refused(tmp_path):
    (tmp_path / "lock").write_text(json.dumps({"pid": 1, "host": os.uname().nodename,
                                               "started": "earlier"}))
    with parsed(*TINY, f"--out_dir={tmp_path}"), pytest.raises(ValueError, match="process 1 on"):
        example.claim_out_dir(example.config(), chief=True)
