"""Compare another implementation's adversarial examples with the reference's.

For each image: the largest absolute difference, the fraction of input features equal (within
``atol``), and — for the sign-step attacks (fgsm, bim, and pgd in L-inf without random start) —
how many of the differing features are gradient-sign ties: features where the reference
gradient at some step was within ``tie_rtol * max|g|`` of zero, so that sign(g) legitimately
depends on rounding (float32 vs float64, another summation order) or on the sign(0) convention.
"""

import numpy as np

from .errors import AdvkernError, ShapeError
from .reference import network
from .reference.projections import project


def _tie_masks(model, x, y, attack, kw, tie_rtol):
    """(N, D) bool: features at a near-tie of sign(grad) on the reference trajectory, or None."""
    targeted = bool(kw.get("targeted"))
    if attack not in ("fgsm", "bim", "pgd"):
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
    if attack == "fgsm":
        steps, alpha = 1, eps
    elif attack == "bim":
        d_alpha, d_steps = bim_defaults(eps)
        alpha, steps = p.get("alpha") or d_alpha, p.get("steps") or d_steps
    else:
        alpha, steps = p["alpha"], p["steps"]
    xa = x.copy()
    ties = np.zeros((len(x), x[0].size), dtype=bool)
    for _ in range(steps):
        _, g = network.loss_and_input_grad(model, xa, labels, loss)
        gf = np.abs(g.reshape(len(x), -1))
        ties |= gf <= tie_rtol * gf.max(axis=1, keepdims=True)
        xa = project(xa + sign * alpha * np.sign(g), x, eps, "inf", p.get("clip", (0.0, 1.0)))
    return ties


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
    ties = _tie_masks(model, x, y, attack, kw, tie_rtol)
    images = []
    for i in range(n):
        n_tie = int((differ[i] & ties[i]).sum()) if ties is not None else None
        images.append({"index": i, "max_abs_diff": float(diff[i].max(initial=0.0)),
                       "frac_equal": float(1 - differ[i].mean()) if diff[i].size else 1.0,
                       "n_diff": int(differ[i].sum()), "n_tie": n_tie})
    n_diff = int(differ.sum())
    explained = int((differ & ties).sum()) if ties is not None else None
    summary = {"n": n, "images_identical": int((~differ.any(axis=1)).sum()),
               "max_abs_diff": float(diff.max(initial=0.0)),
               "frac_equal": float(1 - differ.mean()) if differ.size else 1.0,
               "n_diff": n_diff, "diff_explained_by_ties": explained,
               "agree": n_diff == 0 or (explained is not None and explained == n_diff)}
    return {"attack": attack, "images": images, "summary": summary}
