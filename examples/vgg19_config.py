"""The settings of examples/vgg19_cifar10.py: one typed `Config`, its presets, its flags.

Every field of `Config` is a flag of the same name (``--width=0.5``, ``--noaugment``,
``--qualities=0.5,1.0``; `tf_stdprune.config_flags`); `config` starts from the chosen preset
and replaces the fields whose flag was given; `validate` refuses every bad value before
anything trains.
"""
import dataclasses
import inspect
import os
from typing import Optional, Union

from absl import app, flags

from tf_stdprune import config_flags
from tf_stdprune.config_flags import setting
from tf_stdprune.dispatch import KERAS3, TF_KERAS, keras_module
from tf_stdprune.procedure import experiment


@dataclasses.dataclass(frozen=True)
class Config:
    """One run of the example. Fields without a default come from the preset."""
    dataset: str = setting("cifar10 (tfds) or digits (offline).", choices=["cifar10", "digits"])
    width: float = setting("Width multiplier of VGG19-BN (1.0: 38,969,930 parameters).")
    batch_size: int = setting("Global batch size (split over replicas).", lower_bound=1)
    augment: bool = setting("Pad-4 random crops (+ flips on CIFAR-10) for training.")
    baseline_epochs: int = setting("Epochs of the dense baseline.", lower_bound=1)
    baseline_lr: float = setting("Initial learning rate of the dense baseline.")
    baseline_lr_drops: tuple[int, ...] = setting("Baseline epochs where the rate drops 10x.")
    iterations: int = setting("Prune + retrain iterations (target mode: at most).", lower_bound=1)
    epochs_per_iteration: int = setting("Retraining epochs per iteration.", lower_bound=1)
    lr_drops: tuple[int, ...] = setting("Epochs inside an iteration where the rate drops 10x.")
    initial_lrs: tuple[float, ...] = setting("Initial rate of each iteration (last repeats).")
    qualities: tuple[float, ...] = setting(
        "Quality parameter q of each iteration (last repeats; target mode: the first q).")
    std_mode: str = setting("Which sigma q multiplies.", choices=["initial", "surviving", "all"])
    recalibration_batches: int = setting("BN recalibration batches (0: off).", lower_bound=0)
    out_dir: str = setting("Output directory.")
    quantize_bits: Optional[int] = setting(
        "Weight sharing with 2^b centroids after pruning (0: none).", lower_bound=0, upper_bound=12)
    export_sparse: bool = setting("Also export a sparse SavedModel.")
    compress: bool = setting("Also write the Huffman-coded model file.")
    tflite: bool = setting("Also write final/model.tflite and final/model_int8.tflite.")
    data_dir: Optional[str] = setting("tensorflow-datasets directory holding cifar10/.", None)
    max_train_examples: Optional[int] = setting("Use only the first N training examples.", None,
                                                lower_bound=1)
    seed: int = setting("Random seed (weights, shuffling, augmentation, split).", 0)
    resume: bool = setting("Continue the run found in --out_dir.", True)
    mixed_precision: bool = setting("mixed_float16 on GPU, mixed_bfloat16 on CPU.", False)
    jit_compile: bool = setting("Compile the train and test steps with XLA.", False)
    strategy: str = setting("tf.distribute strategy (multi_worker reads TF_CONFIG).", "default",
                            choices=["default", "mirrored", "multi_worker", "tpu"])
    cpu_replicas: Optional[int] = setting(
        "Split the CPU into N logical devices (--strategy=mirrored without GPUs).", None,
        lower_bound=1)
    quantize_epochs: int = setting("Centroid fine-tuning epochs.", 2, lower_bound=0)
    quantize_lr: float = setting("Adam rate of the centroid fine-tuning.", 1e-5, lower_bound=0)
    sensitivity: bool = setting("First prune each layer of the dense model alone at each q; "
                                "write the table and plot to --out_dir/sensitivity/.", False)
    sensitivity_qualities: Optional[tuple[float, ...]] = setting(
        "The q values the sensitivity analysis tries (none: 0 to 2 in steps of 0.25).", None)
    sensitivity_max_drop: float = setting(
        "Points of top-1 a layer may lose in the analysis for --layer_quality=auto.", 1.0)
    layer_quality: Union[None, str, dict] = setting(
        "Per-layer factors of q: 'auto' (the sensitivity analysis' suggestion) or "
        "name=factor,... (names as in model.summary()).", None, parse=experiment.parse_layer_quality)
    target_drop: Optional[float] = setting(
        "Target mode: raise q by --q_step per iteration until top-1 drops more than this "
        "many points below dense; that iteration is undone.", None)
    q_step: float = setting("Target mode's increase of q per iteration.", 0.1)
    rescale_dropout: bool = setting("Rescale Dropout rates after each pruning.", True)
    latency_threads: tuple[int, ...] = setting("summary.md's latency columns (none: off).", (1, 2))
    keras: str = setting(
        "2: tf_keras (tfmot's engine). 3: Keras 3 on KERAS_BACKEND's backend (no "
        "--mixed_precision, --jit_compile; --strategy=mirrored on TensorFlow).", "2", choices=["2", "3"])

    def keras_module(self):
        """``tf_keras`` (``keras="2"``) or Keras 3's ``keras``, imported on demand."""
        return keras_module(KERAS3 if self.keras == "3" else TF_KERAS)

    def run_settings(self):
        """The settings that define a run in --out_dir (`RUN_SETTINGS`), JSON-ready."""
        return {name: list(v) if isinstance(v, tuple) else v
                for name, v in ((n, getattr(self, n)) for n in RUN_SETTINGS)}


# The reference experiment gives no quality parameters: "paper" raises q by 0.1 per iteration
# up to 1.6 (about 89 % of a Gaussian layer below 1.6 sigma; the reference experiment ended at
# 87.9 % zeros).
PRESETS = {
    "paper": Config(
        dataset="cifar10", width=1.0, batch_size=128, augment=True,
        baseline_epochs=160, baseline_lr=0.05, baseline_lr_drops=(80, 120),
        iterations=20, epochs_per_iteration=20, lr_drops=(3, 10, 16),
        initial_lrs=(0.05,) + (0.01,) * 9 + (0.001, 0.001),
        qualities=tuple(round(0.1 * i, 1) for i in range(1, 17)),
        std_mode="initial", recalibration_batches=50, out_dir="runs/paper",
        quantize_bits=None, export_sparse=False, compress=False, tflite=False),
    "quick": Config(
        dataset="digits", width=0.25, batch_size=64, augment=False,
        baseline_epochs=8, baseline_lr=0.01, baseline_lr_drops=(6,),
        iterations=4, epochs_per_iteration=3, lr_drops=(2,),
        initial_lrs=(0.01,), qualities=(0.8, 1.2, 1.5, 1.7),
        std_mode="initial", recalibration_batches=10, out_dir="runs/quick",
        quantize_bits=5, export_sparse=True, compress=True, tflite=True),
}

# The settings that define a run in --out_dir: resuming with another value is refused
# (a setting that an older run.json lacks is not compared).
RUN_SETTINGS = ("dataset", "max_train_examples", "augment", "width", "batch_size", "seed",
                "baseline_epochs", "baseline_lr", "baseline_lr_drops", "iterations",
                "epochs_per_iteration", "lr_drops", "initial_lrs", "qualities", "std_mode",
                "recalibration_batches", "layer_quality", "target_drop", "q_step",
                "rescale_dropout", "keras")


def define_flags(flag_values=flags.FLAGS):
    """``--preset`` and one flag per `Config` field (`config_flags.define_flags`)."""
    config_flags.define_flags(Config, PRESETS, "quick", flag_values)
    flags.adopt_module_key_flags(config_flags, flag_values)  # they are this module's flags


def config(flag_values=flags.FLAGS):
    """The preset's `Config` with every field whose flag was given replaced."""
    cfg = config_flags.from_flags(Config, PRESETS, flag_values)
    return dataclasses.replace(cfg, out_dir=os.path.expanduser(cfg.out_dir),
                               quantize_bits=cfg.quantize_bits or None)


def _check_keras3(cfg):
    """The settings a Keras 3 run (``--keras=3``) does not support."""
    if cfg.keras != "3":
        return
    refused = [flag for flag, given in [
        ("--mixed_precision", cfg.mixed_precision), ("--jit_compile", cfg.jit_compile),
        (f"--strategy={cfg.strategy}", cfg.strategy in ("multi_worker", "tpu"))] if given]
    if refused:
        raise app.UsageError(f"{refused[0]} is supported with --keras=2 (tf_keras) only; with "
                             "--keras=3 leave it out (Keras 3 compiles with jit_compile='auto').")
    backend = cfg.keras_module().backend.backend()
    if (cfg.strategy == "mirrored" or cfg.cpu_replicas) and backend != "tensorflow":
        raise app.UsageError(f"--strategy=mirrored and --cpu_replicas need tf.distribute: "
                             f"run with KERAS_BACKEND=tensorflow, not {backend!r}.")


def validate(cfg):
    """Raises `app.UsageError` naming the flag, the value and the fix for every value that
    would fail later (e.g. after the dense baseline trained); warns of LR drops that can
    never fire (`experiment.check_settings`)."""
    names = list(inspect.signature(experiment.check_settings).parameters)[1:]
    try:
        experiment.check_settings("--", **{name: getattr(cfg, name) for name in names})
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    _check_keras3(cfg)
