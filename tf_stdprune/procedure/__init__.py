"""The iterative procedure, for either Keras and importing neither: its callbacks'
logic (`iterative`), the run directory, target mode, dropout rescaling, sensitivity
analysis, BatchNormalization statistics and the figures."""
