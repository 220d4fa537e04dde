"""Compare another implementation's adversarial examples with the reference's.

For each image: the largest absolute difference, the fraction of input features equal (within
``atol``), and — for the sign-step attacks (fgsm, bim, mifgsm, and pgd in L-inf without random
start) —
how many of the differing features are gradient-sign ties, features where sign(g) on the
replayed reference trajectory legitimately depends on rounding or convention (for mifgsm the
sign of the momentum, each variant accumulated from its own gradients). A feature is a
tie, in this order of classes:

- ``zero``: the float64 gradient is exactly 0 (sign(0) is a convention);
- ``saturated``: (float32 candidates) the image's softmax is saturated in float32 — the
  probability of the loss's class is within 64 float32 epsilons of 1, so float32 computes
  softmax - onehot from rounding noise and every sign of that image's gradient is noise;
- ``rounding``: (float32 candidates) the float64 gradient is within the error a float32
  computation can make on it: 4 times the error our own float32 pass makes (|g64| <=
  4 |g32 - g64|, or their signs differ), or 8 float32 epsilons times |d z_label / dx| (the
  softmax's p_label is rounded to a few epsilons in float32, and that absolute error on
  softmax - onehot reaches the gradient through the label's logit); another float32
  implementation, summing in another order, can land on either side of 0;
- ``near_zero``: |g| <= tie_rtol * max|g| over the image (the classic relative test).

A feature counts in the first class it falls in, on any step of the trajectory.
"""

import numpy as np

from .errors import AdvkernError, ShapeError
from .reference import network
from .reference.gradient_attacks import momentum_update
from .reference.projections import project


TIE_CLASSES = ("zero", "saturated", "rounding", "near_zero")
_EPS32 = float(np.finfo(np.float32).eps)


def _saturated(model, x64, labels, loss):
    """(N,) bool: float32 computes this image's loss gradient from rounding noise."""
    if loss != "ce":
        return np.zeros(len(x64), dtype=bool)
    from .reference.losses import log_softmax
    z = network.forward(model.astype(np.float64) if model.dtype != np.float64 else model,
                        x64)[0]
    logp = log_softmax(z)[np.arange(len(x64)), labels]
    # 1 - p_label < 64 eps32, computed as -expm1(logp) so it does not round to 0 itself
    return -np.expm1(logp) < 64 * _EPS32


def _label_row(m64, x64, labels):
    """|d z_label / dx| (N, D) in float64 (for one logit, |dz/dx|)."""
    z, caches = network.forward(m64, x64)
    seeds = np.zeros_like(z)
    if z.shape[1] == 1:
        seeds[:, 0] = 1
    else:
        seeds[np.arange(len(z)), labels] = 1
    row, _ = network.backward(m64, seeds, caches, need_params=False)
    return np.abs(row.reshape(len(z), -1))


def _tie_masks(model, x, y, attack, kw, tie_rtol, cand_dtype=np.float64):
    """{class: (N, D) bool} of features at a tie of sign(grad) on the reference trajectory
    (each feature in its first class), or None for attacks without sign steps."""
    targeted = bool(kw.get("targeted"))
    if attack not in ("fgsm", "bim", "pgd", "mifgsm"):
        return None
    if attack == "pgd" and (kw.get("random_start") or str(kw.get("norm") or "inf") != "inf"):
        return None
    from .attacks import attack_params, resolve_target
    from .reference.gradient_attacks import bim_defaults

    p = attack_params(attack, **{k: v for k, v in kw.items() if v is not None})
    labels = resolve_target(p["target"], y, model.num_classes) if targeted else y
    sign = -1.0 if targeted else 1.0
    loss = p.get("loss", "ce")
    eps = p["eps"]
    decay = None
    if attack == "fgsm":
        steps, alpha = 1, eps
    elif attack == "mifgsm":
        steps, decay = p["steps"], p.get("decay", 1.0)
        alpha = p.get("alpha") or eps / steps
    elif attack == "bim":
        d_alpha, d_steps = bim_defaults(eps)
        alpha, steps = p.get("alpha") or d_alpha, p.get("steps") or d_steps
    else:
        alpha, steps = p["alpha"], p["steps"]
    f32 = np.dtype(cand_dtype) == np.float32
    m64 = model.astype(np.float64) if model.dtype != np.float64 else model
    m32 = model.astype(np.float32) if model.dtype != np.float32 else model
    n, d = len(x), x[0].size
    found = {c: np.zeros((n, d), dtype=bool) for c in TIE_CLASSES}
    xa = x.copy()
    # MI-FGSM steps by the sign of its momentum: the ties are the momentum's, each of the
    # three (ours in x's dtype, float64, float32) accumulated from its own gradients
    mom = {k: np.zeros((n, d)) for k in ("g", "g64", "g32")} if decay is not None else None
    for _ in range(steps):
        _, g = network.loss_and_input_grad(model, xa, labels, loss)
        x64 = xa.astype(np.float64)
        _, g64 = network.loss_and_input_grad(m64, x64, labels, loss)
        g64 = g64.reshape(n, -1)
        if mom is not None:
            mom["g"] = momentum_update(sign * g.reshape(n, -1), mom["g"], decay)
            mom["g64"] = momentum_update(sign * g64, mom["g64"], decay)
            g = (sign * mom["g"]).reshape(g.shape).astype(g.dtype)
            g64 = sign * mom["g64"]
        gf = np.abs(g.reshape(n, -1))
        step = {"zero": g64 == 0, "near_zero": gf <= tie_rtol * gf.max(axis=1, keepdims=True)}
        if f32:
            _, g32 = network.loss_and_input_grad(m32, xa.astype(np.float32), labels, loss)
            g32 = g32.reshape(n, -1).astype(np.float64)
            if mom is not None:
                mom["g32"] = momentum_update(sign * g32, mom["g32"], decay)
                g32 = sign * mom["g32"]
            step["saturated"] = np.repeat(_saturated(model, x64, labels, loss)[:, None], d, 1)
            step["rounding"] = (np.abs(g64) <= 4 * np.abs(g32 - g64)) | \
                (np.sign(g32) != np.sign(g64))
            if loss == "ce" and mom is None:
                step["rounding"] |= np.abs(g64) <= 8 * _EPS32 * _label_row(m64, x64, labels)
        for c in step:
            found[c] |= step[c]
        xa = project(xa + sign * alpha * np.sign(g), x, eps, "inf", p.get("clip", (0.0, 1.0)))
    taken = np.zeros((n, d), dtype=bool)
    for c in TIE_CLASSES:               # each feature in its first class
        found[c] &= ~taken
        taken |= found[c]
    return found


def compare(model, x, y, ours, candidate, attack, kw, tie_rtol=1e-4, atol=1e-6):
    """Per-image and overall agreement of ``candidate`` (N, ...) with ``ours`` (an AttackRun)."""
    cand = np.asarray(candidate, dtype=np.float64)
    mine = np.asarray(ours.x_adv, dtype=np.float64)
    if cand.shape != mine.shape:
        raise ShapeError(f"candidate x_adv has shape {cand.shape}, ours {mine.shape}")
    if not np.isfinite(tie_rtol) or tie_rtol < 0:
        raise AdvkernError(f"tie_rtol must be finite and >= 0, got {tie_rtol!r}")
    n = len(cand)
    diff = np.abs(cand - mine).reshape(n, -1)
    # a NaN/Inf candidate pixel differs (NaN > atol would be False and call it equal)
    diff[~np.isfinite(diff)] = np.inf
    differ = diff > atol
    classes = _tie_masks(model, x, y, attack, kw, tie_rtol,
                         np.asarray(candidate).dtype if np.asarray(candidate).dtype.kind == "f"
                         else np.float64)
    ties = None if classes is None else np.any([classes[c] for c in TIE_CLASSES], axis=0)
    images = []
    for i in range(n):
        n_tie = int((differ[i] & ties[i]).sum()) if ties is not None else None
        images.append({"index": i, "max_abs_diff": float(diff[i].max(initial=0.0)),
                       "frac_equal": float(1 - differ[i].mean()) if diff[i].size else 1.0,
                       "n_diff": int(differ[i].sum()), "n_tie": n_tie})
    n_diff = int(differ.sum())
    explained = int((differ & ties).sum()) if ties is not None else None
    by_class = None if classes is None else \
        {c: int((differ & classes[c]).sum()) for c in TIE_CLASSES}
    summary = {"n": n, "images_identical": int((~differ.any(axis=1)).sum()),
               "ties_by_class": by_class,
               "max_abs_diff": float(diff.max(initial=0.0)),
               "frac_equal": float(1 - differ.mean()) if differ.size else 1.0,
               "n_diff": n_diff, "diff_explained_by_ties": explained,
               "agree": n_diff == 0 or (explained is not None and explained == n_diff)}
    return {"attack": attack, "images": images, "summary": summary}
