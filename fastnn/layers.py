"""Layers for ``fastnn.Sequential``.

A layer describes its shape and activation; the model owns the numbers (its
weights and biases are views into the model's one flat parameter buffer).
"""

from . import _validate
from .kernels.reference import ACTIVATIONS

__all__ = ["Dense", "HE_ACTIVATIONS"]

#: Activations initialised with He's normal scheme (ReLU-like); the others
#: (identity, sigmoid, tanh) with Glorot's uniform scheme.
HE_ACTIVATIONS = ("relu", "leaky_relu", "gelu", "silu", "softplus")


class Dense:
    """A fully connected layer: ``y = act(x @ w + b)``.

    Parameters
    ----------
    units : int
        Output width (>= 1).
    activation : str or None
        One of identity (default; also None), relu, leaky_relu, sigmoid, tanh,
        gelu, silu, softplus. The last layer of a classifier stays identity:
        its output is the logits, and the loss applies softmax or sigmoid.
    name : str, optional

    Attributes
    ----------
    w : ndarray (input_dim, units)
        Weights, once the model is built (a view into the model's buffer);
        initialised ``N(0, 2/input_dim)`` (He) for ReLU-like activations, else
        ``U(-a, a)`` with ``a = sqrt(6/(input_dim + units))`` (Glorot).
    b : ndarray (units,)
        Biases, initialised to zero.
    """

    def __init__(self, units, activation="identity", name=None):
        self.units = _validate.integer("units", units, low=1)
        if activation is None:
            activation = "identity"
        if not isinstance(activation, str):
            raise TypeError(f"activation must be a name (str), got {type(activation).__name__}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of "
                             f"{', '.join(ACTIVATIONS)}")
        self.activation = activation
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        self.name = name
        self.input_dim = None
        self.w = None
        self.b = None
        self._model = None

    def __repr__(self):
        return f"Dense({self.units}, {self.activation!r})"

    @property
    def initializer(self):
        """``"he_normal"`` or ``"glorot_uniform"``."""
        return "he_normal" if self.activation in HE_ACTIVATIONS else "glorot_uniform"

    def param_count(self, input_dim):
        """``input_dim*units + units``."""
        return input_dim * self.units + self.units

    def init_weights(self, rng, w, b):
        """Fill host arrays ``w (input_dim, units)`` and ``b`` from ``rng``."""
        fan_in, fan_out = w.shape
        if self.initializer == "he_normal":
            rng.standard_normal(out=w, dtype=w.dtype)
            w *= (2.0 / fan_in) ** 0.5
        else:
            limit = (6.0 / (fan_in + fan_out)) ** 0.5
            rng.random(out=w, dtype=w.dtype)
            w *= 2 * limit
            w -= limit
        b[...] = 0

    def get_config(self):
        """The JSON-able description ``save`` stores."""
        return {"class_name": "Dense", "units": self.units, "activation": self.activation,
                "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(config["units"], config["activation"], name=config.get("name"))
