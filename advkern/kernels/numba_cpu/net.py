"""The numba_cpu backend's form of a model: weights cast to the attack dtype, C-contiguous."""

import numpy as np


class Net:
    """A Sequential prepared for the numba_cpu kernels (read-only).

    model: the Sequential cast to ``dtype``; layers: its specs; params[i]: layer i's arrays
    (C-contiguous, dtype); shapes[i]: layer i's input shape (shapes[-1] = (K,));
    pads[i]: (top, bottom, left, right) for conv layers, None otherwise.
    """

    def __init__(self, model, dtype):
        dtype = np.dtype(dtype)
        self.model = model.astype(dtype) if model.dtype != dtype else model
        self.dtype = dtype
        self.layers = self.model.layers
        self.params = [{k: np.ascontiguousarray(a) for k, a in p.items()}
                       for p in self.model.params]
        self.shapes = self.model.shapes
        self.input_shape = self.model.input_shape
        self.num_logits = self.model.num_logits
        self.num_classes = self.model.num_classes
        self.pads = [layer.pads(self.shapes[i]) if layer.type == "conv2d" else None
                     for i, layer in enumerate(self.layers)]
