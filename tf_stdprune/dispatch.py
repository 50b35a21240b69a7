"""Which Keras an object belongs to, and the module that handles it.

tf_stdprune serves two Keras worlds through the same public names: tf_keras (Keras 2,
with tfmot as the engine) and Keras 3 (any backend). An object belongs to the world that
defines one of its base classes (module ``tf_keras.*`` or ``keras.*``). Only the modules
of the world in use are imported, so ``import tf_stdprune`` loads neither tf_keras nor
tfmot, and a Keras 3 process never loads them. One process can use both worlds: each
call is routed by the object it receives; objects of the two worlds cannot be mixed in
one call.
"""
import importlib
import types

TF_KERAS, KERAS3 = "tf_keras", "keras3"

# Per world, the module that implements each public function of the package.
MODULES = {
    TF_KERAS: {"prune": "tf_stdprune.keras2.prune", "callbacks": "tf_stdprune.keras2.callbacks",
               "quantize": "tf_stdprune.keras2.quantize", "procedure": "tf_stdprune.keras2.iterative",
               "run": "tf_stdprune.keras2.run_state", "recalibration": "tf_stdprune.keras2.recalibration",
               "export": "tf_stdprune.keras2.export", "tflite": "tf_stdprune.keras2.tflite"},
    KERAS3: {"prune": "tf_stdprune.keras3.prune", "callbacks": "tf_stdprune.keras3.prune",
             "quantize": "tf_stdprune.keras3.quantize",
             "procedure": "tf_stdprune.keras3.iterative", "run": "tf_stdprune.keras3.iterative",
             "recalibration": "tf_stdprune.keras3.iterative",
             "export": "tf_stdprune.keras3.export", "tflite": "tf_stdprune.keras3.tflite"},
}


def world_of(obj):
    """``"tf_keras"``, ``"keras3"`` or None (neither), from the classes ``obj`` derives from."""
    for cls in type(obj).__mro__:
        root = cls.__module__.split(".")[0]
        if root == "tf_keras":
            return TF_KERAS
        if root == "keras":
            return KERAS3
    return None


def world(obj, what):
    """The one world of ``obj`` or of every item of a list/tuple of objects.

    Raises `TypeError` naming the objects when they mix both worlds or belong to neither.
    """
    items = list(obj) if isinstance(obj, (list, tuple)) else [obj]
    worlds = {world_of(item) for item in items}
    if worlds == {TF_KERAS} or worlds == {KERAS3}:
        return worlds.pop()
    if {TF_KERAS, KERAS3} <= worlds:
        names = ", ".join(f"{getattr(i, 'name', '?')} ({world_of(i)})" for i in items)
        raise TypeError(
            f"{what} mixes tf_keras and Keras 3 objects: {names}. Build every layer and "
            "model of one call with the same Keras (`import keras` for Keras 3, "
            "`import tf_keras` for tf_keras)."
        )
    raise TypeError(
        f"{what} takes a Keras layer or model (Keras 3 or tf_keras), got "
        f"{type(obj).__name__}."
    )


def keras_module(name):
    """The Keras module of world ``name``: ``keras`` for Keras 3; for tf_keras, ``tf_keras``
    as the tf_keras world loads it (through `tf_stdprune.keras2.engine`, which keeps the
    user's ``tf.keras`` and environment as they were)."""
    if name == KERAS3:
        return importlib.import_module("keras")
    return importlib.import_module("tf_stdprune.keras2.engine").keras


def module_for(obj, role, what):
    """The module implementing ``role`` (a key of `MODULES`) for ``obj``'s world."""
    return importlib.import_module(MODULES[world(obj, what)][role])


def _forwarding(name, used):
    def hook(self, *args, **kwargs):
        if self._callback is not None:
            return getattr(self._callback, name)(*args, **kwargs)
        return None

    hook.__name__ = name
    hook._is_default = not used  # read by Keras 3 to decide on asynchronous dispatch
    return hook


class DeferredCallback:
    """A callback for either Keras: it becomes the implementation of the model's world
    when ``fit`` hands it the model (``set_model``), and forwards every hook to it.

    A subclass names the implementation: ``ROLE`` (a key of `MODULES`) and ``NAME`` (the
    class in that world's module); the constructor's arguments are kept and given to it.
    An argument that is itself a `DeferredCallback` is replaced by its implementation for
    the same model, so that two deferred callbacks can share one object (target mode's
    judge is handed to `IterativePruning`). ``CHECK`` (``"module:name"``), if set, is
    called with the arguments at construction, so that a bad argument raises at once;
    until ``fit`` hands over the model, attributes are read from what it returned (e.g.
    ``IterationLearningRate(...).rate(epoch)``).
    """

    ROLE, NAME, CHECK = "callbacks", None, None

    def __init__(self, *args, **kwargs):
        self._checked = None
        if self.CHECK is not None:
            module, name = self.CHECK.split(":")
            self._checked = getattr(importlib.import_module(module), name)(*args, **kwargs)
        self._args, self._kwargs = args, kwargs
        self._callback = None

    def implementation(self, model):
        """The callback of ``model``'s world, built once per world with the arguments."""
        module = module_for(model, self.ROLE, self.NAME)
        implementation = getattr(module, self.NAME, None)
        if implementation is None:
            raise NotImplementedError(
                f"{self.NAME} is not available for {world(model, self.NAME)} models yet "
                f"({module.__name__} has none); use a tf_keras model for it.")
        if not isinstance(self._callback, implementation):
            kwargs = {key: value.implementation(model) if isinstance(value, DeferredCallback)
                      else value for key, value in self._kwargs.items()}
            self._callback = implementation(*self._args, **kwargs)
        return self._callback

    def set_model(self, model):
        self.implementation(model).set_model(model)

    def set_params(self, params):
        if self._callback is not None:
            self._callback.set_params(params)

    @property
    def model(self):
        return self._callback.model if self._callback is not None else None

    def __getattr__(self, name):  # the rest of either Keras's callback protocol
        callback = self.__dict__.get("_callback") or self.__dict__.get("_checked")
        if callback is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(callback, name)


for _stage in ("train", "test", "predict"):
    for _event in ("begin", "end"):
        setattr(DeferredCallback, f"on_{_stage}_{_event}",
                _forwarding(f"on_{_stage}_{_event}", _stage == "train"))
        setattr(DeferredCallback, f"on_{_stage}_batch_{_event}",
                _forwarding(f"on_{_stage}_batch_{_event}", _stage == "train"))
for _event in ("begin", "end"):
    setattr(DeferredCallback, f"on_epoch_{_event}", _forwarding(f"on_epoch_{_event}", True))
    setattr(DeferredCallback, f"on_batch_{_event}", _forwarding(f"on_batch_{_event}", False))


class UpdatePruningStep(DeferredCallback):
    """The callback that drives pruning inside ``model.fit``, for either Keras.

    It becomes the tf_keras path's callback (tfmot's, plus optimizer-slot masking) or the
    Keras 3 path's when ``fit`` hands it the model, and forwards every hook to it.
    """

    NAME = "UpdatePruningStep"


def _procedure_callback(name, doc, check=None):
    return type(name, (DeferredCallback,), {
        "ROLE": "procedure", "NAME": name, "CHECK": check, "__doc__": doc,
        "__module__": __name__})


# The callbacks of `procedure.iterative_callbacks`, for either Keras (see each world's
# module: `keras2.iterative` for tf_keras, `keras3.iterative` for Keras 3).
procedure_callbacks = types.SimpleNamespace(
    UpdatePruningStep=UpdatePruningStep,
    IterationLearningRate=_procedure_callback(
        "IterationLearningRate", "The per-iteration learning rate, for either Keras.",
        "tf_stdprune.procedure.iterative:IterationLearningRateLogic"),
    IterativePruning=_procedure_callback(
        "IterativePruning", "The iterative procedure's callback, for either Keras.",
        "tf_stdprune.procedure.iterative:IterativePruningLogic"),
    DropoutRescaling=_procedure_callback(
        "DropoutRescaling", "Dropout rescaling after pruning, for either Keras."),
    TargetAccuracy=_procedure_callback(
        "TargetAccuracy", "Target mode's judge, for either Keras."),
)
