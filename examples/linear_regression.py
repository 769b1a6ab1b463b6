"""Linear regression by gradient descent: one Dense layer, MSE, plain SGD,
recovering the weights of a generated problem.

    python examples/linear_regression.py
"""

import numpy as np

import fastnn as fn

rng = np.random.default_rng(0)
w_true = rng.normal(size=(5, 1))
b_true = np.array([0.7])
x = rng.normal(size=(1000, 5))
y = x @ w_true + b_true + 0.01 * rng.normal(size=(1000, 1))   # a little noise

model = fn.Sequential([fn.Dense(1)], input_dim=5, dtype="float64", seed=0)
model.compile(loss="mse", optimizer=fn.SGD(lr=0.05))
history = model.fit(x, y, epochs=20, batch_size=50, verbose=0)

w, b = model.get_weights()
print("loss per epoch:", " ".join(f"{v:.5f}" for v in history.history["loss"][::4]))
print("true weights:     ", w_true.ravel().round(3), "bias", b_true)
print("recovered weights:", w.ravel().round(3), "bias", b.round(3))
assert np.allclose(w, w_true, atol=0.01) and np.allclose(b, b_true, atol=0.01)
