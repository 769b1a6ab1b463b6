"""Binary MNIST: digit 0 against the rest, one sigmoid output and binary
cross-entropy, trained with SGD and momentum.

    python examples/binary_mnist.py
"""

import numpy as np

import fastnn as fn

(x, y), (x_test, y_test) = fn.datasets.load_mnist_small()
t, t_test = (y == 0).astype(np.float32), (y_test == 0).astype(np.float32)   # 1 for a zero

model = fn.Sequential([fn.Dense(64, "sigmoid"), fn.Dense(1)], input_dim=784, seed=0)
model.compile(loss="sigmoid_binary_cross_entropy", optimizer=fn.SGD(lr=0.1, momentum=0.9))
model.fit(x, t, epochs=5, batch_size=32, validation_data=(x_test, t_test), verbose=2)

p = model.predict(x_test)[:, 0]        # probability that the image is a zero
print(f"test accuracy {np.mean((p > 0.5) == (t_test > 0.5)):.4f}, "
      f"{int(t_test.sum())} zeros among {len(t_test)} test images")
