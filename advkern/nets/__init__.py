"""Models: layer specs, the Sequential model, named architectures, weight files, data, training."""

from .architectures import ARCHITECTURES, build
from .io import load, load_model, save
from .layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sigmoid, Tanh
from .model import Sequential

__all__ = ["ARCHITECTURES", "build", "load", "load_model", "save", "Conv2D", "Dense", "Flatten",
           "MaxPool2D", "ReLU", "Sigmoid", "Tanh", "Sequential"]
