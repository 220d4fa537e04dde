"""Input checks shared by the reference and the public API (one place, one wording)."""

import numbers

import numpy as np

from .errors import AdvkernError, ShapeError

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_float_array(x, name="x", ndim=None, finite=True):
    """Return ``x`` as a float32/float64 ndarray (no copy), or raise naming the problem.

    Plain data in any form (lists, read-only, non-contiguous or memory-mapped arrays, a
    masked array with nothing masked) is accepted; a masked array with masked entries is
    not (its hidden values would be used), nor is anything that is not numeric data.
    """
    if isinstance(x, np.ma.MaskedArray):
        masked = int(np.ma.count_masked(x))
        if masked:
            raise AdvkernError(f"{name} is a masked array with {masked} masked value(s): pass "
                               f"plain data (e.g. {name}.filled(value))")
        x = np.ma.getdata(x)
    if x is None or isinstance(x, (str, bytes, dict)):
        raise AdvkernError(f"{name} must be a float32 or float64 array, got "
                           f"{type(x).__name__}")
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except (TypeError, ValueError) as e:
            raise AdvkernError(f"{name} must be a float32 or float64 array ({e})") from None
    if x.dtype not in FLOAT_DTYPES:
        raise AdvkernError(f"{name} must be float32 or float64, got dtype {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ShapeError(f"{name} must be {ndim}-D, got shape {x.shape}")
    if finite and not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise AdvkernError(f"{name} contains {bad} NaN/Inf value(s)")
    return x


def check_labels(y, n, num_classes, name="y"):
    """Return integer labels of shape (n,) in [0, num_classes), or raise.

    A binary model (one logit) has num_classes == 2. Whole-number floats are accepted
    (5.0 is 5); a fractional value (4.7) is an error, never truncated.
    """
    if isinstance(y, np.ma.MaskedArray):
        if np.ma.count_masked(y):
            raise AdvkernError(f"{name} is a masked array with masked entries: pass plain labels")
        y = np.ma.getdata(y)
    try:
        y = np.asarray(y)
    except (TypeError, ValueError) as e:
        raise AdvkernError(f"{name} must hold integer class labels ({e})") from None
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise AdvkernError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    if y.shape != (n,):
        raise ShapeError(f"{name} must have shape ({n},), got {y.shape}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise AdvkernError(
            f"{name} out of range: labels must be in [0, {num_classes - 1}], "
            f"got min {y.min()} max {y.max()}")
    return y.astype(np.int64, copy=False)


def check_positive(value, name, allow_zero=False):
    """Return ``value`` as a float, or raise if not finite and > 0 (>= 0 with allow_zero)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise AdvkernError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        op = ">= 0" if allow_zero else "> 0"
        raise AdvkernError(f"{name} must be finite and {op}, got {value!r}")
    return v


def check_int(value, name, minimum=1):
    """Return ``value`` as an int >= minimum, or raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise AdvkernError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise AdvkernError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_model(model):
    """The model itself, or raise when it is not one (None, a path, a dict, ...)."""
    if not (callable(getattr(model, "check_input", None)) and hasattr(model, "layers")):
        hint = " (load a file with advkern.load(path) or advkern.load_model(path))" \
            if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__") else ""
        raise AdvkernError(f"model must be an advkern model (advkern.Sequential), got "
                           f"{type(model).__name__}{hint}")
    return model


def check_box(clip):
    """(lo, hi) with lo < hi, both finite, or raise. A string is not a pair ("01" would
    otherwise read as (0, 1))."""
    if isinstance(clip, (str, bytes)):
        raise AdvkernError(f"clip must be a pair (lo, hi), got {clip!r}")
    try:
        lo, hi = (float(v) for v in clip)
    except (TypeError, ValueError):
        raise AdvkernError(f"clip must be a pair (lo, hi), got {clip!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo >= hi:
        raise AdvkernError(f"clip bounds must be finite with lo < hi, got lo={lo} hi={hi}")
    return lo, hi


def check_batch(model, x, y, clip=(0.0, 1.0), name="x"):
    """Validate an attack's inputs; return (x, y, (lo, hi)).

    x: (N, *model.input_shape) float32/float64, finite, inside [lo, hi];
    y: (N,) integer labels in [0, model.num_classes). Nothing is copied or modified.
    """
    check_model(model)
    x = model.check_input(x, name)
    lo, hi = check_box(clip)
    if x.size and (x.min() < lo or x.max() > hi):
        raise AdvkernError(f"{name} outside the valid box [{lo}, {hi}]: "
                           f"min {x.min():.6g}, max {x.max():.6g}")
    y = check_labels(y, len(x), model.num_classes)
    return x, y, (lo, hi)


def check_targets(target, y, num_classes):
    """Targets (N,) for a targeted attack: required, in range, and != the true label."""
    if target is None:
        raise AdvkernError("a targeted attack needs target labels (target=...)")
    t = check_labels(np.broadcast_to(np.asarray(target), y.shape) if np.ndim(target) == 0
                     else target, len(y), num_classes, name="target")
    same = np.flatnonzero(t == y)
    if same.size:
        raise AdvkernError(f"target equals the true label for {same.size} image(s) "
                           f"(first at index {same[0]})")
    return t


def per_sample_rngs(seed, n):
    """One independent generator per image, so a batch's result equals each image's own.

    seed: an int s (image i draws from default_rng([s, i])), a sequence of n ints
    (image i draws from default_rng(seed[i])), or an (n, 2) int array of pairs (image i
    draws from default_rng(list(seed[i]))). A per-sample run of image i therefore
    reproduces the batch run with seed=[seed_i], and a slice x[a:b] of a batch attacked
    with int seed s reproduces it with seed=[[s, a], ..., [s, b - 1]].
    """
    return [np.random.default_rng(e) for e in seed_entropy(seed, n)]


def seed_entropy(seed, n):
    """The validated per-image seeds of ``per_sample_rngs`` (ints or pairs), without building
    the generators (which costs ~20 us each: skip it when no randomness is drawn)."""
    if np.ndim(seed) == 0:
        s = check_int(int(seed) if isinstance(seed, (np.integer,)) else seed, "seed", minimum=0)
        if s >= 2 ** 63:
            raise AdvkernError(f"seed must be < 2**63 (it is stored as int64), got {s}")
        return [[s, i] for i in range(n)]
    seeds = np.asarray(seed)
    if seeds.ndim == 2 and seeds.shape == (n, 2) and seeds.dtype.kind in "iu" and \
            (n == 0 or seeds.min() >= 0):
        return [[int(a), int(b)] for a, b in seeds]
    if seeds.shape != (n,) or seeds.dtype.kind not in "iu" or (n and seeds.min() < 0):
        raise AdvkernError(f"seed must be a non-negative int or {n} non-negative ints, "
                           f"got shape {seeds.shape} dtype {seeds.dtype}")
    return [int(s) for s in seeds]
