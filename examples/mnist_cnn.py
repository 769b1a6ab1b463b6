"""Ten-digit MNIST with convolutional networks, written as Keras writes them.

The network of seed text 003 (one convolution, then a dense softmax layer) and
Keras' "simple MNIST convnet" (two convolutions with max pooling, dropout),
both on the bundled 5,000-image subset as (28, 28, 1) images.

    python examples/mnist_cnn.py            # Keras' convnet
    python examples/mnist_cnn.py seed       # seed 003's network
"""

import sys

import fastnn as fn

(x, y), (x_test, y_test) = fn.datasets.load_mnist_small(shape="image")   # (n, 28, 28, 1)

if sys.argv[1:] == ["seed"]:
    model = fn.Sequential([
        fn.Conv2D(32, (3, 3), activation="relu", input_shape=(28, 28, 1)),
        fn.Flatten(),
        fn.Dense(10, activation="softmax"),
    ], seed=0)
else:
    model = fn.Sequential([
        fn.Conv2D(32, kernel_size=(3, 3), activation="relu", input_shape=(28, 28, 1)),
        fn.MaxPooling2D(pool_size=(2, 2)),
        fn.Conv2D(64, kernel_size=(3, 3), activation="relu"),
        fn.MaxPooling2D(pool_size=(2, 2)),
        fn.Flatten(),
        fn.Dropout(0.5),
        fn.Dense(10, activation="softmax"),
    ], seed=0)

# the softmax of the last layer belongs to the loss: computed once, fused with it
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
model.summary()
model.fit(x, y, epochs=10, batch_size=128, validation_data=(x_test, y_test))

print("test:", model.evaluate(x_test, y_test))
print("predicted digits:", model.predict(x_test[:5]).argmax(axis=1), "true:", y_test[:5])
model.save("mnist_cnn.npz")
print("restored:", fn.load_model("mnist_cnn.npz").evaluate(x_test, y_test))
