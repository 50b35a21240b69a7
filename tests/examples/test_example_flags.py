"""The example checks every flag, and refuses to resume --out_dir with other settings,
before the dense baseline trains (nothing here trains or loads data)."""
import dataclasses
import json
import logging
import os
import subprocess
import sys
import types
import typing

from absl import app
import pytest

from tf_stdprune.keras2 import run_state

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "examples")
sys.path.insert(0, EXAMPLES)
import vgg19_cifar10 as example  # noqa: E402
from example_runs import example_flags  # noqa: E402

TINY = ["--preset=quick", "--width=0.05", "--iterations=2", "--epochs_per_iteration=1",
        "--baseline_epochs=1", "--max_train_examples=128", "--batch_size=32",
        "--qualities=0.5,1.0", "--recalibration_batches=2"]


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
    ("--sensitivity_max_drop=-1", "--sensitivity_max_drop=-1.0: give the points of top-1"),
    ("--sensitivity_max_drop=nan", "--sensitivity_max_drop=nan"),
    ("--sensitivity_qualities=0,-1", "--sensitivity_qualities=0.0,-1.0: every q must be"),
    ("--layer_quality=dense", "--layer_quality=dense: 'dense' is not name=factor"),
    ("--layer_quality=dense=x", "'dense=x' is not name=factor"),
    ("--layer_quality==0.5", "'=0.5' is not name=factor"),
    ("--layer_quality=dense=-1", "--layer_quality: the factors {'dense': -1.0} must be finite"),
    ("--layer_quality=dense=inf", "the factors {'dense': inf}"),
    ("--target_drop=-0.5", "--target_drop=-0.5: give the largest accepted drop"),
    ("--target_drop=nan", "--target_drop=nan"),
    ("--q_step=0", "--q_step=0.0: every value must be a finite number > 0"),
])
def test_a_bad_flag_fails_before_anything_trains(tmp_path, no_data, flag, named):
    with example_flags(*TINY, f"--out_dir={tmp_path}", flag), pytest.raises(app.UsageError) as error:
        example.main(["vgg19_cifar10.py"])
    assert named in str(error.value)
    assert os.listdir(tmp_path) == []


def test_learning_rate_drops_that_never_fire_are_named(tmp_path, caplog):
    with example_flags(*TINY, f"--out_dir={tmp_path}", "--lr_drops=0,1,4", "--baseline_lr_drops=1"):
        with caplog.at_level(logging.WARNING):
            example.validate(example.config())
    assert "lr_drops [1, 4] never take effect" in caplog.text
    assert "--baseline_lr_drops [1] never take effect" in caplog.text


def _start(out_dir, *argv):
    """What a first start records in ``out_dir`` (its settings), then the lock released."""
    with example_flags(*TINY, f"--out_dir={out_dir}", *argv):
        example.claim_out_dir(example.config(), chief=True)
    run_state.release_lock(str(out_dir))


@pytest.mark.parametrize("changed, named", [
    ("--seed=1", "seed: 0 (run directory) vs 1 (now)"),
    ("--epochs_per_iteration=2", "epochs_per_iteration: 1 (run directory) vs 2 (now)"),
    ("--qualities=0.6,1.0", "qualities: [0.5, 1.0] (run directory) vs [0.6, 1.0] (now)"),
    ("--std_mode=surviving", 'std_mode: "initial" (run directory) vs "surviving" (now)'),
    ("--max_train_examples=64", "max_train_examples: 128"),
    ("--width=0.1", "width: 0.05"),
    ("--layer_quality=auto", 'layer_quality: null (run directory) vs "auto" (now)'),
    ("--layer_quality=dense=0.5", 'layer_quality: null (run directory) vs {"dense": 0.5} (now)'),
    ("--target_drop=0.5", "target_drop: null (run directory) vs 0.5 (now)"),
    ("--norescale_dropout", "rescale_dropout: true (run directory) vs false (now)"),
])
def test_resume_with_a_changed_flag_is_refused_and_changes_nothing(tmp_path, no_data, changed, named):
    _start(tmp_path)
    before = (tmp_path / "run.json").read_bytes()
    with example_flags(*TINY, f"--out_dir={tmp_path}", changed), pytest.raises(app.UsageError) as error:
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
    with example_flags(*TINY, f"--out_dir={tmp_path}"), pytest.raises(ValueError, match="process 1 on"):
        example.claim_out_dir(example.config(), chief=True)


def _config(*argv):
    with example_flags(*argv):
        return example.config()


def test_every_flag_lands_in_the_one_config_object():
    cfg = _config("--preset=paper", "--seed=3", "--data_dir=/data", "--strategy=mirrored",
                  "--jit_compile", "--mixed_precision", "--noresume", "--quantize_bits=6",
                  "--quantize_epochs=1", "--quantize_lr=0.5", "--cpu_replicas=2", "--tflite",
                  "--sensitivity", "--sensitivity_max_drop=0.25", "--sensitivity_qualities=0,1",
                  "--layer_quality=dense=0.8,conv2d_3=1.2", "--target_drop=0.5", "--q_step=0.2",
                  "--norescale_dropout", "--qualities=1,1.5", "--lr_drops=2,4")
    expected = dict(
        seed=3, data_dir="/data", strategy="mirrored", jit_compile=True, mixed_precision=True,
        resume=False, quantize_bits=6, quantize_epochs=1, quantize_lr=0.5, cpu_replicas=2,
        tflite=True, sensitivity=True, sensitivity_max_drop=0.25,
        sensitivity_qualities=(0.0, 1.0), layer_quality={"dense": 0.8, "conv2d_3": 1.2},
        target_drop=0.5, q_step=0.2, rescale_dropout=False, qualities=(1.0, 1.5),
        lr_drops=(2, 4), dataset="cifar10", width=1.0)
    assert {name: getattr(cfg, name) for name in expected} == expected
    assert isinstance(cfg, example.Config)
    assert _config("--layer_quality=auto").layer_quality == "auto"


def test_a_flag_left_out_keeps_the_presets_value_and_the_fields_default():
    for name, preset in example.PRESETS.items():
        assert _config(f"--preset={name}") == preset
    quick = _config("--preset=quick")
    assert (quick.seed, quick.resume, quick.rescale_dropout, quick.target_drop,
            quick.layer_quality, quick.sensitivity) == (0, True, True, None, None, False)
    assert (quick.tflite, example.PRESETS["paper"].tflite) == (True, False)


def _conforms(value, kind):
    """Whether ``value`` is of the annotation ``kind`` (Optional, Union, tuple[x, ...])."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:
        return any(_conforms(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(_conforms(v, args[0]) for v in value)
    return value is None if kind is type(None) else isinstance(value, origin or kind)


def test_every_preset_field_has_its_annotated_type():
    assert not _conforms([0.5], tuple[float, ...]) and not _conforms((1,), tuple[float, ...])
    for preset in example.PRESETS.values():
        for field in dataclasses.fields(example.Config):
            assert _conforms(getattr(preset, field.name), field.type), field.name
            assert field.metadata["help"], field.name  # documented once, shown by --help


def test_target_mode_warns_that_later_qualities_are_not_used(caplog):
    with caplog.at_level(logging.WARNING):
        example.validate(_config(*TINY, "--target_drop=0.5"))
    assert "starts at --qualities' first value 0.5 and raises q by --q_step=0.1" in caplog.text


def test_the_new_settings_are_recorded_and_an_older_run_json_still_resumes(tmp_path):
    _start(tmp_path, "--layer_quality=auto", "--target_drop=0.5", "--norescale_dropout")
    recorded = json.loads((tmp_path / "run.json").read_text())
    assert (recorded["layer_quality"], recorded["target_drop"], recorded["q_step"],
            recorded["rescale_dropout"]) == ("auto", 0.5, 0.1, False)
    older = tmp_path / "older"
    older.mkdir()
    settings = _config(*TINY).run_settings()
    new = ("layer_quality", "target_drop", "q_step", "rescale_dropout")
    (older / "run.json").write_text(json.dumps({k: v for k, v in settings.items()
                                                if k not in new}))
    _start(older)  # the settings it lacks are not compared
    assert json.loads((older / "run.json").read_text()) == settings


def test_an_unknown_layer_quality_name_is_refused_before_the_baseline_trains(tmp_path,
                                                                             monkeypatch):
    def dense_baseline(*args):
        raise AssertionError("the dense baseline trained")

    monkeypatch.setattr(example, "dense_baseline", dense_baseline)
    with example_flags(*TINY, f"--out_dir={tmp_path}", "--layer_quality=dense=0.5,fc9=1"), \
            pytest.raises(app.UsageError, match=r"--layer_quality names \['fc9'\], which are "
                                                r"not layers of the model; choose among"):
        example.main(["vgg19_cifar10.py"])
    assert sorted(os.listdir(tmp_path)) == ["run.json"]  # the lock was released


NOISE = ("cudart_stub", "cpu_feature_guard", "absl::InitializeLog", "cuInit", "oneDNN",
         "Could not find cuda drivers", "This TensorFlow binary is optimized")


def test_the_script_starts_without_tensorflows_log_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(EXAMPLES, os.pardir),
                                         env.get("PYTHONPATH", "")])
    process = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "vgg19_cifar10.py"), "--qualities=-1",
         f"--out_dir={tmp_path}"], capture_output=True, text=True, timeout=300, env=env)
    output = process.stdout + process.stderr
    assert process.returncode != 0 and "every q must be a finite number >= 0" in output
    assert [line for line in output.splitlines() if any(n in line for n in NOISE)] == []
    assert os.listdir(tmp_path) == []


def test_the_procedure_flags_reach_iterative_callbacks(monkeypatch):
    given = {}

    class Model:
        def fit(self, data, **kwargs):
            given["fit"] = kwargs

    def iterative_callbacks(run_dir, epochs_per_iteration, initial_lrs, lr_drops, **kwargs):
        given["callbacks"] = dict(kwargs, run_dir=run_dir, lr_drops=lr_drops)
        return ["callbacks"]

    monkeypatch.setattr(example.tf_stdprune, "iterative_callbacks", iterative_callbacks)
    cfg = _config(*TINY, "--target_drop=0.5", "--q_step=0.2", "--norescale_dropout",
                  "--noresume")
    info = types.SimpleNamespace(generator="data generator")
    example.prune_iteratively(cfg, Model(), ("train", "test", info), "run_dir")
    assert {k: given["callbacks"][k] for k in ("target_accuracy_drop", "q_step",
                                               "rescale_dropout", "validation_data",
                                               "checkpoint_extras")} == {
        "target_accuracy_drop": 0.5, "q_step": 0.2, "rescale_dropout": False,
        "validation_data": "test", "checkpoint_extras": {"data_rng": "data generator"}}
    assert given["fit"]["epochs"] == 2 and given["fit"]["callbacks"] == ["callbacks"]
    defaults = _config(*TINY, "--noresume")
    example.prune_iteratively(defaults, Model(), ("train", "test", info), "run_dir")
    assert (given["callbacks"]["target_accuracy_drop"], given["callbacks"]["rescale_dropout"]) \
        == (None, True)
