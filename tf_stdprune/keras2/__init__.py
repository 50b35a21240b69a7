"""The tf_keras world: tfmot 0.8 is the engine (wrapper, prune, callbacks, iterative,
run_state, quantize, export, tflite, recalibration). `engine` is the one module that
imports tf_keras and tfmot."""
