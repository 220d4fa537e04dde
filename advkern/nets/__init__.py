"""Models: layer specs, the Sequential model, named architectures, weight files, data, training."""

from .architectures import ARCHITECTURES, build
from .io import load, load_model, save
from .layers import RBF, Conv2D, Dense, Flatten, MaxPool2D, Maxout, ReLU, Sigmoid, Tanh
from .layers import Conv2DTranspose, Reshape
from .model import Sequential

__all__ = ["ARCHITECTURES", "build", "load", "load_model", "save", "Conv2D", "Dense", "Flatten",
           "MaxPool2D", "Maxout", "RBF", "ReLU", "Sigmoid", "Tanh", "Sequential"]
__all__ += ["Conv2DTranspose", "Reshape"]
