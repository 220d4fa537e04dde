"""Evaluation metrics for adversarial examples: success, accuracy, perturbation norms,
transfer between models (NumPy reference).

An attack on (x, y) succeeds on image n when the model's prediction on x_adv[n] differs
from y[n] (untargeted), or equals target[n] (targeted). Note that an untargeted "success"
includes images the model already got wrong before the attack; ``success_rate_on_correct``
counts only the images it got right.
"""

import numpy as np

from .._validate import check_labels
from ..errors import ShapeError
from .projections import flat

_NORMS = ("l0", "l1", "l2", "linf")


def _predict(model, x):
    # An empty batch has no predictions (and must not reach the layers' reshapes).
    return model.predict(x) if len(x) else np.zeros(0, dtype=np.int64)


def success_mask(model, x_adv, y, target=None):
    """Per-image success (N,) bool: pred(x_adv) != y, or pred(x_adv) == target if given.

    x_adv: (N, *input_shape) float32/64; y: (N,) int; target: None, one int, or (N,) int.
    """
    x_adv = model.check_input(x_adv, "x_adv")
    y = check_labels(y, len(x_adv), model.num_classes)
    return _success(_predict(model, x_adv), y, target, model.num_classes)


def _success(pred_adv, y, target, k):
    """success_mask's rule from the predictions pred_adv (N,) on x_adv."""
    if target is None:
        return pred_adv != y
    t = check_labels(np.broadcast_to(target, y.shape) if np.ndim(target) == 0 else target,
                     len(y), k, name="target")
    return pred_adv == t


def perturbation_norms(x, x_adv):
    """Per-image norms of delta = x_adv - x (computed in float64), each (N,) float64:
    l0 = #{i : |delta_i| > 0} (number of input features changed), l1, l2, linf."""
    d = (np.asarray(x_adv, dtype=np.float64) - np.asarray(x, dtype=np.float64))
    d = np.abs(flat(d))
    return {"l0": np.count_nonzero(d, axis=1).astype(np.float64), "l1": d.sum(axis=1),
            "l2": np.sqrt((d * d).sum(axis=1)), "linf": d.max(axis=1, initial=0.0)}


def _rate(mask):
    return float(np.mean(mask)) if mask.size else float("nan")


def evaluate(model, x, y, x_adv, target=None):
    """Summary of an attack's result on one model.

    x, x_adv: (N, *input_shape) float32/64 (same shape); y: (N,) int; target: None
    (untargeted) or one int / (N,) ints (targeted). Returns a dict:

    - ``n``: N;
    - ``clean_accuracy`` = mean(pred == y), ``adversarial_accuracy`` = mean(pred_adv == y);
    - ``success_rate``: mean(success) over all N images;
    - ``success_rate_on_correct``: mean(success) over images with pred == y (NaN if none);
    - per image (N,): ``pred``, ``pred_adv`` (int64), ``success`` (bool), ``l0``, ``l1``,
      ``l2``, ``linf`` (float64, of x_adv - x);
    - ``mean_l0``, ``median_l0``, ... ``mean_linf``, ``median_linf``: over the successful
      images only (NaN if none succeeded).

    Rates of an empty batch are NaN.
    """
    x = model.check_input(x, "x")
    x_adv = model.check_input(x_adv, "x_adv")
    if x_adv.shape != x.shape:
        raise ShapeError(f"x_adv must have the shape of x {x.shape}, got {x_adv.shape}")
    y = check_labels(y, len(x), model.num_classes)
    pred = _predict(model, x)
    pred_adv = _predict(model, x_adv)
    # success_mask's rule from pred_adv, not from a third forward pass
    success = _success(pred_adv, y, target, model.num_classes)
    return summarize(y, pred, pred_adv, success, perturbation_norms(x, x_adv))


def summarize(y, pred, pred_adv, success, norms):
    """``evaluate``'s dict from the per-image records: y, pred, pred_adv (N,) int, success
    (N,) bool, norms: {'l0', 'l1', 'l2', 'linf'} -> (N,) (counts or floats; taken as
    float64). Records gathered from slices of a set give exactly the whole set's summary
    (``advkern.distributed`` relies on it)."""
    y, pred, pred_adv = np.asarray(y), np.asarray(pred), np.asarray(pred_adv)
    success = np.asarray(success, dtype=bool)
    norms = {k: np.asarray(norms[k], dtype=np.float64) for k in _NORMS}
    correct = pred == y
    out = {"n": len(y), "clean_accuracy": _rate(correct),
           "adversarial_accuracy": _rate(pred_adv == y), "success_rate": _rate(success),
           "success_rate_on_correct": _rate(success[correct]), "pred": pred,
           "pred_adv": pred_adv, "success": success}
    out.update(norms)
    for k in _NORMS:
        v = norms[k][success]
        out[f"mean_{k}"] = float(np.mean(v)) if v.size else float("nan")
        out[f"median_{k}"] = float(np.median(v)) if v.size else float("nan")
    return out


def transfer(model_b, x_adv, y):
    """Accuracy of model_b on x_adv (N, *input_shape) crafted on another model, as a
    float (NaN for N = 0). Lower means the examples transfer better."""
    x_adv = model_b.check_input(x_adv, "x_adv")
    y = check_labels(y, len(x_adv), model_b.num_classes)
    return _rate(_predict(model_b, x_adv) == y)


def transfer_matrix(models, x, y, attack_fn):
    """Transfer accuracies between every pair of models.

    models: dict name -> model (all taking x); attack_fn(model, x, y) -> x_adv.
    Returns a nested dict M with M[source][target] = accuracy of models[target] on the
    examples attack_fn crafted on models[source] (the diagonal is white-box accuracy).
    One attack per source model.
    """
    out = {}
    for src, m_src in models.items():
        x_adv = attack_fn(m_src, x, y)
        out[src] = {dst: transfer(m_dst, x_adv, y) for dst, m_dst in models.items()}
    return out
