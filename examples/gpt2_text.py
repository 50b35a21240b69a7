"""A small GPT-2 (KerasHub) trained on text every machine has, then pruned with the std rule.

    python examples/gpt2_text.py                       # a few minutes on 2 CPU cores
    KERAS_BACKEND=jax python examples/gpt2_text.py --iterations=6

The text is the Python standard library's own source, read byte by byte (vocabulary 256,
no tokenizer and nothing to download): every tenth file, by sorted name, is held out. The
model is `keras_hub.models.GPT2CausalLM` on a `GPT2Backbone` built from the flags, without
a preprocessor; it reads ``{"token_ids", "padding_mask"}`` and predicts the next byte.

A dense baseline trains first (kept in --out_dir/baseline.weights.h5); then
``tf_stdprune.prune_low_std`` wraps every Dense, EinsumDense and embedding kernel at any
depth of the model, and `tf_stdprune.iterative_callbacks` runs the iterations: prune with
``q_i``, retrain --epochs_per_iteration epochs. Running the same command again resumes from
the last finished iteration (--out_dir/run). The summary (--out_dir/summary.md, also
printed) gives the held-out perplexity, ``exp(mean cross-entropy)``, of the dense model
after its baseline, of a dense control trained on from there for as many epochs as the
pruned model retrains (at the same rate; --out_dir/control.weights.h5), and of the pruned
model; the change is against the control, which has seen the same data as often (a dense
model short of convergence would otherwise read worse than the pruned one). Also the
zero weights of the Dense/EinsumDense kernels and of the whole model, the compression
rate and the wall time of the process. The stripped pruned model is --out_dir/final.keras.
"""
import dataclasses
import glob
import json
import math
import os
import sysconfig
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # a script may; the library never does

from absl import app, flags, logging  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import tf_stdprune  # noqa: E402
from tf_stdprune.io import atomic_write  # noqa: E402

VOCABULARY = 256  # one token per byte


@dataclasses.dataclass
class Config:
    """Every setting of the run; each is a flag of the same name."""
    out_dir: str = "runs/gpt2_text"
    train_bytes: int = 200_000
    held_out_bytes: int = 40_000
    sequence_length: int = 64
    num_layers: int = 2
    num_heads: int = 4
    hidden_dim: int = 128
    intermediate_dim: int = 512
    dropout: float = 0.0
    batch_size: int = 32
    learning_rate: float = 2e-3
    baseline_epochs: int = 6
    qualities: tuple = (0.8, 1.2, 1.6, 2.0)
    epochs_per_iteration: int = 2
    retrain_learning_rate: float = 1e-3
    seed: int = 0


for _field in dataclasses.fields(Config):
    _kind = type(_field.default)
    if _kind is tuple:
        flags.DEFINE_list(_field.name, [str(q) for q in _field.default], "q of each iteration.")
    elif _kind is int:
        flags.DEFINE_integer(_field.name, _field.default, f"{_field.name} (Config).")
    elif _kind is float:
        flags.DEFINE_float(_field.name, _field.default, f"{_field.name} (Config).")
    else:
        flags.DEFINE_string(_field.name, _field.default, f"{_field.name} (Config).")
flags.DEFINE_integer("iterations", None, "How many of --qualities to run (default: all).")


def config_from_flags():
    values = {f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(Config)}
    values["qualities"] = tuple(float(q) for q in values["qualities"])
    if flags.FLAGS.iterations is not None:
        if not 1 <= flags.FLAGS.iterations <= len(values["qualities"]):
            raise app.UsageError(f"--iterations must be in [1, {len(values['qualities'])}] "
                                 f"(one per --qualities value), got {flags.FLAGS.iterations}.")
        values["qualities"] = values["qualities"][:flags.FLAGS.iterations]
    return Config(**values)


def standard_library_text(train_bytes, held_out_bytes):
    """``(train, held_out)`` uint8 arrays of the standard library's ``*.py`` files: every
    tenth file by sorted name is held out, the others are training text; each capped."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    if len(files) < 20:
        raise RuntimeError(f"Found {len(files)} Python files in the standard library "
                           f"({sysconfig.get_paths()['stdlib']}); need 20 or more.")
    parts = {True: [], False: []}
    for index, path in enumerate(files):
        with open(path, "rb") as f:
            parts[index % 10 == 0].append(f.read())
    held_out = np.frombuffer(b"".join(parts[True]), np.uint8)[:held_out_bytes]
    train = np.frombuffer(b"".join(parts[False]), np.uint8)[:train_bytes]
    return train, held_out


def windows(text, sequence_length):
    """``(x, y)``: non-overlapping windows of ``sequence_length`` bytes, ``x`` the model's
    inputs (token ids, an all-ones padding mask), ``y`` the same bytes shifted by one."""
    count = (len(text) - 1) // sequence_length
    tokens = text[:count * sequence_length + 1].astype("int32")
    ids = tokens[:-1].reshape(count, sequence_length)
    targets = tokens[1:].reshape(count, sequence_length)
    return {"token_ids": ids, "padding_mask": np.ones_like(ids)}, targets


def causal_lm(cfg):
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCABULARY, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        hidden_dim=cfg.hidden_dim, intermediate_dim=cfg.intermediate_dim,
        dropout=cfg.dropout, max_sequence_length=cfg.sequence_length)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def compile_lm(model, learning_rate):
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])


def perplexity(model, data, batch_size):
    """``exp(mean cross-entropy per byte)`` of ``model`` on ``data``."""
    loss = model.evaluate(*data, batch_size=batch_size, verbose=0, return_dict=True)["loss"]
    return math.exp(loss)


def load_weights(model, path):
    """The model's weights from ``path``; the optimizer state saved with them is not
    needed (the model trains on with a fresh optimizer), so Keras's note is muted."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(path)


def trained_once(cfg, name, learning_rate, train, epochs, start_from=None):
    """A dense GPT-2 trained ``epochs`` epochs (from ``start_from``'s weights if given),
    kept in --out_dir/NAME.weights.h5 and reloaded from there by later runs."""
    model = causal_lm(cfg)
    compile_lm(model, learning_rate)
    path = os.path.join(cfg.out_dir, f"{name}.weights.h5")
    if os.path.exists(path):
        load_weights(model, path)
        print(f"dense {name}: reloaded from {path}")
        return model
    if start_from is not None:
        model.set_weights(start_from.get_weights())
    model.fit(*train, batch_size=cfg.batch_size, epochs=epochs, verbose=2)
    model.save_weights(path + ".tmp.weights.h5")
    os.replace(path + ".tmp.weights.h5", path)
    return model


def kernel_zeros(model):
    """Zeros / weights of the Dense and EinsumDense kernels of ``model`` (stripped)."""
    zeros = total = 0
    for layer in model._flatten_layers(include_self=False):
        if type(layer).__name__ in ("Dense", "EinsumDense"):
            kernel = keras.ops.convert_to_numpy(layer.kernel)
            zeros, total = zeros + int((kernel == 0).sum()), total + kernel.size
    return zeros / max(total, 1)


def summary_markdown(cfg, perplexities, report, seconds):
    dense_ppl, control_ppl, pruned_ppl = perplexities
    rows = [("dense perplexity (held-out), after the baseline", f"{dense_ppl:.3f}"),
            ("dense perplexity, trained as long as the pruned model", f"{control_ppl:.3f}"),
            ("pruned perplexity (held-out)", f"{pruned_ppl:.3f}"),
            ("perplexity change vs the equally trained dense model",
             f"{100 * (pruned_ppl / control_ppl - 1):+.2f} %"),
            ("zero weights, Dense/EinsumDense kernels", f"{100 * report['kernel_zeros']:.2f} %"),
            ("zero weights, all prunable tensors", f"{report['zeros']:.2f} %"),
            ("compression (all parameters / nonzero)", f"x{report['compression']:.2f}"),
            ("qualities", ", ".join(str(q) for q in cfg.qualities)),
            ("wall time of this process (s)", f"{seconds:.0f}")]
    lines = [f"# GPT-2 on standard-library bytes, {keras.backend.backend()} backend", "",
             "| measure | value |", "|---|---|"]
    return "\n".join(lines + [f"| {name} | {value} |" for name, value in rows]) + "\n"


def run(cfg):
    start = time.time()
    os.makedirs(cfg.out_dir, exist_ok=True)
    keras.utils.set_random_seed(cfg.seed)
    train_text, held_out_text = standard_library_text(cfg.train_bytes, cfg.held_out_bytes)
    train = windows(train_text, cfg.sequence_length)
    held_out = windows(held_out_text, cfg.sequence_length)
    dense = trained_once(cfg, "baseline", cfg.learning_rate, train, cfg.baseline_epochs)
    dense_ppl = perplexity(dense, held_out, cfg.batch_size)
    print(f"dense perplexity on held-out bytes: {dense_ppl:.3f}")

    steps_per_epoch = math.ceil(len(train[1]) / cfg.batch_size)
    epochs = cfg.epochs_per_iteration
    schedule = tf_stdprune.StdPruningSchedule(list(cfg.qualities),
                                              steps_per_iteration=epochs * steps_per_epoch)
    pruned = tf_stdprune.prune_low_std(dense, pruning_schedule=schedule)
    compile_lm(pruned, cfg.retrain_learning_rate)
    run_dir = os.path.join(cfg.out_dir, "run")
    initial_epoch = tf_stdprune.restore_run(pruned, run_dir)
    if initial_epoch:
        print(f"resuming after {initial_epoch // epochs} finished iterations ({run_dir})")
    callbacks = tf_stdprune.iterative_callbacks(
        run_dir, epochs, initial_lrs=[cfg.retrain_learning_rate], lr_drops=(),
        validation_data=held_out)
    pruned.fit(*train, batch_size=cfg.batch_size, epochs=len(cfg.qualities) * epochs,
               initial_epoch=initial_epoch, callbacks=callbacks, verbose=2)

    # the dense control: trained on from the baseline as long as the pruned model retrains
    control = trained_once(cfg, "control", cfg.retrain_learning_rate, train,
                           len(cfg.qualities) * epochs, start_from=dense)
    control_ppl = perplexity(control, held_out, cfg.batch_size)
    final = tf_stdprune.strip_pruning(pruned)
    compile_lm(final, cfg.retrain_learning_rate)
    pruned_ppl = perplexity(final, held_out, cfg.batch_size)
    sparsity = tf_stdprune.sparsity_report(final)
    report = {"kernel_zeros": kernel_zeros(final), "zeros": sparsity.zero_weights_rate,
              "compression": sparsity.compression_rate}
    summary = summary_markdown(cfg, (dense_ppl, control_ppl, pruned_ppl), report,
                               time.time() - start)
    final_path = os.path.join(cfg.out_dir, "final.keras")
    final.save(final_path + ".tmp.keras")
    os.replace(final_path + ".tmp.keras", final_path)
    atomic_write(os.path.join(cfg.out_dir, "summary.md"), summary)
    atomic_write(os.path.join(cfg.out_dir, "summary.json"), json.dumps(
        {"dense_perplexity": dense_ppl, "control_perplexity": control_ppl,
         "pruned_perplexity": pruned_ppl, **report}, indent=1))
    print(summary)
    return final


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    run(config_from_flags())


if __name__ == "__main__":
    app.run(main)
