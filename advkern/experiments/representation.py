"""Where adversarial inputs go inside the network (seed 001's representation and activation
pictures).

1. Representation space. The last hidden layer (the input of the final layer, flattened: the
   mlp's second ReLU, 256 values; the cnn's third conv+ReLU, 64 x 6 x 6 = 2304 values) of
   the whole clean test split is reduced to two dimensions by PCA (centred, NumPy SVD) fitted
   on those clean test representations; correctly classified test '2's (``source``) and their
   targeted PGD adversarials toward ``target`` are projected into the same plane, an arrow
   from each clean image to its adversarial. Measured: the attack's success, and how often an
   adversarial's nearest class centroid (centroids: the clean test representations averaged
   per true class) is the target class, in the full hidden space and in the PCA plane.

2. Activation differences. Correctly classified test images are attacked with untargeted
   FGSM at an eps that leaves both successes and failures; for every layer that follows a
   conv / dense layer with its nonlinearity (and the logits) the relative change
   r_l = mean |a_l(x') - a_l(x)| / mean |a_l(x)| per image (layer 0: the input) is averaged
   over successful and over failed attacks, with the ratios r_l / r_(l-1) (does the
   perturbation grow through the layers?). For conv layers the maps max over channels
   |a(x') - a(x)| (after conv + ReLU) are drawn for successful and failed attacks side by
   side.

Hidden activations come from the NumPy reference forward (``reference.network.activations``);
the attacks run on the chosen backend.
"""

import numpy as np

from ..errors import AdvkernError, ShapeError
from ._common import Context, load_models
from .fooling import _label

NAME = "representation"
SUMMARY = ("representation space (PCA of the last hidden layer) of clean vs targeted "
           "adversarial inputs, and per-layer activation differences")
MODELS = ("mlp", "cnn")

QUICK = {"n_fit": 500, "source": 2, "target": 6, "n_source": 20,
         "pgd": {"eps": 0.3, "alpha": 0.01, "steps": 40},
         "maps_attack": "fgsm", "maps_eps": 0.1, "n_maps": 200, "n_show": 3}
FULL = {"n_fit": None, "source": 2, "target": 6, "n_source": None,
        "pgd": {"eps": 0.3, "alpha": 0.01, "steps": 40},
        "maps_attack": "fgsm", "maps_eps": 0.1, "n_maps": 1000, "n_show": 4}

_ACT = ("relu", "tanh", "sigmoid")


# -- the computations -----------------------------------------------------------------------


def _layer_outputs(model, x, batch=500):
    """reference activations of x in batches: list over layers of (N, *shape)."""
    from ..reference.network import activations

    outs = [activations(model, x[i:i + batch]) for i in range(0, len(x), batch)]
    return [np.concatenate(col) for col in zip(*outs)]


def hidden(model, x, batch=500):
    """The last hidden layer: the final layer's input, flattened. x (N, *input_shape) ->
    (N, F) in x's dtype. A model of one layer has no hidden layer (AdvkernError)."""
    if len(model.layers) < 2:
        raise AdvkernError("the model has a single layer: no hidden representation")
    return _layer_outputs(model, x, batch)[-2].reshape(len(x), -1)


def pca(h, k=2):
    """PCA of the rows of h (N, F), centred, by SVD (float64).

    Returns (mean (F,), components (k, F) orthonormal rows, variance (k,) along them,
    explained (k,) fraction of the total variance). Component signs: the entry of largest
    magnitude is positive (SVD's signs are arbitrary; this makes them reproducible).
    """
    h = np.asarray(h, dtype=np.float64)
    if h.ndim != 2:
        raise ShapeError(f"h must be (N, F), got shape {h.shape}")
    n, f = h.shape
    if n < 2 or not 1 <= k <= min(n, f):
        raise AdvkernError(f"pca needs N >= 2 rows and 1 <= k <= min(N, F), got N={n}, "
                           f"F={f}, k={k}")
    mean = h.mean(axis=0)
    _, s, vt = np.linalg.svd(h - mean, full_matrices=False)
    comps = vt[:k]
    flip = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps = comps * np.where(flip == 0, 1.0, flip)[:, None]
    var = s ** 2 / (n - 1)
    total = var.sum()
    return mean, comps, var[:k], var[:k] / total if total > 0 else np.zeros(k)


def nearest_centroid(h, centroids):
    """Index of the nearest centroid (Euclidean) per row: h (N, F), centroids (K, F) -> (N,)."""
    d = ((h[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
    return d.argmin(axis=1)


def tracked_layers(model):
    """(indices, names) of the layers whose outputs are compared: each nonlinearity that
    follows a conv / dense layer ('conv1+relu', 'dense2+relu', ...) and the logits."""
    idx, names, count = [], [], {}
    last = len(model.layers) - 1
    for i, layer in enumerate(model.layers):
        prev = model.layers[i - 1].type if i else None
        if layer.type in _ACT and prev in ("conv2d", "dense"):
            count[prev] = count.get(prev, 0) + 1
            idx.append(i)
            names.append(f"{'conv' if prev == 'conv2d' else 'dense'}{count[prev]}+{layer.type}")
    idx.append(last)
    names.append("logits")
    return idx, names


def layer_changes(model, x, x_adv):
    """Absolute and relative change per tracked layer, per image.

    Returns (names ['input', *tracked], d (N, 1 + L), r (N, 1 + L)) float64 with
    d[n, l] = mean |a_l(x'_n) - a_l(x_n)| (mean over the layer's values) and
    r[n, l] = d[n, l] / mean |a_l(x_n)| (0 where a_l(x_n) is all zero and nothing changed,
    inf where it is all zero and something changed).
    """
    idx, names = tracked_layers(model)
    a0, a1 = _layer_outputs(model, x), _layer_outputs(model, x_adv)
    n = len(x)
    pairs = [(x, x_adv)] + [(a0[i], a1[i]) for i in idx]
    d, r = [], []
    for u, v in pairs:
        num = np.abs(v.astype(np.float64) - u).reshape(n, -1).mean(axis=1)
        den = np.abs(u.astype(np.float64)).reshape(n, -1).mean(axis=1)
        d.append(num)
        r.append(np.where(den > 0, num / np.where(den > 0, den, 1.0),
                          np.where(num > 0, np.inf, 0.0)))
    return ["input"] + names, np.stack(d, axis=1), np.stack(r, axis=1)


def diff_maps(model, x, x_adv):
    """Per conv+nonlinearity layer, max over channels |a(x') - a(x)|.

    Returns (names, maps) with maps a list over those layers of (N, H_l, W_l) float64."""
    idx, names = tracked_layers(model)
    keep = [(i, nm) for i, nm in zip(idx, names) if nm.startswith("conv")]
    a0, a1 = _layer_outputs(model, x), _layer_outputs(model, x_adv)
    return [nm for _, nm in keep], \
        [np.abs(a1[i].astype(np.float64) - a0[i]).max(axis=1) for i, _ in keep]


# -- figures ----------------------------------------------------------------------------------


def pca_figure(z_test, y_test, z_clean, z_adv, ok, source, target, title, path):
    """Scatter of the clean test split in the PCA plane (colour per class, class numbers at
    the centroids), the source images (black) and their adversarials (blue, red where the
    attack failed) with arrows from clean to adversarial. Returns path."""
    from ..figures import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 5.6))
    cmap = plt.get_cmap("tab10")
    classes = np.unique(y_test)
    for c in classes:
        m = y_test == c
        ax.scatter(z_test[m, 0], z_test[m, 1], s=5, color=cmap(int(c) % 10), alpha=0.25,
                   linewidths=0)
        cx, cy = z_test[m].mean(axis=0)
        ax.text(cx, cy, str(c), fontsize=14, fontweight="bold", color=cmap(int(c) % 10),
                ha="center", va="center",
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.7, "lw": 0})
    for i in range(len(z_clean)):
        ax.annotate("", xy=z_adv[i], xytext=z_clean[i],
                    arrowprops={"arrowstyle": "->", "color": "0.4", "lw": 0.6})
    ax.scatter(z_clean[:, 0], z_clean[:, 1], s=60, marker=f"${source}$", color="black",
               label=f"clean '{source}'")
    col = np.where(ok, "tab:blue", "tab:red")
    ax.scatter(z_adv[:, 0], z_adv[:, 1], s=60, marker=f"${source}$", c=list(col),
               label=f"adversarial (target {target}; red: failed)")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def maps_figure(names, groups, title, path):
    """Activation-difference maps, successful and failed attacks side by side.

    groups: [(label, x_adv (n, C, H, W), preds (n,), maps list over layers of (n, h, w))]
    (two groups; a group may be empty). One colour scale per layer, shared by both groups.
    Returns path."""
    from ..figures import _image, _plt

    plt = _plt()
    n_rows = max(1, max(len(g[1]) for g in groups))
    n_l = len(names)
    vmax = [max([float(g[3][j].max()) for g in groups if len(g[1])] + [1e-12])
            for j in range(n_l)]
    fig, axes = plt.subplots(n_rows, len(groups) * (1 + n_l),
                             figsize=(1.35 * len(groups) * (1 + n_l) + 0.6, 1.45 * n_rows + 0.9),
                             squeeze=False)
    for gi, (label, xa, preds, maps) in enumerate(groups):
        c0 = gi * (1 + n_l)
        for r in range(n_rows):
            row = axes[r, c0:c0 + 1 + n_l]
            for a in row:
                a.set_xticks([])
                a.set_yticks([])
            if r >= len(xa):
                for a in row:
                    a.axis("off")
                continue
            row[0].imshow(_image(xa[r]), cmap="gray", vmin=0, vmax=1)
            row[0].set_title(f"{label}\npred {preds[r]}" if r == 0 else f"pred {preds[r]}",
                             fontsize=7)
            for j in range(n_l):
                row[1 + j].imshow(maps[j][r], cmap="inferno", vmin=0, vmax=vmax[j])
                if r == 0:
                    row[1 + j].set_title(f"{names[j]}\n(max {vmax[j]:.2g})", fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# -- the experiment ---------------------------------------------------------------------------


def _ratios(m):
    return [float(m[i] / m[i - 1]) if m[i - 1] > 0 else None for i in range(1, len(m))]


def _group_stats(names, d, r, mask):
    """Over the images in mask, per layer: the mean |difference| and the mean relative
    change, each with its layer-to-layer ratios (None where undefined)."""
    if not mask.any():
        return {"n": 0, "layers": names, "mean_abs_difference": None, "abs_ratio_to_previous":
                None, "relative_change": None, "relative_ratio_to_previous": None}
    md, mr = d[mask].mean(axis=0), r[mask].mean(axis=0)
    return {"n": int(mask.sum()), "layers": names,
            "mean_abs_difference": [float(v) for v in md], "abs_ratio_to_previous": _ratios(md),
            "relative_change": [float(v) for v in mr],
            "relative_ratio_to_previous": _ratios(mr)}


def _representation(ctx, name, model, cfg, x_test, y_test, pred_test):
    from ..attacks import run_attack

    src, tgt = cfg["source"], cfg["target"]
    # PCA and centroids from the first n_fit clean test images (None: all)
    fit = slice(None) if cfg["n_fit"] is None else slice(0, cfg["n_fit"])
    x_fit, y_fit = x_test[fit], y_test[fit]
    h_test = hidden(model, x_fit)
    mean, comps, _, explained = pca(h_test)
    z_test = (h_test - mean) @ comps.T
    classes = np.arange(model.num_classes)
    cent_full = np.stack([h_test[y_fit == c].mean(axis=0) for c in classes])
    cent_pca = np.stack([z_test[y_fit == c].mean(axis=0) for c in classes])
    idx = np.flatnonzero((y_test == src) & (pred_test == src))
    if cfg["n_source"] is not None:
        idx = idx[:cfg["n_source"]]
    if not idx.size:
        raise AdvkernError(f"{name}: no correctly classified test image of class {src}")
    ctx.stage(f"{name}: targeted PGD {src} -> {tgt} on {idx.size} images")
    run = run_attack(model, x_test[idx], y_test[idx], "pgd", targeted=True, target=tgt,
                     seed=ctx.seed, backend=ctx.backend, **cfg["pgd"])
    ok = run.info["success"].astype(bool)
    h_clean, h_adv = hidden(model, x_test[idx]), hidden(model, run.x_adv)
    z_clean, z_adv = (h_clean - mean) @ comps.T, (h_adv - mean) @ comps.T
    nc_full, nc_pca = nearest_centroid(h_adv, cent_full), nearest_centroid(z_adv, cent_pca)
    res = {
        "pca_fitted_on": f"last hidden layer of the first {len(x_fit)} clean test images "
                         f"(all classes; centroids: their per-class means)",
        "hidden_size": int(h_test.shape[1]),
        "explained_variance": [float(v) for v in explained],
        "n_source": int(idx.size),
        "attack": {"attack": "pgd", "targeted": True, "target": tgt, **cfg["pgd"]},
        "targeted_success": float(ok.mean()),
        "nearest_centroid_is_target_full": float((nc_full == tgt).mean()),
        "nearest_centroid_is_target_pca": float((nc_pca == tgt).mean()),
        "clean_nearest_centroid_is_source_full":
            float((nearest_centroid(h_clean, cent_full) == src).mean()),
        "clean_nearest_centroid_is_source_pca":
            float((nearest_centroid(z_clean, cent_pca) == src).mean()),
    }
    ctx.target(f"{name}: targeted adversarials nearest the target centroid",
               f"{res['nearest_centroid_is_target_full']:.0%} in the full hidden space, "
               f"{res['nearest_centroid_is_target_pca']:.0%} in the PCA plane "
               f"(attack success {res['targeted_success']:.0%})",
               "reported (seed: the '2's move to the target cluster)", None,
               full=res["nearest_centroid_is_target_full"],
               pca=res["nearest_centroid_is_target_pca"], success=res["targeted_success"])
    path = ctx.figure(f"pca_{_label(name)}")
    if path:
        pca_figure(z_test, y_fit, z_clean, z_adv, ok, src, tgt,
                   f"{name}: PCA of the last hidden layer (fitted on {len(x_fit)} clean test "
                   f"images; {100 * explained.sum():.0f}% of variance)\nclean '{src}'s and targeted "
                   f"PGD (eps {cfg['pgd']['eps']}) toward {tgt}", path)
    return res


def _activations(ctx, name, model, cfg, x_test, y_test, pred_test):
    from ..attacks import run_attack

    idx = np.flatnonzero(pred_test == y_test)[:cfg["n_maps"]]
    eps = cfg["maps_eps"]
    ctx.stage(f"{name}: {cfg['maps_attack']} eps {eps} on {idx.size} test images")
    run = run_attack(model, x_test[idx], y_test[idx], cfg["maps_attack"], eps=eps,
                     seed=ctx.seed, backend=ctx.backend)
    ok = run.info["success"].astype(bool)
    x, xa = x_test[idx], run.x_adv
    names, d, r = layer_changes(model, x, xa)
    res = {"attack": {"attack": cfg["maps_attack"], "eps": eps, "targeted": False},
           "n": int(idx.size), "success_rate": float(ok.mean()),
           "successful": _group_stats(names, d, r, ok),
           "failed": _group_stats(names, d, r, ~ok)}
    s, f = res["successful"], res["failed"]
    if s["n"] and f["n"]:
        # the last hidden layer (before the logits) against the input
        growth = {g: {"abs": st["mean_abs_difference"][-2] / st["mean_abs_difference"][0],
                      "relative": st["relative_change"][-2] / st["relative_change"][0]}
                  for g, st in (("successful", s), ("failed", f))}
        res["growth_input_to_last_hidden"] = growth
        gs, gf = growth["successful"], growth["failed"]
        ctx.target(f"{name}: change input -> {names[-2]} ({cfg['maps_attack']} eps {eps})",
                   f"mean |diff| x{gs['abs']:.2f} / x{gf['abs']:.2f}, relative change "
                   f"x{gs['relative']:.2f} / x{gf['relative']:.2f} (successful / failed, "
                   f"{s['n']} / {f['n']} images)",
                   "reported (seed: perturbations grow through the layers; in failures they "
                   "taper off)", None, successful=gs, failed=gf)
    map_names, maps = diff_maps(model, x, xa)
    if map_names:
        k = cfg["n_show"]
        si, fi = np.flatnonzero(ok)[:k], np.flatnonzero(~ok)[:k]
        pred_adv = run.info["pred_adv"]
        res["map_layers"] = map_names
        res["map_mean_max"] = {
            "successful": [float(m[ok].max(axis=(1, 2)).mean()) if ok.any() else None
                           for m in maps],
            "failed": [float(m[~ok].max(axis=(1, 2)).mean()) if (~ok).any() else None
                       for m in maps]}
        path = ctx.figure(f"activation_diff_{_label(name)}")
        if path:
            maps_figure(map_names,
                        [("successful", xa[si], pred_adv[si], [m[si] for m in maps]),
                         ("failed", xa[fi], pred_adv[fi], [m[fi] for m in maps])],
                        f"{name}: max over channels |a(x_adv) - a(x)| after each conv+ReLU "
                        f"({cfg['maps_attack']} eps {eps}, untargeted)", path)
    return res


def run(*, models=None, out=None, backend="auto", quick=False, seed=0, log=None):
    """The representation experiment (see the module docstring); returns the results dict."""
    from ..nets.datasets import load_mnist

    ctx = Context(NAME, SUMMARY, out, backend, quick, seed, log)
    nets = load_models(models, MODELS)
    cfg = dict(QUICK if ctx.quick else FULL)
    x_test, y_test = load_mnist("test")
    per_model = {}
    for name, model in nets.items():
        if tuple(model.input_shape) != tuple(x_test.shape[1:]):
            raise AdvkernError(f"{name}: input shape {model.input_shape} is not MNIST's "
                               f"{x_test.shape[1:]}")
        x = x_test.astype(model.dtype, copy=False)
        pred = model.predict(x)
        ctx.stage(f"{name}: PCA of the last hidden layer")
        per_model[name] = {
            "representation": _representation(ctx, name, model, cfg, x, y_test, pred),
            "activations": _activations(ctx, name, model, cfg, x, y_test, pred),
        }
        ctx.stage(f"{name}: done")
    return ctx.finish(config=cfg, models=per_model)
