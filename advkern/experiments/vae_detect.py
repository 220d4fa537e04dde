"""vae-detect: detecting adversarial inputs by the classifier's disagreement with a VAE's
reconstruction (seed 001), and the adaptive attack that knows the detector.

Score (``advkern.reference.vae``): S(x) = KL(p(x) || p(r(x))) = sum_k p_k(x) (log p_k(x) -
log p_k(r(x))), p = the classifier's softmax, r(x) = sigmoid(decoder(mu(x))) the VAE's mean
image at the posterior mean (in (0, 1), so the seed's clip to the box changes nothing).
High S = suspicious. A second detector reads the seed literally ("the KL divergence between
the adversarial input and its generated output"): S_img(x) = KL(P_x || P_r(x)), each image
taken as a distribution over its pixels (``reference.vae``, score 'image'). Both are
reported side by side (``detectors`` / ``detectors_image``, ``adaptive`` /
``adaptive_image``), each with the issue's AUC targets.

Sets: negatives are the clean test images (all of them, misclassified ones included: a
deployed detector sees those too); positives of an attack are its adversarials of images
the classifier got right that are now misclassified (JSMA: that reach the target class), i.e.
the adversarials that matter; the AUC over every adversarial input (failed ones included)
is reported beside it. The 5%-FPR threshold is the clean score at the 95th percentile (the
smallest clean score with at most 5% of clean scores above it).

Adaptive attack (the seed's caveat), against each score: L-inf PGD from x on
J(x) = CE(f(x), y) - lam * S(x)
with sign steps, projected to the eps-ball and the box; gradients by the reference backward
passes of the classifier (twice) and of the VAE's decoder and encoder mean. Per image the
attacker keeps the misclassified iterate with the lowest score (the final iterate when none
is misclassified): an attacker who knows the detector also knows which iterate hides best.
The quick form runs it against the first model only.

For comparison (not the detector under test), each attack's AUC of the reconstruction
error ||x - r(x)||^2 / D (MagNet's score) is reported as ``auc_reconstruction_error``.
The attacks run on the Context's backend (``run_attack``); the VAE, the scores and the
adaptive attack run on the NumPy reference.
"""

import time

import numpy as np

NAME = "vae-detect"
SUMMARY = ("VAE reconstruction-mismatch detector (KL between softmax(f(x)) and "
           "softmax(f(r(x)))): ROC AUC per attack, thresholds, and the adaptive attack")
MODELS = ("mlp", "cnn")

# attack -> (run_attack parameters full, quick)
ATTACKS = {
    "fgsm": ({"eps": 0.1}, {"eps": 0.1}),
    "pgd": ({"eps": 0.3, "alpha": 0.01, "steps": 40}, {"eps": 0.3, "alpha": 0.01, "steps": 40}),
    "jsma": ({"theta": 1.0, "gamma": 0.1, "target": "next"},
             {"theta": 1.0, "gamma": 0.1, "target": "next"}),
    "pixel": ({"pixels": 3, "popsize": 200, "generations": 50},
              {"pixels": 3, "popsize": 100, "generations": 20}),
}
# images: clean negatives, and attacked per attack (full, quick)
SIZES = {
    "clean": (1000, 300), "fgsm": (1000, 300), "pgd": (1000, 300), "jsma": (200, 40),
    "pixel": (100, 40), "adaptive": (100, 50),
}
# detectors (VAE kinds, ``nets.vae``): the full form uses the seed's conv VAE (latent 2) and
# the dense one (latent 16); the quick form the dense one only, trained 10 epochs instead of
# 20 (``nets.vae.QUICK_RECIPES``): the conv VAE's training alone takes minutes on two cores.
DETECTORS_FULL = ("conv", "dense")
DETECTORS_QUICK = ("dense",)
# adaptive attack's lambda values (full, quick)
LAMBDAS = ((0.0, 0.1, 0.3, 1.0, 3.0), (0.0, 0.3, 1.0))
# adaptive PGD (full, quick); the quick form attacks only the first model
ADAPTIVE = ({"eps": 0.3, "alpha": 0.01, "steps": 40}, {"eps": 0.3, "alpha": 0.025, "steps": 20})
SEED_THRESHOLD = 0.3
# the adaptive attack's lambda values against the image score (full, quick): S_img is about
# 0.3-1.5 on these images, CE up to ~20 nats, so larger multipliers than LAMBDAS
LAMBDAS_IMAGE = ((0.0, 1.0, 3.0, 10.0, 30.0), (0.0, 3.0, 10.0))
# score -> (results key of its detectors, of its adaptive attack, figure name suffix)
SCORE_KEYS = {"classifier": ("detectors", "adaptive", ""),
              "image": ("detectors_image", "adaptive_image", "_image")}
SCORE_LABELS = {"classifier": "KL(softmax f(x) || softmax f(r(x)))",
                "image": "KL(P_x || P_r(x)), each image a distribution over its pixels"}
SCORE_AXES = {"classifier": "KL(p(x) || p(r(x))) (log scale)",
              "image": "KL(P_x || P_r(x)) over pixels (log scale)"}


# ----------------------------------------------------------------------------- statistics


def roc_auc(neg, pos):
    """Area under the ROC curve of scores (higher = positive), rank-based (Mann-Whitney U):
    AUC = P(s_pos > s_neg) + P(s_pos = s_neg) / 2, ties given their average rank.

    neg: (M,), pos: (P,) finite scores -> float in [0, 1] (nan when a set is empty).
    O((M + P) log(M + P)).
    """
    neg, pos = np.asarray(neg, np.float64).ravel(), np.asarray(pos, np.float64).ravel()
    m, p = len(neg), len(pos)
    if m == 0 or p == 0:
        return float("nan")
    s = np.concatenate([neg, pos])
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    # average 1-based rank of each run of equal values
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    ends = np.r_[starts[1:], len(ss)]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[m:].sum() - p * (p + 1) / 2.0
    return float(u / (m * p))


def threshold_at_fpr(neg, fpr=0.05):
    """The smallest clean score t with mean(neg > t) <= fpr."""
    s = np.sort(np.asarray(neg, np.float64))
    k = int(np.ceil((1 - fpr) * len(s))) - 1
    return float(s[min(max(k, 0), len(s) - 1)])


def rates(neg, pos, t):
    """(detection rate mean(pos > t), false-positive rate mean(neg > t))."""
    det = float(np.mean(np.asarray(pos) > t)) if len(pos) else float("nan")
    return det, float(np.mean(np.asarray(neg) > t))


# ----------------------------------------------------------------------------- adaptive attack


def adaptive_pgd(classifier, vae, x, y, lam, eps=0.3, alpha=0.01, steps=40, clip=(0.0, 1.0),
                 batch_size=100, score="classifier"):
    """L-inf PGD on CE(f(x), y) - lam * S(x) (module docstring), S the detector's score
    ('classifier' or 'image'). x: (N, *image) in the box, y: (N,). Returns (x_adv
    (N, *image), score (N,) of x_adv, misclassified (N,) bool)."""
    from ..reference.losses import predict
    from ..reference.vae import detection_score, detection_score_grad

    outs = []
    for s in range(0, len(x), batch_size):
        x0, yb = x[s: s + batch_size], y[s: s + batch_size]
        xa = x0.copy()
        best = x0.copy()
        best_s = np.full(len(x0), np.inf)
        # step t evaluates the iterate x_t (t = 0: x itself) and moves to x_{t+1}; the
        # last pass only scores x_steps
        for t in range(steps + 1):
            _, sc, g, z = detection_score_grad(classifier, vae, xa, yb, lam,
                                               return_logits=True, score=score)
            take = (predict(z) != yb) & (sc < best_s)
            best[take], best_s[take] = xa[take], sc[take]
            if t == steps:
                break
            xa = np.clip(np.clip(xa + alpha * np.sign(g), x0 - eps, x0 + eps), *clip)
            xa = xa.astype(x.dtype, copy=False)
        never = ~np.isfinite(best_s)
        best[never] = xa[never]
        outs.append(best)
    x_adv = np.concatenate(outs)
    wrong = classifier.predict(x_adv) != y
    return x_adv, detection_score(classifier, vae, x_adv, score=score), wrong


# ----------------------------------------------------------------------------- figures


def histogram_figure(name, clean, attack_scores, thresholds, path,
                     xlabel="KL(p(x) || p(r(x))) (log scale)"):
    """Score histograms, clean against each attack (one panel per attack). attack_scores:
    {label: scores of successful adversarials}; thresholds: {label: value} drawn as lines."""
    from ..figures import _plt
    plt = _plt()
    k = len(attack_scores)
    fig, axes = plt.subplots(1, k, figsize=(3.4 * k, 3.0), squeeze=False)
    hi = max([float(np.max(clean))] + [float(np.max(v)) for v in attack_scores.values()
                                       if len(v)] + [1.0])
    # Log-spaced bins: clean scores sit near 0 and adversarial ones spread over decades;
    # scores below LO (an exact match, S = 0 included) go to the first bin.
    lo = 1e-4
    bins = np.logspace(np.log10(lo), np.log10(hi), 40)
    for ax, (label, sc) in zip(axes[0], attack_scores.items()):
        ax.hist(np.maximum(clean, lo), bins=bins, alpha=0.6, label=f"clean (n={len(clean)})")
        if len(sc):
            ax.hist(np.maximum(sc, lo), bins=bins, alpha=0.6, label=f"{label} (n={len(sc)})")
        ax.set_xscale("log")
        for tl, tv in thresholds.items():
            ax.axvline(tv, ls="--" if tl == "0.3" else ":", c="k", lw=0.8,
                       label=f"threshold {tl} ({tv:.3g})")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("images", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def reconstruction_figure(rows, path):
    """rows: [(label, images (n, 1, H, W))]: one row of images per label."""
    from ..figures import _plt
    plt = _plt()
    n = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n, 1.2 * len(rows)), squeeze=False)
    for i, (label, imgs) in enumerate(rows):
        for j in range(n):
            ax = axes[i, j]
            ax.axis("off")
            if j < len(imgs):
                ax.imshow(imgs[j, 0], cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_title(label, fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- run


def _recon_error(vae, x):
    """Mean squared pixel error ||x - r(x)||^2 / D per image: MagNet's reconstruction error,
    reported beside the seed's score for comparison (not the detector under test)."""
    from ..reference.vae import reconstruct
    d = (x - reconstruct(vae, x)).reshape(len(x), -1)
    return np.mean(d * d, axis=1)


def _label(name):
    """A model's name in keys and file names: the architecture, or the file's stem."""
    import os
    import re
    stem = os.path.splitext(os.path.basename(os.fspath(name)))[0]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem) or "model"


def _positives(run, y, attack):
    info = run.info
    if attack == "jsma":
        return (info["pred"] == y) & info["success"]
    return (info["pred"] == y) & (info["pred_adv"] != y)


def _detector(ctx, key, score, model, vae, x, y, pred, xr, advs, clean_mse=None):
    """One detector's statistics (score 'classifier' or 'image') on the clean images x and
    each attack's adversarials; returns (dict, {attack: positives' scores}, 5%-FPR
    threshold, clean scores (for the histogram)). clean_mse: also report the reconstruction
    error's AUC."""
    from ..reference.vae import detection_score
    clean = detection_score(model, vae, x, score=score)
    t5 = threshold_at_fpr(clean, 0.05)
    det = {"score": SCORE_LABELS[score], "clean_accuracy": float(np.mean(pred == y)),
           "reconstruction_accuracy": float(np.mean(model.predict(xr) == y)),
           "reconstruction_agreement": float(np.mean(model.predict(xr) == pred)),
           "clean_score_median": float(np.median(clean)),
           "clean_score_p95": t5, "threshold_5fpr": t5,
           "fpr_at_0.3": rates(clean, [], SEED_THRESHOLD)[1], "attacks": {}}
    hist = {}
    for attack, (xa, pos) in advs.items():
        sa = detection_score(model, vae, xa, score=score)
        sp = sa[pos]
        hist[attack] = sp
        d03, f03 = rates(clean, sp, SEED_THRESHOLD)
        d5, f5 = rates(clean, sp, t5)
        a = {"auc": roc_auc(clean, sp), "auc_all_adversarials": roc_auc(clean, sa),
             "n_positives": int(len(sp)),
             "median_score": float(np.median(sp)) if len(sp) else None,
             "detection_at_0.3": d03, "fpr_at_0.3": f03,
             "detection_at_5fpr": d5, "fpr_at_5fpr": f5}
        if clean_mse is not None:
            a["auc_reconstruction_error"] = roc_auc(clean_mse, _recon_error(vae, xa)[pos])
        det["attacks"][attack] = a
        ctx.log(f"  {key} {attack}, {score} score: AUC {a['auc']:.3f} (all adversarials "
                f"{a['auc_all_adversarials']:.3f}, n={len(sp)}), detection {d03:.1%} / FPR "
                f"{f03:.1%} at 0.3, {d5:.1%} / {f5:.1%} at {t5:.3g}")
    return det, hist, t5, clean


def run(*, models=None, out=None, backend="auto", quick=False, seed=0, log=None,
        detectors=None, sizes=None, vaes=None, lambdas=None):
    """Run the experiment (see the module docstring); returns the results dict.

    Beyond the framework's arguments: detectors, a sequence of VAE kinds ('conv', 'dense';
    None: both, or 'dense' in the quick form); vaes, {kind: VAE} to use instead of the
    cached pretrained ones (tests); sizes, {set: images} overriding ``SIZES``; lambdas, the
    adaptive attack's lam values.
    """
    from ..attacks import run_attack
    from ..nets.datasets import load_mnist
    from ..nets.vae import QUICK_RECIPES, pretrained_vae
    from ..reference.vae import reconstruct
    from ._common import Context, load_models

    ctx = Context(NAME, SUMMARY, out, backend, quick, seed, log)
    q = 1 if ctx.quick else 0
    sz = {k: v[q] for k, v in SIZES.items()}
    sz.update(sizes or {})
    kinds = tuple(detectors or (DETECTORS_QUICK if ctx.quick else DETECTORS_FULL))
    lams = tuple(LAMBDAS[q] if lambdas is None else lambdas)
    lams_img = tuple(LAMBDAS_IMAGE[q] if lambdas is None else lambdas)
    nets = load_models(models, MODELS)
    xt, yt = load_mnist("test")
    n_clean = min(sz["clean"], len(xt))
    x, y = xt[:n_clean], yt[:n_clean]

    res = {"score": "KL(softmax f(x) || softmax f(r(x))), r(x) = sigmoid(decoder(mu(x)))",
           "score_image": "KL(P_x || P_r(x)), P = (image + 1e-6) / its sum over pixels",
           "positives": "adversarials of correctly classified images that are misclassified "
                        "(jsma: reach the target)",
           "negatives": "all clean test images", "sizes": sz, "attacks": {}, "vaes": {},
           "detectors": {}, "adaptive": {}, "detectors_image": {}, "adaptive_image": {}}
    vae_models = {}
    for kind in kinds:
        if vaes and kind in vaes:
            vae_models[kind] = vaes[kind]
            res["vaes"][kind] = {"given": True}
            continue
        ctx.stage(f"{kind} VAE (trained on first use, then cached)")
        recipe = QUICK_RECIPES.get(kind, {}) if ctx.quick else {}
        v, info = pretrained_vae(kind, seed=seed, progress=False, **recipe)
        vae_models[kind] = v
        hist = info["history"]
        res["vaes"][kind] = {"cached": info["cached"], "train_seconds": round(info["seconds"], 2),
                             "path": info["path"], "recipe": recipe, "latent": v.latent,
                             "params": v.num_params,
                             "final_loss": hist[-1]["loss"] if hist else None}

    for spec, model in nets.items():
        mname = _label(spec)
        acc = model.accuracy(x, y)
        pred = model.predict(x)
        res["attacks"][mname] = {"clean_accuracy": acc}
        advs = {}
        for attack, (full_p, quick_p) in ATTACKS.items():
            params = quick_p if ctx.quick else full_p
            n = min(sz[attack], n_clean)
            ctx.stage(f"{mname}: {attack} on {n} images")
            t0 = time.perf_counter()
            r = run_attack(model, x[:n], y[:n], attack, seed=seed, backend=ctx.backend,
                           **params)
            pos = _positives(r, y[:n], attack)
            advs[attack] = (r.x_adv, pos)
            res["attacks"][mname][attack] = {
                "params": params, "n": n, "success_rate": float(np.mean(pos)),
                "n_positives": int(pos.sum()), "seconds": round(time.perf_counter() - t0, 2)}
        for kind, vae in vae_models.items():
            key = f"{mname}/{kind}"
            ctx.stage(f"{key}: scores")
            xr = reconstruct(vae, x)
            clean_mse = _recon_error(vae, x)
            for score, (dkey, _, suffix) in SCORE_KEYS.items():
                mse = clean_mse if score == "classifier" else None
                det, hist, t5, clean = _detector(ctx, key, score, model, vae, x, y, pred, xr,
                                                 advs, mse)
                res[dkey][key] = det
                path = ctx.figure(f"hist_{mname}_{kind}{suffix}")
                if path:
                    histogram_figure(f"{mname} classifier, {kind} VAE: {SCORE_LABELS[score]}",
                                     clean, hist, {"0.3": SEED_THRESHOLD, "5% FPR": t5},
                                     path, xlabel=SCORE_AXES[score])
            path = ctx.figure(f"recon_{mname}_{kind}")
            if path:
                xa, pos = advs["pgd"]
                k = 8
                reconstruction_figure([("clean", x[:k]), ("reconstruction", xr[:k]),
                                       ("PGD adversarial", xa[:k]),
                                       ("its reconstruction", reconstruct(vae, xa[:k]))],
                                      path)

            # adaptive attack on the correctly classified images among the first n
            if ctx.quick and mname != _label(next(iter(nets))):
                continue
            n = min(sz["adaptive"], n_clean)
            ok = pred[:n] == y[:n]
            xa_in, ya_in = x[:n][ok], y[:n][ok]
            for score, (dkey, akey, _) in SCORE_KEYS.items():
                t5 = res[dkey][key]["threshold_5fpr"]
                rows = []
                for lam in (lams if score == "classifier" else lams_img):
                    ctx.stage(f"{key}: adaptive PGD on CE - {lam:g} x {score} score, "
                              f"{len(xa_in)} images")
                    t0 = time.perf_counter()
                    _, sc, wrong = adaptive_pgd(model, vae, xa_in, ya_in, lam, score=score,
                                                **ADAPTIVE[q])
                    row = {"lambda": lam, "n": int(len(xa_in)),
                           "attack_success": float(np.mean(wrong)),
                           "detection_at_5fpr": float(np.mean(sc[wrong] > t5)) if wrong.any()
                           else float("nan"),
                           "detection_at_0.3": float(np.mean(sc[wrong] > SEED_THRESHOLD))
                           if wrong.any() else float("nan"),
                           "undetected_success": float(np.mean(wrong & (sc <= t5))),
                           "median_score": float(np.median(sc[wrong])) if wrong.any() else None,
                           "seconds": round(time.perf_counter() - t0, 2)}
                    ctx.log(f"  {key} adaptive ({score} score) lam={lam:g}: success "
                            f"{row['attack_success']:.1%}, detected "
                            f"{row['detection_at_5fpr']:.1%} at 5% FPR, undetected success "
                            f"{row['undetected_success']:.1%}")
                    rows.append(row)
                res[akey][key] = {"params": ADAPTIVE[q], "threshold_5fpr": t5, "rows": rows}

    # targets: the AUC targets on the mlp, for each detector; what adaptive leaves
    for kind in kinds:
        key = f"mlp/{kind}"
        if key not in res["detectors"]:
            continue
        for score, (dkey, akey, _) in SCORE_KEYS.items():
            for attack, what in (("fgsm", "FGSM eps 0.1"), ("pgd", "PGD eps 0.3")):
                a = res[dkey][key]["attacks"][attack]["auc"]
                ctx.target(f"ROC AUC {what}, mlp, {kind} VAE, {score} score", f"{a:.3f}",
                           ">= 0.95", ok=bool(a >= 0.95), auc=a)
            rows = res[akey][key]["rows"]
            worst = max(rows, key=lambda r: r["undetected_success"])
            ctx.target(f"adaptive attack, mlp, {kind} VAE, {score} score: undetected success "
                       f"at 5% FPR (best lambda)", f"{worst['undetected_success']:.1%} at "
                       f"lambda {worst['lambda']:g} (success {worst['attack_success']:.1%}, "
                       f"detected {worst['detection_at_5fpr']:.1%})", "report", ok=None,
                       rows=rows)
    return ctx.finish(**res)
