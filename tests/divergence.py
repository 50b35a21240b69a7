"""The divergence recipe shared by the tf_keras and Keras 3 tests (NumPy only)."""
import numpy as np
import pytest

import tf_stdprune


def assert_divergence_is_refused(model, sgd, step):
    """Fits ``model`` with ``sgd(1e6)`` on inputs x100 and targets 1e3 (it diverges) and
    asserts that the pruning at ``step`` raises NonFiniteError and that the report says
    the weights are not finite instead of calling them pruned."""
    model.compile(sgd(1e6), "mse")
    rng = np.random.default_rng(0)
    x, y = 100 * rng.normal(size=(16, 4)).astype("float32"), np.full((16, 2), 1e3, "float32")
    with pytest.raises(tf_stdprune.NonFiniteError, match=f"step {step}"):
        model.fit(x, y, batch_size=4, epochs=2, verbose=0,
                  callbacks=[tf_stdprune.UpdatePruningStep()])
    report = tf_stdprune.sparsity_report(model)
    assert report.zero_weights == 0 and not report.finite
    assert "not finite" in report.summary()
