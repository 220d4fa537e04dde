"""The pure-NumPy reference: the executable specification every backend is tested against."""

from . import layers, losses, network
from .losses import cross_entropy, log_softmax, margin, predict, softmax
from .network import backward, forward, jacobian, loss_and_input_grad, loss_and_param_grads

__all__ = ["layers", "losses", "network", "cross_entropy", "log_softmax", "margin", "predict",
           "softmax", "backward", "forward", "jacobian", "loss_and_input_grad",
           "loss_and_param_grads"]
