"""Exceptions raised by advkern.

Every error that bad user input can cause is an :class:`AdvkernError` (a ``ValueError``),
so the CLI can print one clear line for it and callers can catch one type.
"""


class AdvkernError(ValueError):
    """Bad input to advkern: the message names the problem."""


class ShapeError(AdvkernError):
    """An array or a layer stack has an incompatible shape."""


class ModelFileError(AdvkernError):
    """A model file is corrupt, truncated, pickled, or describes an unknown layer."""


class UnsupportedOpError(ModelFileError):
    """An ONNX graph uses an operator (or attribute) advkern cannot run."""
