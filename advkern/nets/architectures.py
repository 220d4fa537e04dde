"""The named architectures of the seeds, built with seeded initialisation.

- ``mlp``: Flatten -> Dense 256 -> ReLU -> Dense 256 -> ReLU -> Dense 10 (784 inputs).
- ``cnn``: Conv 16 3x3 stride 1 'same' -> ReLU -> Conv 32 3x3 stride 2 'valid' -> ReLU
  -> Conv 64 3x3 stride 2 'valid' -> ReLU -> Flatten -> Dense 10.
- ``logreg``: Flatten -> Dense K (multiclass softmax regression), or Dense 1 for
  ``num_classes=2`` (binary logistic regression, class 1 when the logit is > 0).

Every architecture takes MNIST-shaped NCHW images (N, 1, 28, 28) unless input_shape says
otherwise.
"""

from ..errors import AdvkernError
from .layers import Conv2D, Dense, Flatten, ReLU
from .model import Sequential

MNIST_SHAPE = (1, 28, 28)


def _mlp(k):
    return [Flatten(), Dense(256), ReLU(), Dense(256), ReLU(), Dense(k)]


def _cnn(k):
    return [Conv2D(16, 3, 1, "same"), ReLU(), Conv2D(32, 3, 2, "valid"), ReLU(),
            Conv2D(64, 3, 2, "valid"), ReLU(), Flatten(), Dense(k)]


def _logreg(k):
    return [Flatten(), Dense(1 if k == 2 else k)]


ARCHITECTURES = {"mlp": _mlp, "cnn": _cnn, "logreg": _logreg}


def build(name, seed=0, num_classes=10, input_shape=MNIST_SHAPE, dtype="float32"):
    """A freshly initialised model of a named architecture (He/Glorot, seeded)."""
    if name not in ARCHITECTURES:
        raise AdvkernError(f"unknown architecture {name!r}: use one of {sorted(ARCHITECTURES)}")
    if int(num_classes) != num_classes or num_classes < 2:
        raise AdvkernError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return Sequential(ARCHITECTURES[name](int(num_classes)), input_shape, name=name, seed=seed,
                      dtype=dtype)


# Training recipes that reach the accuracies on the bundled 4,000-image train split
# (Adam, cosine decay, batch 64): measured mlp 94.7% / cnn 95.9% test accuracy, seed 0.
RECIPES = {
    "mlp": {"epochs": 10, "lr": 2e-3, "batch_size": 64, "optimizer": "adam"},
    "cnn": {"epochs": 8, "lr": 2e-3, "batch_size": 64, "optimizer": "adam"},
    "logreg": {"epochs": 10, "lr": 1e-2, "batch_size": 64, "optimizer": "adam"},
}
