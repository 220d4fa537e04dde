"""Native weight files: one ``.npz`` holding the arrays and the architecture as JSON.

Layout of the archive (loaded with ``allow_pickle=False``; nothing in it is pickled):

- ``__advkern__``: a 0-d unicode array, the JSON of ``{"format": 1, "model": config}``
  where config is ``Sequential.config()`` (name, input_shape, layers);
- ``layer{i}.{name}``: the parameter ``name`` of layer ``i`` (e.g. ``layer1.w``), in the
  documented layouts: dense w (in, out), conv w (out_ch, in_ch, kh, kw), biases (out,).

PyTorch mapping: ``nn.Linear.weight.T`` -> dense ``w``; ``nn.Conv2d.weight`` -> conv ``w``
as is; biases as is; ``torch.flatten(x, 1)`` on NCHW is our C-order ``flatten``.
Save -> load is bit-exact (arrays are stored raw).
"""

import json
import os
import zipfile
import zlib

import numpy as np

from ..errors import AdvkernError, ModelFileError
from .model import Sequential

FORMAT = 1
_META = "__advkern__"


def save(model, path):
    """Write ``model`` to ``path`` (an .npz file, compressed). Returns the path."""
    arrays = {f"layer{i}.{k}": a for i, p in enumerate(model.params) for k, a in p.items()}
    meta = json.dumps({"format": FORMAT, "model": model.config()})
    # Through an open file: given a name, numpy would append '.npz' to names lacking it.
    with open(path, "wb") as f:
        np.savez_compressed(f, **{_META: np.array(meta)}, **arrays)
    return path


def _path(path):
    """A file path (str or os.PathLike), or ModelFileError: an int would be opened as a file
    descriptor, None or anything else fails deep in open()."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise ModelFileError(f"a model file path must be a str or os.PathLike, got "
                             f"{type(path).__name__} {path!r}")
    return path


def load(path):
    """Read a native .npz model file; any defect is a ModelFileError naming it."""
    path = _path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise ModelFileError(f"{path}: not an .npz (zip) model file")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = dict(z.items())
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise ModelFileError(f"{path}: not a readable .npz model file (corrupt or truncated: {e})") from None
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise ModelFileError(f"{path}: contains pickled objects; advkern never unpickles") from None
        raise ModelFileError(f"{path}: unreadable array ({e})") from None
    if _META not in files:
        raise ModelFileError(f"{path}: no '{_META}' entry: not an advkern model file")
    try:
        meta = json.loads(str(files.pop(_META)))
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: model description is not valid JSON ({e})") from None
    except RecursionError:
        raise ModelFileError(f"{path}: model description is nested too deeply to be a "
                             f"model") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
        raise ModelFileError(f"{path}: unsupported model file format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    cfg = meta["model"]
    layers = cfg.get("layers") if isinstance(cfg, dict) else None
    n = len(layers) if isinstance(layers, list) else 0
    params = [{} for _ in range(n)]
    for key, a in files.items():
        layer, _, name = key.partition(".")
        if not layer.startswith("layer") or not layer[5:].isdigit() or int(layer[5:]) >= n:
            raise ModelFileError(f"{path}: array {key!r} belongs to no layer of the model "
                                 f"description ({n} layer(s))")
        params[int(layer[5:])][name] = a
    try:
        return Sequential.from_config(cfg, params)
    except ModelFileError as e:
        raise ModelFileError(f"{path}: {e}") from None
    except AdvkernError as e:
        raise ModelFileError(f"{path}: {e}") from None


def load_model(path_or_model):
    """A model from a Sequential, a native .npz path or an .onnx path."""
    if isinstance(path_or_model, Sequential):
        return path_or_model
    path = os.fspath(_path(path_or_model))
    if path.lower().endswith(".onnx"):
        from .onnx_import import load_onnx
        return load_onnx(path)
    return load(path)
