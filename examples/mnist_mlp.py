"""Ten-digit MNIST with a 784-256-128-10 ReLU MLP and Adam (the bundled subset).

    python examples/mnist_mlp.py
"""

import fastnn as fn

(x, y), (x_test, y_test) = fn.datasets.load_mnist_small()   # 4,000 / 1,000 images

model = fn.Sequential([fn.Dense(256, "relu"), fn.Dense(128, "relu"), fn.Dense(10)],
                      input_dim=784, dtype="float32", seed=0)
model.compile(loss="softmax_cross_entropy", optimizer=fn.Adam(lr=1e-3))
model.summary()
history = model.fit(x, y, epochs=10, batch_size=32, validation_data=(x_test, y_test))

print("test:", model.evaluate(x_test, y_test))
probabilities = model.predict(x_test[:5])
print("predicted digits:", probabilities.argmax(axis=1), "true:", y_test[:5])

model.save("mnist_mlp.npz")
restored = fn.load_model("mnist_mlp.npz")
print("restored model, test accuracy:", restored.evaluate(x_test, y_test)["accuracy"])
