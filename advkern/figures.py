"""Pictures of attacks (matplotlib, drawn off-screen to PNG files).

- ``attack_grid``: up to 10 images as three rows, original / perturbation / adversarial, with
  the predicted class and its confidence over each image, one colour bar giving the
  perturbation's scale, and (for sparse attacks) the changed pixels circled;
- ``accuracy_curves``: accuracy versus eps for several (attack, model) pairs.
"""

import numpy as np

from .reference.losses import softmax


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _image(a):
    """(C, H, W) -> what imshow takes: (H, W) for one channel, (H, W, C) for three."""
    return a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))


def attack_grid(model, x, y, x_adv, title, path, mark_changed=False):
    """Save the original / perturbation / adversarial grid of (x, x_adv) (N <= 10 images of
    shape (C, H, W) in [0, 1]) to ``path``. Returns path."""
    plt = _plt()
    n = len(x)
    p0, p1 = softmax(model.logits(x)), softmax(model.logits(x_adv))
    d = x_adv.astype(np.float64) - x
    m = float(np.abs(d).max()) or 1.0
    fig, axes = plt.subplots(3, n, figsize=(1.25 * n + 1.6, 4.6), squeeze=False)
    pert = None
    for i in range(n):
        a0, a1, a2 = axes[0, i], axes[1, i], axes[2, i]
        a0.imshow(_image(x[i]), cmap="gray", vmin=0, vmax=1)
        a0.set_title(f"y={y[i]}\npred {p0[i].argmax()} ({100 * p0[i].max():.0f}%)",
                     fontsize=7)
        pert = a1.imshow(_image(d[i]) if d.shape[1] == 1 else _image(d[i]).mean(-1),
                         cmap="seismic", vmin=-m, vmax=m)
        a2.imshow(_image(x_adv[i]), cmap="gray", vmin=0, vmax=1)
        fooled = p1[i].argmax() != p0[i].argmax()
        a2.set_title(f"pred {p1[i].argmax()} ({100 * p1[i].max():.0f}%)", fontsize=7,
                     color="crimson" if fooled else "black")
        if mark_changed:
            rr, cc = np.nonzero(np.abs(d[i]).max(axis=0) > 0)
            a2.scatter(cc, rr, s=40, facecolors="none", edgecolors="red", linewidths=0.8)
        for a in (a0, a1, a2):
            a.set_xticks([])
            a.set_yticks([])
    for r, label in enumerate(("original", "perturbation", "adversarial")):
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    cb = fig.colorbar(pert, ax=axes[1, :].tolist(), fraction=0.02, pad=0.01)
    cb.set_label(f"x_adv - x (scale +-{m:.3g})", fontsize=7)
    cb.ax.tick_params(labelsize=6)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def accuracy_curves(curves, title, path):
    """curves: {label: (eps list, accuracies in [0, 1])}; saves one plot to path."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for label, (eps, acc) in curves.items():
        ax.plot(eps, 100 * np.asarray(acc), "o-", ms=3, label=label)
    ax.set_xlabel("eps (L-inf)")
    ax.set_ylabel("accuracy on adversarial inputs (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
