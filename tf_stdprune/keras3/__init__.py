"""The Keras 3 world, in ``keras.ops`` on any backend: the same module names as
`tf_stdprune.keras2` (wrapper, prune, iterative, quantize, export). Imports neither tf_keras
nor tfmot."""
