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

TF_KERAS, KERAS3 = "tf_keras", "keras3"

# Per world, the module that implements each public function of the package.
MODULES = {
    TF_KERAS: {"prune": "tf_stdprune.prune", "callbacks": "tf_stdprune.callbacks",
               "quantize": "tf_stdprune.quantize"},
    KERAS3: {"prune": "tf_stdprune.keras3_prune", "callbacks": "tf_stdprune.keras3_prune",
             "quantize": "tf_stdprune.keras3_quantize"},
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


class UpdatePruningStep:
    """The callback that drives pruning inside ``model.fit``, for either Keras.

    It becomes the tf_keras path's callback (tfmot's, plus optimizer-slot masking) or the
    Keras 3 path's when ``fit`` hands it the model, and forwards every hook to it.
    """

    def __init__(self):
        self._callback = None

    def set_model(self, model):
        implementation = module_for(model, "callbacks", "UpdatePruningStep").UpdatePruningStep
        if not isinstance(self._callback, implementation):
            self._callback = implementation()
        self._callback.set_model(model)

    def set_params(self, params):
        if self._callback is not None:
            self._callback.set_params(params)

    @property
    def model(self):
        return self._callback.model if self._callback is not None else None

    def __getattr__(self, name):  # the rest of either Keras's callback protocol
        callback = self.__dict__.get("_callback")
        if callback is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(callback, name)


for _stage in ("train", "test", "predict"):
    for _event in ("begin", "end"):
        setattr(UpdatePruningStep, f"on_{_stage}_{_event}",
                _forwarding(f"on_{_stage}_{_event}", _stage == "train"))
        setattr(UpdatePruningStep, f"on_{_stage}_batch_{_event}",
                _forwarding(f"on_{_stage}_batch_{_event}", _stage == "train"))
for _event in ("begin", "end"):
    setattr(UpdatePruningStep, f"on_epoch_{_event}", _forwarding(f"on_epoch_{_event}", True))
    setattr(UpdatePruningStep, f"on_batch_{_event}", _forwarding(f"on_batch_{_event}", False))
