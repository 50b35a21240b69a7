"""Pruning at any depth of any Keras 3 model: custom layers of Dense sublayers, subclassed
models, KerasHub backbones and tasks (tiny configurations built in code)."""
import os

import keras
import keras_hub
import numpy as np
import pytest

import tf_stdprune
from tf_stdprune.keras3.prune import wrappers
from keras3.helpers import TwoDense, train_step

BERT = dict(vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64,
            max_sequence_length=16)


@keras.saving.register_keras_serializable(package="test_keras3_nested")
class HandWritten(keras.Model):
    """A subclassed model: a hand-written call over layers held as attributes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.block = TwoDense(8, name="block")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x):
        return self.head(self.block(x))


def composite_model():
    inputs = keras.Input((6,))
    hidden = TwoDense(8, name="two")(keras.layers.Dense(8, name="d_in")(inputs))
    return keras.Model(inputs, keras.layers.Dense(3, name="d_out")(hidden))


def kernels(model):
    """``{variable path: numpy value}`` of every kernel/embedding of ``model``."""
    return {v.path: keras.ops.convert_to_numpy(v) for v in model.weights
            if v.path.split("/")[-1] in ("kernel", "embeddings") and len(v.shape) >= 2}


def oracle_masks(values, q):
    """The std rule in float64 numpy: keep ``|w| >= q * std(w)`` (the first pruning)."""
    return {path: np.abs(w.astype(np.float64)) >= q * np.std(w.astype(np.float64))
            for path, w in values.items()}


def prune_now(model, q=1.0, **kwargs):
    """``prune_low_std`` then one mask update with quality ``q`` on every pruned layer."""
    pruned = tf_stdprune.prune_low_std(model, **kwargs)
    for state in wrappers(pruned):
        state.update_masks(q)
    return pruned


def test_every_nested_kernel_is_pruned_by_the_rule_and_the_users_model_is_unchanged():
    """Each kernel at any depth gets the numpy oracle's mask, the original keeps its
    weights, and the stripped model computes what the pruned one computes."""
    model = composite_model()
    before = kernels(model)
    pruned = prune_now(model, 1.0)
    assert sorted(state.name for state in wrappers(pruned)) == ["d_in", "d_out", "two/first",
                                                              "two/second"]
    expected = oracle_masks(before, 1.0)
    for path, value in kernels(pruned).items():
        np.testing.assert_array_equal(value != 0, expected[path], err_msg=path)
        np.testing.assert_array_equal(value[expected[path]], before[path][expected[path]])
    for path, value in kernels(model).items():
        np.testing.assert_array_equal(value, before[path])
    x = np.random.default_rng(0).normal(size=(5, 6)).astype("float32")
    stripped = tf_stdprune.strip_pruning(pruned)
    assert len(stripped.weights) == len(model.weights)
    np.testing.assert_allclose(stripped.predict(x, verbose=0), pruned.predict(x, verbose=0),
                               atol=1e-6)
    report = tf_stdprune.sparsity_report(pruned)
    assert [row.name for row in report.layers] == ["d_in", "two/first", "two/second", "d_out"]
    assert report.total_parameters == sum(int(np.prod(w.shape)) for w in model.weights)


def test_masks_are_uint8_and_cost_a_quarter_of_the_weights_bytes():
    pruned = tf_stdprune.prune_low_std(composite_model())
    masks = [m for state in wrappers(pruned) for m in state.masks]
    weights = [w for state in wrappers(pruned) for w in state.pruned_weights]
    assert {m.dtype for m in masks} == {"uint8"}
    mask_bytes = sum(int(np.prod(m.shape)) for m in masks)
    assert 4 * mask_bytes == sum(4 * int(np.prod(w.shape)) for w in weights)


@pytest.mark.parametrize("optimizer", [
    lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    lambda: keras.optimizers.Adam(0.01, clipnorm=0.1),
    lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1)])
def test_training_keeps_nested_zeros_exact_and_slots_zero(optimizer):
    """fit with UpdatePruningStep (SGD momentum + L2 in the loss, Adam with clipnorm,
    AdamW): after pruning, the nested pruned weights and their slots stay exactly 0."""
    model = composite_model()
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.Dense):
            layer.kernel_regularizer = keras.regularizers.L2(1e-2)
    schedule = tf_stdprune.StdPruningSchedule([1.0], steps_per_iteration=100)
    pruned = tf_stdprune.prune_low_std(model, pruning_schedule=schedule)
    pruned.compile(optimizer(), "mse")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(32, 6)).astype("float32"), rng.normal(size=(32, 3)).astype("float32")
    pruned.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[tf_stdprune.UpdatePruningStep()])
    from tf_stdprune.keras3.wrapper import optimizer_slots

    for state in wrappers(pruned):
        mask = keras.ops.convert_to_numpy(state.masks[0]) == 0
        assert mask.any(), state.name
        weight = state.pruned_weights[0]
        assert np.all(keras.ops.convert_to_numpy(weight)[mask] == 0.0), state.name
        for slot in optimizer_slots(pruned.optimizer, weight):
            assert np.all(keras.ops.convert_to_numpy(slot)[mask] == 0.0), state.name


def test_a_custom_training_loop_keeps_nested_zeros_and_trains_every_tensor():
    """The backend's own autodiff and optimizer.apply (no fit, no callback): after each
    mask update, nested pruned weights stay exactly 0 while every tensor trains."""
    pruned = tf_stdprune.prune_low_std(composite_model())
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    optimizer.build(pruned.trainable_variables)
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(8, 6)).astype("float32"), rng.normal(size=(8, 3)).astype("float32")
    for step in range(4):
        if step in (0, 2):
            for state in wrappers(pruned):
                state.update_masks(0.5 if step == 0 else 0.9, optimizer)
        before = [keras.ops.convert_to_numpy(v) for v in pruned.trainable_variables]
        train_step(pruned, optimizer, keras.losses.MeanSquaredError(), x, y)
        for state in wrappers(pruned):
            mask = keras.ops.convert_to_numpy(state.masks[0]) == 0
            assert mask.any(), state.name
            assert np.all(keras.ops.convert_to_numpy(state.pruned_weights[0])[mask] == 0.0)
        assert all(np.any(keras.ops.convert_to_numpy(v) != b)
                   for v, b in zip(pruned.trainable_variables, before))


def test_gradients_are_zero_at_pruned_nested_positions():
    """The loss's gradient reaches a nested pruned kernel as exactly 0 where it is pruned
    (the layer computes with w * m), on the backend in use."""
    pruned = prune_now(composite_model(), 0.8)
    state = next(s for s in wrappers(pruned) if s.name == "two/first")
    x = np.random.default_rng(2).normal(size=(4, 6)).astype("float32")
    backend = keras.backend.backend()
    kernel = state.pruned_weights[0]
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = keras.ops.sum(pruned(x) ** 2)
        gradient = tape.gradient(loss, kernel.value)
    elif backend == "jax":
        import jax

        trainable = [v.value for v in pruned.trainable_variables]
        non_trainable = [v.value for v in pruned.non_trainable_variables]
        index = [id(v) for v in pruned.trainable_variables].index(id(kernel))

        def loss(values):
            out, _ = pruned.stateless_call(values, non_trainable, x)
            return keras.ops.sum(out ** 2)

        gradient = jax.grad(loss)(trainable)[index]
    else:
        pytest.skip(f"gradient check written for tensorflow and jax, not {backend}")
    pruned_here = keras.ops.convert_to_numpy(state.masks[0]) == 0
    assert pruned_here.any()
    assert np.all(np.asarray(gradient)[pruned_here] == 0.0)
    assert np.any(np.asarray(gradient)[~pruned_here] != 0.0)


class Block(keras.layers.Layer):
    """A Dense layer of its own (ReLU), then a Dense layer it is handed."""

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.own = keras.layers.Dense(6, activation="relu", name="own")
        self.inner = inner

    def call(self, x):
        return self.inner(self.own(x))


@keras.saving.register_keras_serializable(package="test_keras3_nested")
class SharedTwice(keras.Model):
    """A subclassed model whose two blocks hold one and the same Dense layer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        shared = keras.layers.Dense(6, name="shared")
        self.first, self.second = Block(shared, name="first"), Block(shared, name="second")

    def call(self, x):
        return self.second(self.first(x))


def test_a_layer_held_by_two_blocks_is_pruned_once_and_both_calls_use_its_mask():
    """One state, one mask, named by the first path; naming the second path is refused
    with the paths to use; the output is the numpy forward pass with the masked kernels."""
    model = SharedTwice()
    x = np.random.default_rng(3).normal(size=(4, 6)).astype("float32")
    model(x)
    pruned = prune_now(model, 1.0)
    names = sorted(s.name for s in wrappers(pruned))
    assert names == ["first/own", "first/shared", "second/own"]
    kernel = {s.name: keras.ops.convert_to_numpy(s.pruned_weights[0]) for s in wrappers(pruned)}
    bias = {s.name: keras.ops.convert_to_numpy(s.layer.bias) for s in wrappers(pruned)}

    def dense(h, name, relu):
        out = h @ kernel[name] + bias[name]
        return np.maximum(out, 0) if relu else out

    h = dense(dense(x, "first/own", True), "first/shared", False)
    expected = dense(dense(h, "second/own", True), "first/shared", False)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(pruned(x)), expected, atol=1e-5)
    with pytest.raises(ValueError, match="not in the model.*first/shared"):
        tf_stdprune.prune_low_std(model, skip=["second/shared"])
    with pytest.raises(ValueError, match=r"first/own \(Dense\) is not built.*model\(x\)"):
        tf_stdprune.prune_low_std(SharedTwice())  # never called: nothing to prune yet


def test_a_subclassed_model_with_a_hand_written_call_is_pruned_on_a_copy():
    model = HandWritten()
    model(np.ones((1, 6), "float32"))
    pruned = prune_now(model)
    assert type(pruned) is HandWritten and pruned is not model
    assert sorted(s.name for s in wrappers(pruned)) == ["block/first", "block/second", "head"]
    assert not wrappers(model)


def test_unknown_nested_tensors_name_their_path_and_skip_takes_paths():
    @keras.saving.register_keras_serializable(package="test_keras3_nested")
    class Table(keras.layers.Layer):
        def build(self, shape):
            self.table = self.add_weight(shape=(shape[-1], 4), name="table")

        def call(self, x):
            return keras.ops.matmul(x, self.table)

    @keras.saving.register_keras_serializable(package="test_keras3_nested")
    class Outer(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(4, name="dense")
            self.table = Table(name="inner_table")

        def call(self, x):
            return self.table(self.dense(x))

    inputs = keras.Input((3,))
    model = keras.Model(inputs, Outer(name="outer")(inputs))
    with pytest.raises(ValueError, match=r"outer/inner_table.*skip=\['outer/inner_table'\]"):
        tf_stdprune.prune_low_std(model)
    pruned = tf_stdprune.prune_low_std(model, skip=["outer/inner_table"])
    assert [s.name for s in wrappers(pruned)] == ["outer/dense"]
    with pytest.raises(ValueError, match="not in the model"):
        tf_stdprune.prune_low_std(model, skip=["outer/nothing"])


@pytest.fixture(scope="module")
def bert():
    keras.utils.set_random_seed(0)
    return keras_hub.models.BertBackbone(**BERT)


def bert_inputs(batch=2):
    ids = np.random.default_rng(0).integers(1, BERT["vocabulary_size"], size=(batch, 8))
    return {"token_ids": ids.astype("int32"), "segment_ids": np.zeros_like(ids, "int32"),
            "padding_mask": np.ones_like(ids, "int32")}


def test_a_bert_backbone_is_pruned_at_every_depth_and_strips_to_the_same_class(bert, tmp_path):
    """Every kernel of the tiny BertBackbone follows the oracle; strip_pruning gives a
    BertBackbone of the same config whose outputs equal the pruned model's; it saves to
    .keras and to a local preset and loads back from both."""
    before = kernels(bert)
    pruned = prune_now(bert, 1.0)
    blocks = [f"transformer_layer_{i}/{name}" for i in range(2) for name in (
        "self_attention_layer", "feedforward_intermediate_dense", "feedforward_output_dense")]
    assert sorted(s.name for s in wrappers(pruned)) == sorted(
        ["pooled_dense", "segment_embedding", "token_embedding", *blocks])
    expected = oracle_masks(before, 1.0)
    pruned_kernels = kernels(pruned)
    checked = 0
    for path, value in pruned_kernels.items():
        if "position_embedding" in path:  # kept dense on purpose (registry.NOT_PRUNED)
            np.testing.assert_array_equal(value, before[path])
            continue
        np.testing.assert_array_equal(value != 0, expected[path], err_msg=path)
        checked += 1
    assert checked >= 2 * 6 + 3  # q, k, v, output, two feedforward per block; embeddings
    assert kernels(bert).keys() == before.keys()
    assert all(np.array_equal(v, before[p]) for p, v in kernels(bert).items())
    stripped = tf_stdprune.strip_pruning(pruned)
    assert type(stripped) is keras_hub.models.BertBackbone
    assert stripped.get_config() == bert.get_config()
    x = bert_inputs()
    out, reference = stripped(x), pruned(x)
    for key in ("sequence_output", "pooled_output"):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(out[key]),
                                   keras.ops.convert_to_numpy(reference[key]), atol=1e-5)
    path = str(tmp_path / "bert.keras")
    stripped.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)["pooled_output"]),
                               keras.ops.convert_to_numpy(out["pooled_output"]), atol=1e-6)
    preset = str(tmp_path / "preset")
    stripped.save_to_preset(preset)
    from_preset = keras_hub.models.BertBackbone.from_preset(preset)
    assert kernels(from_preset).keys() == kernels(stripped).keys()
    for p, v in kernels(from_preset).items():
        np.testing.assert_array_equal(v, kernels(stripped)[p])
    report = tf_stdprune.sparsity_report(pruned)
    assert any(row.name.startswith("transformer_layer_0/") for row in report.layers)


def test_a_bert_classifier_trains_pruned_with_fit_on_token_ids(bert):
    classifier = keras_hub.models.BertTextClassifier(bert, num_classes=2, preprocessor=None)
    schedule = tf_stdprune.StdPruningSchedule([1.0], steps_per_iteration=100)
    pruned = tf_stdprune.prune_low_std(classifier, pruning_schedule=schedule)
    pruned.compile(keras.optimizers.Adam(1e-3),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = bert_inputs(8), np.arange(8) % 2
    history = pruned.fit(x, y, batch_size=4, epochs=2, verbose=0,
                         callbacks=[tf_stdprune.UpdatePruningStep()])
    assert np.all(np.isfinite(history.history["loss"]))
    for state in wrappers(pruned):
        mask = keras.ops.convert_to_numpy(state.masks[0]) == 0
        assert mask.any() and np.all(
            keras.ops.convert_to_numpy(state.pruned_weights[0])[mask] == 0), state.name


def test_a_gpt2_causal_lm_trains_pruned_and_generates_after_stripping():
    """The tied token embedding is one tensor with one mask (input and logits), fit runs
    on token ids, and the stripped GPT2CausalLM generates token ids."""
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(**{**BERT, "vocabulary_size": 64})
    lm = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    schedule = tf_stdprune.StdPruningSchedule([1.0], steps_per_iteration=100)
    pruned = tf_stdprune.prune_low_std(lm, pruning_schedule=schedule)
    embedding = [s for s in wrappers(pruned) if s.name.endswith("token_embedding")]
    assert len(embedding) == 1 and len(embedding[0].masks) == 1
    ids = np.random.default_rng(0).integers(0, 64, size=(8, 16)).astype("int32")
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    pruned.compile(keras.optimizers.Adam(1e-3),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruned.fit(x, np.roll(ids, -1, 1), batch_size=4, epochs=1, verbose=0,
               callbacks=[tf_stdprune.UpdatePruningStep()])
    stripped = tf_stdprune.strip_pruning(pruned)
    assert type(stripped) is keras_hub.models.GPT2CausalLM
    np.testing.assert_allclose(stripped.predict(x, verbose=0), pruned.predict(x, verbose=0),
                               atol=1e-5)
    prompt = {"token_ids": ids[:2], "padding_mask": np.concatenate(
        [np.ones((2, 4)), np.zeros((2, 12))], axis=1).astype("int32")}
    generated = stripped.generate(prompt, max_length=16, stop_token_ids=None)
    assert generated["token_ids"].shape == (2, 16)
    np.testing.assert_array_equal(generated["token_ids"][:, :4], ids[:2, :4])


@pytest.mark.parametrize("build", [
    lambda: keras_hub.models.GemmaBackbone(vocabulary_size=64, num_layers=1, num_query_heads=2,
                                           num_key_value_heads=1, hidden_dim=16,
                                           intermediate_dim=32, head_dim=8),
    lambda: keras_hub.models.ViTBackbone(image_shape=(16, 16, 3), patch_size=8, num_layers=1,
                                         num_heads=2, hidden_dim=16, mlp_dim=32)],
    ids=["gemma", "vit"])
def test_gemma_and_vit_backbones_are_pruned_or_name_what_to_skip(build):
    model = build()
    try:
        pruned = prune_now(model)
    except ValueError as error:  # a tensor of its own that the rule does not know
        assert "skip=[" in str(error)
        path = str(error).split("skip=['")[1].split("'")[0]
        pruned = prune_now(model, skip=[path])
    assert len(wrappers(pruned)) >= 3  # attention and the two feedforward kernels at least
    report = tf_stdprune.sparsity_report(pruned)
    assert report.zero_weights > 0 and report.total_parameters == sum(
        int(np.prod(w.shape)) for w in model.weights)


def test_a_gpt2_causal_lm_goes_through_weight_sharing_the_compressed_file_and_the_export(
        tmp_path):
    """quantize_weights reaches every nested kernel of a pruned GPT2CausalLM (at most 2^b
    shared values, pruned positions still 0, only centroids train), strip_quantization and
    decompress give the same class with the same weights, and the sparse SavedModel (TF
    backend) serves the stripped model's logits."""
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=64, num_layers=1, num_heads=2,
                                             hidden_dim=16, intermediate_dim=32,
                                             max_sequence_length=16)
    pruned = prune_now(keras_hub.models.GPT2CausalLM(backbone, preprocessor=None), 1.0)
    stripped = tf_stdprune.strip_pruning(pruned)
    ids = np.random.default_rng(0).integers(0, 64, size=(4, 16)).astype("int32")
    x, y = {"token_ids": ids, "padding_mask": np.ones_like(ids)}, np.roll(ids, -1, 1)
    quantized = tf_stdprune.quantize_weights(pruned, bits=3)
    assert type(quantized) is keras_hub.models.GPT2CausalLM and quantized is not pruned
    before = kernels(stripped)
    quantized.compile(keras.optimizers.Adam(1e-2),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    quantized.fit(x, y, epochs=2, verbose=0)
    final = tf_stdprune.strip_quantization(quantized)
    assert type(final) is keras_hub.models.GPT2CausalLM
    assert final.get_config() == stripped.get_config()
    after = kernels(final)
    assert after.keys() == before.keys()
    for path, value in after.items():
        if "position_embedding" in path:  # neither pruned nor shared (registry.NOT_PRUNED)
            continue
        np.testing.assert_array_equal(value == 0, before[path] == 0, err_msg=path)
        assert len(np.unique(value[value != 0])) <= 2 ** 3, path
        assert not np.array_equal(value, before[path]), path  # the centroids trained
    assert kernels(stripped).keys() == before.keys()
    assert all(np.array_equal(v, before[p]) for p, v in kernels(stripped).items())
    logits = keras.ops.convert_to_numpy(final(x))
    np.testing.assert_allclose(logits, keras.ops.convert_to_numpy(quantized(x)), atol=1e-5)
    report = tf_stdprune.sparsity_report(quantized)
    assert report.total_parameters == sum(int(np.prod(w.shape)) for w in stripped.weights)
    assert report.zero_weights == tf_stdprune.sparsity_report(final).zero_weights
    path = tf_stdprune.compress(quantized, str(tmp_path / "gpt2.tfspz"))
    names = [t.name for t in tf_stdprune.compression_report(path).tensors]
    assert "transformer_layer_0/feedforward_output_dense/kernel" in names, names
    restored = tf_stdprune.decompress(path)
    assert type(restored) is keras_hub.models.GPT2CausalLM
    for restored_weight, weight in zip(restored.get_weights(), final.get_weights()):
        np.testing.assert_array_equal(restored_weight, weight)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        export = tf_stdprune.export_sparse_saved_model(quantized, str(tmp_path / "sparse"))
        serve = tf.saved_model.load(export).signatures["serving_default"]
        served = serve(token_ids=tf.constant(ids), padding_mask=tf.constant(np.ones_like(ids)))
        np.testing.assert_allclose(next(iter(served.values())).numpy(), logits, atol=1e-5)
