"""Compare another implementation's adversarial examples with the reference's.

For each image: the largest absolute difference, the fraction of input features equal (within
``atol``), and, for the gradient-step attacks, how many of the differing features are
*ties*: features where the candidate may legitimately differ because the reference
trajectory, replayed here step by step, depends there on rounding or on a convention.

Sign steps (fgsm, bim, mifgsm, pgd in L-inf): ties of sign(g) on the replayed trajectory (for
mifgsm the sign of the momentum, each variant accumulated from its own gradients). A feature
is a tie, in this order of classes:

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
- ``near_zero``: |g| <= tie_rtol * max|g| over the image (the classic relative test);
- ``propagated``: (several steps, not mifgsm) the sign of the feature's float64 gradient
  differs between our trajectory and a shadow one that takes the other branch of every tie
  so far. A candidate that took some of those branches has another state from then on, and
  L-inf projects feature by feature, so a feature's value is decided by its own signs. The
  shadow is one of the trajectories a candidate can follow, not the candidate's: see
  ``branch``;
- ``branch``: (several steps, not mifgsm; given the candidate's result) the candidate's value
  of the feature is where a *legitimate trajectory* ends: one that steps by the sign of the
  float64 gradient at its own state, except at the ties of that state (the classes zero,
  saturated, rounding and near_zero, evaluated there), where it may take either branch. A
  float32 implementation follows such a trajectory: its signs differ from float64's only at
  the ties of its own state (checked on the candidates measured below: of 16341 signs that
  differ from float64's along their trajectories, all but 9 are such ties, and those 9 come
  from one ReLU kink). The ``propagated`` shadow is not enough: once the candidate took one
  tie the other way, its later gradients differ from ours, and the shadow, having also
  taken the ties the candidate kept, is elsewhere. On the verify tests' 40 images (the first
  setting below), image 19: the candidate takes the tie of pixel 99 at step 0 (|g| 1.4e-8,
  max |g| 2.5e-4) the other way and is then float64-exact at its own states; at step 7 its
  signs differ from ours on 10 pixels; the shadow, which also flipped pixel 254 at step 0,
  82 at step 1, 231 at step 6 and 474 at step 7, keeps our signs on 3 of them (186, 434,
  549), which stay unexplained without this class.

  Which branches a candidate took cannot be read from its result (a flip on a pixel that
  the box then clips leaves no trace there, but changes the later gradients), so a beam
  search looks for them, on each image with differences that no other class explains: from
  two roots (every tie on our branch; or on the candidate's side of our result where its
  feature ends on one), each round puts one more tie of each kept trajectory on its other
  branch and keeps the _BEAM children that end closest to the candidate (the fewest
  features off by more than atol + 4 * steps * eps of the candidate's dtype, the rounding
  of its state), even when farther than their parents (a tie taken the other way can need
  a later one to lead back to the candidate); it stops at a trajectory that ends at the
  candidate, after _PATIENCE rounds without a closer one, or after _ROUNDS. The features
  where the closest trajectory found ends at the candidate's value are this class. Every
  trajectory searched is one that float32 rounding can produce, so a wrong pixel stays
  unexplained unless such a trajectory ends at its value; a search that misses the
  candidate's branches leaves differences unexplained (verify then disagrees on an honest
  candidate, never the reverse).

  Measured on the bundled mlp, L-inf PGD with a random start drawn by the candidate (given
  as x_start), a float32 candidate in plain NumPy (permuted summation orders, softmax as exp
  / sum), 2 x 200 test images and 5 settings (eps/alpha/steps 0.1/0.01/10 with two starts,
  0.3/0.03/20, 0.05/0.005/10, 0.1/0.02/10): 8716 differences, 301 unexplained without this
  class, 7 with it (one image whose branches the search did not find: 5 ties in 20 steps,
  none of which taken alone brings the trajectory closer; one whose candidate crossed a ReLU
  kink on a sign step, a pre-activation 2.6e-7 from 0, which no sign class covers; one
  pixel of a third). On the tests' 40 images with 12 starts, every difference is explained
  (on 5 of the 12 starts without this class).

A feature counts in the first class it falls in, on any step of the trajectory (``branch``
is decided by the end point; ``kink`` below is for L2 steps only).

L2 steps (fgm, pgd with norm l2): x <- proj(x + alpha g / ||g||_2). There is no sign
discontinuity: a float32 candidate drifts from the exact trajectory by accumulated rounding,
and the normalisation spreads one image's gradient error over all its features, so the
classes are decided per image and the test is a bound. The trajectory is replayed in float64
(with early_stop's freezing when it is set), and per image:

- ``zero`` (every feature of the image): on some step ||g||_2 is exactly 0 in float64 or in
  our float32 pass. The reference's guarded division then makes the step 0 (never NaN),
  while the other precision takes a full step of length alpha in a direction set by rounding;
- ``saturated`` (every feature): on some step the softmax is saturated in float32 (as above),
  so the float32 direction g / ||g|| is rounding noise and the candidate's step can differ
  from the reference's by up to 2 alpha, and the rest of its trajectory with it;
- ``rounding`` (float32 candidates): |candidate - x64| <= B, x64 the final point of the
  float64 trajectory and B the image's explained-difference bound,

      B = 4 * max(sum_t e_t, max over 2 shadow trajectories of max_j |shadow_T - x64_T|_j).

  At step t on the float64 trajectory the float32 error of the gradient is bounded per
  feature by G = 4 |g32 - g64| (4 times the error of our own float32 pass at the same point,
  as for signs) + 2 eps32 ((0.5 + p_y) |d z_y/dx| + p_top |d z_top/dx|) (softmax - onehot
  carries an absolute error of about one eps32 on its large entries, the label's and the top
  class's, whatever the implementation: that is what makes a nearly saturated image's
  direction uncertain), and e_t = alpha (max_j G_j / ||g|| + max_j |g_j| ||G||_2 / ||g||^2)
  + 4 eps32 (max|x_t| + alpha + eps) is the first-order error of the normalised step plus
  the rounding of the state and the projection. sum_t e_t propagates it through
  non-expansive maps (the ball and the box projections are); the shadows measure the
  amplification the gradient's dependence on x adds: each is a float64 trajectory whose
  gradient is perturbed at every step by G (the softmax part coherently, +-d z/dx; the rest
  with random signs; a fixed seed, so verify is deterministic) and whose state by +-eps32
  |x|, a Monte Carlo rounding analysis in the spirit of CESTAC/CADNA's perturbed runs. The
  factor 4 covers an implementation whose rounding is a few times ours;
- ``kink`` (float32 candidates): as ``rounding``, for an image where on some step a ReLU's
  pre-activation is within float32's reach of 0 (|a| <= 4 |a32 - a64| + 1/4 of the
  shadows' drift of a): a float32 implementation can take either branch of the kink, the
  gradient jumps by that unit's contribution, and the other branch is as legitimate as
  ours. The step with those units flipped is computed; its difference from ours joins e_t,
  and shadow 0 follows the flipped branch (shadow 1 at random), so B covers both branches;
- ``near_zero``, ``propagated``, ``branch``: not used (there is no sign to tie).

Measured on the bundled mlp, L2 PGD eps 2, alpha 0.2, 20 steps, 500 test images, a float32
candidate in plain NumPy (permuted summation orders, softmax as exp / sum): 10-14% of the
images are saturated on some step, every other image's difference is within B with
cand/B <= 0.14, and B has median ~2e-4 and is < 0.01 on ~89% and < 0.05 on ~98% of the
unsaturated images (larger where a kink was crossed): a pixel wrong by 0.05 is caught
except on saturated or kinked images, where float32 cannot tell it from rounding.

Random-start PGD (L-inf and L2): the reference's start comes from our generators, so a
candidate can only be replayed when it gives its draws: the candidate's ``x_start`` (the same
shape as x: the starting point after the random draw and the clipping, i.e. x_0) makes verify
replay the reference trajectory from that point (instead of our RNG) and compare the
candidate with that replay, with the tie analysis above for its norm. x_start must be finite,
float, inside the box and inside the eps ball around x (up to a few epsilons of its dtype);
only restarts=1 can be replayed (with restarts > 1 the kept run is chosen per image among
several draws: an error). Without x_start, random-start PGD reports "tie analysis n/a".
"""

import numpy as np

from ._validate import check_float_array
from .errors import AdvkernError, ShapeError
from .reference import network
from .reference.gradient_attacks import momentum_update
from .reference.projections import (_col, check_norm, clip_box, l2_norms, per_sample_eps,
                                    project, steepest_step)


TIE_CLASSES = ("zero", "saturated", "rounding", "kink", "near_zero", "propagated",
               "branch")
_EPS32 = float(np.finfo(np.float32).eps)
_SAFETY = 4.0        # B's factor over the estimated float32 error
_OBS = 4.0           # G's factor over our own float32 pass's gradient error
_SOFTMAX = 2.0       # eps32's of absolute error on softmax - onehot's large entries
_SHADOWS = 2
_KINK_DRIFT = 0.25   # of the shadows' drift, in the reach of a ReLU kink
_BEAM = 8            # trajectories the branch search keeps per image
_ROUNDS = 12         # its rounds: each puts one more tie on its other branch
_PATIENCE = 2        # rounds without a closer trajectory before an image's search stops
_TRIES = 128         # ties tried per kept trajectory and round (the earliest ones)
_CHUNK = 2048        # trajectories run together (bounds the search's memory)


def _saturated(model, x64, labels, loss):
    """(N,) bool: float32 computes this image's loss gradient from rounding noise."""
    if loss != "ce":
        return np.zeros(len(x64), dtype=bool)
    z = network.forward(model.astype(np.float64) if model.dtype != np.float64 else model,
                        x64)[0]
    return _saturated_logits(z, labels)


def _saturated_logits(z, labels):
    """(N,) bool: _saturated from the float64 logits z (N, K) of a cross-entropy loss."""
    from .reference.losses import log_softmax
    logp = log_softmax(z)[np.arange(len(z)), labels]
    # 1 - p_label < 64 eps32, computed as -expm1(logp) so it does not round to 0 itself
    return -np.expm1(logp) < 64 * _EPS32


def _rounding(g64, g32, label_row=None):
    """(N, D) bool: the ``rounding`` class of a sign (module docstring) from the float64 and
    our float32 gradient (N, D) at one state and, for a cross-entropy loss, |d z_label/dx|."""
    tie = (np.abs(g64) <= 4 * np.abs(g32 - g64)) | (np.sign(g32) != np.sign(g64))
    if label_row is not None:
        tie |= np.abs(g64) <= 8 * _EPS32 * label_row
    return tie


def _logit_row(m64, x64, labels, signed=False):
    """d z_label / dx (N, D) in float64, its absolute value unless ``signed`` (one logit:
    dz/dx)."""
    z, caches = network.forward(m64, x64)
    seeds = np.zeros_like(z)
    if z.shape[1] == 1:
        seeds[:, 0] = 1
    else:
        seeds[np.arange(len(z)), labels] = 1
    row, _ = network.backward(m64, seeds, caches, need_params=False)
    row = row.reshape(len(z), -1)
    return row if signed else np.abs(row)


_label_row = _logit_row


# -- the replayed attack ------------------------------------------------------------------


def _setup(model, x, y, attack, kw):
    """The replay's settings of a gradient-step attack (a dict), or the reason (a str) the
    tie analysis does not cover it."""
    if attack not in ("fgsm", "fgm", "bim", "pgd", "mifgsm"):
        return (f"tie analysis n/a for {attack} (it covers the gradient-step attacks fgsm, fgm, "
                "bim, pgd in L-inf and L2, mifgsm)")
    from .attacks import attack_params, resolve_target
    from .reference.gradient_attacks import bim_defaults

    p = attack_params(attack, **{k: v for k, v in kw.items() if v is not None})
    n = len(x)
    targeted = bool(p.get("targeted"))
    labels = resolve_target(p["target"], y, model.num_classes) if targeted else y
    st = {"attack": attack, "labels": labels, "y": y, "targeted": targeted,
          "sign": -1.0 if targeted else 1.0, "loss": p.get("loss", "ce"),
          "box": tuple(p.get("clip", (0.0, 1.0))), "decay": None, "ball": True,
          "early_stop": bool(p.get("early_stop", False)),
          "random_start": bool(p.get("random_start", False)),
          "restarts": p.get("restarts", 1), "eps": p["eps"]}
    eps = p["eps"]
    if attack == "fgsm":
        steps, alpha, norm, st["ball"] = 1, eps, "linf", False
    elif attack == "fgm":
        steps, alpha, norm, st["ball"] = 1, eps, "l2", False
    elif attack == "mifgsm":
        steps, st["decay"], norm = p["steps"], p.get("decay", 1.0), "linf"
        alpha = p.get("alpha") or eps / steps
    elif attack == "bim":
        e_max = float(per_sample_eps(eps, n).max(initial=0.0))
        d_alpha, d_steps = bim_defaults(e_max, st["box"])
        alpha, steps = p.get("alpha") or d_alpha, p.get("steps") or d_steps
        norm = "linf"
    else:
        alpha, steps, norm = p["alpha"], p["steps"], check_norm(p.get("norm", "inf"))
        if norm == "l1":
            return "tie analysis n/a for pgd with norm l1 (its SLIDE step is a quantile, not a sign)"
    st.update(norm=norm, steps=int(steps), e=per_sample_eps(eps, n),
              alpha=per_sample_eps(alpha, n, name="alpha"))
    return st


def check_x_start(x_start, x, st):
    """The candidate's random start as an array of x's shape, or raise naming the problem."""
    if not st["random_start"]:
        raise AdvkernError("x_start (a random start) given, but the attack has no random start:"
                           " it is only used by pgd with random_start")
    if st["restarts"] != 1:
        raise AdvkernError(f"x_start can be replayed only with restarts=1 (one start per image),"
                           f" got restarts={st['restarts']}")
    xs = check_float_array(x_start, "x_start")
    if xs.shape != x.shape:
        raise ShapeError(f"x_start must have the shape of x {x.shape}, got {xs.shape}")
    lo, hi = st["box"]
    # a few epsilons of the coarser dtype: a float32 start is clipped/projected in float32
    tol = 8 * float(np.finfo(np.float32 if np.float32 in (xs.dtype, x.dtype)
                             else np.float64).eps)
    scale = max(1.0, abs(lo), abs(hi))
    if xs.size and (xs.min() < lo - tol * scale or xs.max() > hi + tol * scale):
        raise AdvkernError(f"x_start outside the box [{lo}, {hi}]: min {xs.min():.6g}, "
                           f"max {xs.max():.6g}")
    d = (xs.astype(np.float64) - x.astype(np.float64)).reshape(len(x), -1)
    r = np.abs(d).max(axis=1, initial=0.0) if st["norm"] == "linf" else l2_norms(d)
    out = np.flatnonzero(r > st["e"] * (1 + tol) + tol * scale)
    if out.size:
        i = int(out[0])
        raise AdvkernError(f"x_start outside the {st['norm']} ball of radius eps around x: "
                           f"image {i} is at distance {r[i]:.6g} > eps {st['e'][i]:.6g} "
                           f"({out.size} image(s))")
    return xs


def _project(z, x, st):
    return project(z, x, st["e"], st["norm"], st["box"]) if st["ball"] else \
        clip_box(z, *st["box"])


def _adversarial(model, xa, st):
    """(N,) bool: the reference's early-stop test (prediction != y, or == target)."""
    from .reference.losses import predict
    pred = predict(network.forward(model, xa)[0])
    return pred == st["labels"] if st["targeted"] else pred != st["y"]


def replay_pgd(model, x, st, x0):
    """The reference PGD (``gradient_attacks.pgd``, one run) from the start x0, in x's dtype:
    exactly its steps, projections and early-stop freezing, with x0 for its random draw."""
    xa = np.array(x0, dtype=x.dtype)
    if not st["e"].any():
        return x.copy()
    active = np.ones(len(x), dtype=bool)
    for _ in range(st["steps"]):
        if st["early_stop"]:
            active &= ~_adversarial(model, xa, st)
            if not active.any():
                break
        _, g = network.loss_and_input_grad(model, xa, st["labels"], st["loss"])
        step = steepest_step(st["sign"] * g, st["alpha"], st["norm"], x=xa, clip=st["box"])
        xa = np.where(_col(active, x.ndim), _project(xa + step, x, st), xa)
    return xa


# -- sign steps ---------------------------------------------------------------------------


def _tie_masks(model, x, st, tie_rtol, cand_dtype=np.float64, x0=None, cand=None, ref=None,
               atol=1e-6):
    """{class: (N, D) bool} of features at a tie of sign(grad) on the reference trajectory
    (each feature in its first class).

    cand, ref: the candidate's and our final points (N, ...), for the ``branch`` class (the
    search for the candidate's branches, several steps without momentum); without them that
    class is empty. atol: compare's threshold of a difference."""
    labels, sign, loss, decay = st["labels"], st["sign"], st["loss"], st["decay"]
    f32 = np.dtype(cand_dtype) == np.float32
    m64 = model.astype(np.float64) if model.dtype != np.float64 else model
    m32 = model.astype(np.float32) if model.dtype != np.float32 else model
    n, d = len(x), x[0].size
    found = {c: np.zeros((n, d), dtype=bool) for c in TIE_CLASSES}
    xa = x.copy() if x0 is None else np.array(x0, dtype=x.dtype)
    # MI-FGSM steps by the sign of its momentum: the ties are the momentum's, each of the
    # three (ours in x's dtype, float64, float32) accumulated from its own gradients
    mom = {k: np.zeros((n, d)) for k in ("g", "g64", "g32")} if decay is not None else None
    shadow = xa.astype(np.float64) if mom is None and st["steps"] > 1 else None
    ours = [] if shadow is not None and cand is not None else None   # our signs, (T, N, D)
    for _ in range(st["steps"]):
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
            step["rounding"] = _rounding(g64, g32, _label_row(m64, x64, labels)
                                         if loss == "ce" and mom is None else None)
        if shadow is not None:
            # the trajectory that takes the other branch of every tie so far: where its
            # gradient's sign differs from ours, a candidate that took some of those branches
            # can differ too (L-inf projects feature by feature, so a feature's value is
            # decided by its own sign sequence)
            tie = np.any([step[c] for c in step], axis=0)
            _, gs = network.loss_and_input_grad(m64, shadow, labels, loss)
            gs = gs.reshape(n, -1)
            step["propagated"] = (np.sign(gs) != np.sign(g64)) & ~tie
            alt = np.where(g64 == 0, 1.0, -np.sign(g64))
            ds = sign * np.where(tie, alt, np.sign(gs))
            shadow = _project(shadow + (_col(st["alpha"], 2) * ds).reshape(x.shape),
                              x.astype(np.float64), st)
        for c in step:
            found[c] |= step[c]
        if ours is not None:
            ours.append(np.sign(sign * g.reshape(n, -1)).astype(np.int8))
        # the reference's own step (alpha * sign, in x's dtype) and ball-then-box
        xa = _project(xa + steepest_step(sign * g, st["alpha"], "linf"), x, st)
    taken = np.zeros((n, d), dtype=bool)
    for c in TIE_CLASSES:               # each feature in its first class
        found[c] &= ~taken
        taken |= found[c]
    if ours is not None:
        c64 = np.asarray(cand, dtype=np.float64).reshape(n, -1)
        dc = c64 - np.asarray(ref, dtype=np.float64).reshape(n, -1)
        with np.errstate(invalid="ignore"):
            differ = ~(np.abs(dc) <= atol)
        imgs = np.flatnonzero((differ & ~taken).any(axis=1) & np.isfinite(c64).all(axis=1))
        if imgs.size:
            # the search's end points are float64; the candidate's carry its dtype's rounding
            # of the state, a few of its epsilons per step
            lo, hi = st["box"]
            tol = atol + _SAFETY * st["steps"] * float(np.finfo(cand_dtype).eps) * \
                (max(1.0, abs(lo), abs(hi)) + float(st["alpha"].max(initial=0.0)))
            side = np.where(differ, np.sign(dc), 0.0)
            match = _branch_search(m64, m32, x, st, x0, np.array(ours), c64, side, imgs, f32,
                                   tie_rtol, tol)
            found["branch"][imgs] = match & differ[imgs] & ~taken[imgs]
    return found


def _state_ties(m64, m32, xs, labels, loss, tie_rtol, f32):
    """At float64 states xs (R, ...): the float64 loss gradient dJ/dx (R, D) and its features
    (R, D) bool where float32 can take either sign, by the classes zero, saturated, rounding
    and near_zero of the module docstring, evaluated at xs (not on our trajectory)."""
    r = len(xs)
    g, z, caches, _ = _forward(m64, xs, labels, loss, 1.0)
    a = np.abs(g)
    tie = (g == 0) | (a <= tie_rtol * a.max(axis=1, keepdims=True))
    if f32:
        g32 = _forward(m32, xs.astype(np.float32), labels, loss, 1.0)[0].astype(np.float64)
        ce = loss == "ce"
        tie |= _rounding(g, g32, np.abs(_seed_rows(m64, z, caches, labels)) if ce else None)
        if ce:
            tie |= _saturated_logits(z, labels)[:, None]
    return g.reshape(r, -1), tie


def _branch_run(m64, m32, x, st, x0, rows, ours, side, use_side, flips, f32, tie_rtol,
                keep_ties=False):
    """Legitimate trajectories (module docstring, ``branch``) in float64 from x0, one per row:
    rows (R,) image indices, use_side (R,) bool (the default branch at a tie: the candidate's
    side where it shows one, else ours; or always ours), flips: R sets of (step, feature)
    whose tie takes the other branch than the default. ours: our signs (T, N, D), side: the
    candidate's side of our end point (N, D), -1, 0 or 1.

    Returns the end points (R, D) and, with keep_ties, each row's ties as (K, 2) (step,
    feature) arrays, in step order."""
    n_rows, shape = len(rows), (len(rows),) + x.shape[1:]
    sub = dict(st, labels=st["labels"][rows], y=st["y"][rows], e=st["e"][rows],
               alpha=st["alpha"][rows])
    xr = x[rows].astype(np.float64)
    s = np.array(x0 if x0 is not None else x, dtype=np.float64)[rows]
    sd = np.where(use_side[:, None], side[rows], 0.0)
    by_step = [([], []) for _ in range(st["steps"])]
    for k, f in enumerate(flips):
        for t, j in f:
            by_step[t][0].append(k)
            by_step[t][1].append(j)
    active = np.ones(n_rows, dtype=bool)
    ties = [[] for _ in range(n_rows)] if keep_ties else None
    for t in range(st["steps"]):
        if st["early_stop"]:
            active &= ~_adversarial(m64, s, sub)
            if not active.any():
                break
        g, tie = _state_ties(m64, m32, s, sub["labels"], st["loss"], tie_rtol, f32)
        tie &= active[:, None]
        b = np.where(sd != 0, sd, ours[t][rows])
        k, j = by_step[t]
        b[k, j] = np.where(b[k, j] == 0, 1.0, -b[k, j])
        ds = np.where(tie, b, np.sign(st["sign"] * g))
        if keep_ties:
            for k, j in zip(*np.nonzero(tie)):
                ties[k].append((t, j))
        sn = _project(s + (_col(sub["alpha"], 2) * ds).reshape(shape), xr, sub)
        s = np.where(_col(active, x.ndim), sn, s)
    if keep_ties:
        ties = [np.array(tk, dtype=np.int64).reshape(-1, 2) for tk in ties]
    return s.reshape(n_rows, -1), ties


def _branch_search(m64, m32, x, st, x0, ours, cand, side, imgs, f32, tie_rtol, tol):
    """For each image of imgs (M,): the legitimate trajectory closest to the candidate that a
    beam search over its ties' branches finds (module docstring, ``branch``). Returns (M, D)
    bool: the features where that trajectory ends within tol of the candidate (N, D)."""
    def run(entries, keep_ties):
        """[(image, use_side, flips)] -> end points (R, D) (and ties), in chunks."""
        ends, ties = [], []
        for a in range(0, len(entries), _CHUNK):
            part = entries[a:a + _CHUNK]
            e, tk = _branch_run(m64, m32, x, st, x0, np.array([p[0] for p in part]), ours,
                                side, np.array([p[1] for p in part]), [p[2] for p in part],
                                f32, tie_rtol, keep_ties)
            ends.append(e)
            ties += tk or []
        return np.concatenate(ends), ties

    def misses(i, end):
        return int((~(np.abs(end - cand[i]) <= tol)).sum())

    # the two roots: every tie on our branch, and on the candidate's side where it shows one
    roots = [(i, u, frozenset()) for i in imgs for u in (False, True)]
    ends, ties = run(roots, True)
    beams, seen, best = {i: [] for i in imgs}, {i: set() for i in imgs}, {}
    for (i, u, f), e, tk in zip(roots, ends, ties):
        m = misses(i, e)
        beams[i].append((u, f, tk))
        seen[i].add(hash(e.tobytes()))
        if i not in best or m < best[i][0]:
            best[i] = (m, e)
    idle = {i: 0 for i in imgs}
    for _ in range(_ROUNDS):
        live = [i for i in imgs if best[i][0] and idle[i] < _PATIENCE and beams[i]]
        tries = [(i, u, f | {(int(t), int(j))}) for i in live for u, f, tk in beams[i]
                 for t, j in [p for p in tk if (int(p[0]), int(p[1])) not in f][:_TRIES]]
        if not tries:
            break
        ends, _ = run(tries, False)
        kids = {i: [] for i in live}
        for (i, u, f), e in zip(tries, ends):
            key = hash(e.tobytes())
            if key not in seen[i]:          # another flip set, the same end: nothing new
                seen[i].add(key)
                kids[i].append((misses(i, e), u, f, e))
        nxt = []
        for i in live:
            # the next beam is the closest children, even when farther than their parents:
            # the candidate's path can lead through a trajectory farther from it (a tie
            # taken before the one that brings it back)
            kept = sorted(kids[i], key=lambda c: c[0])[:_BEAM]
            if kept and kept[0][0] < best[i][0]:
                best[i], idle[i] = (kept[0][0], kept[0][3]), 0
            else:
                idle[i] += 1
            nxt += [(i, u, f) for _, u, f, _ in kept]
        # the ties of the new beam's trajectories (the children ran without them)
        ties = run(nxt, True)[1] if nxt else []
        beams = {i: [] for i in imgs}
        for (i, u, f), tk in zip(nxt, ties):
            beams[i].append((u, f, tk))
    return np.array([np.abs(best[i][1] - cand[i]) <= tol for i in imgs])


# -- L2 steps -----------------------------------------------------------------------------


def _forward(model, x, labels, loss, sign):
    """One pass of ``network.loss_and_input_grad`` that also keeps what the L2 analysis
    needs: (ascent gradient sign * dJ/dx (N, D), logits, caches, {layer index: the input of
    each ReLU layer, its pre-activation})."""
    from .reference.losses import get_loss
    caches, pre = [], {}
    h = x
    for i, (layer, p) in enumerate(zip(model.layers, model.params)):
        if layer.type == "relu":
            pre[i] = h
        h, cache = network.layer_forward(layer, {k: np.asarray(a, dtype=x.dtype)
                                                 for k, a in p.items()}, h, model.shapes[i])
        caches.append(cache)
    _, dz = get_loss(loss)(h, labels)
    dx, _ = network.backward(model, dz, caches, need_params=False)
    return sign * dx.reshape(len(x), -1), h, caches, pre


def _seed_rows(m64, z, caches, classes):
    """d z_c / dx (N, D) for one class per image (a one-logit model: dz/dx), from caches."""
    seeds = np.zeros_like(z)
    seeds[np.arange(len(z)), 0 if z.shape[1] == 1 else classes] = 1
    return network.backward(m64, seeds, caches, need_params=False)[0].reshape(len(z), -1)


def _l2_analysis(model, x, st, x0, f32):
    """Replay the L2 trajectory in float64 from x0. Returns (x64 final (N, D), bound B (N,),
    {'zero' | 'saturated' | 'kink': (N,) bool})."""
    from .reference.losses import get_loss, softmax
    labels, sign, loss = st["labels"], st["sign"], st["loss"]
    m64 = model.astype(np.float64) if model.dtype != np.float64 else model
    m32 = model.astype(np.float32) if model.dtype != np.float32 else model
    n = len(x)
    rows = np.arange(n)
    xc = x.astype(np.float64)
    xa = np.array(x0, dtype=np.float64)
    flags = {c: np.zeros(n, dtype=bool) for c in ("zero", "saturated", "kink")}
    first = np.zeros(n)
    rng = np.random.default_rng(20240611)         # fixed: the analysis is deterministic
    shadows = [xa.copy() for _ in range(_SHADOWS)] if f32 else []
    a, e = st["alpha"], st["e"]
    active = np.ones(n, dtype=bool)
    col = lambda v: _col(v, x.ndim)               # noqa: E731
    step = lambda g: steepest_step(g.reshape(x.shape), a, "l2").reshape(n, -1)  # noqa: E731

    for _ in range(st["steps"] if e.any() else 0):
        if st["early_stop"]:
            active &= ~_adversarial(m64, xa, st)
            if not active.any():
                break
        g, z, caches, pre = _forward(m64, xa, labels, loss, sign)
        gn = l2_norms(g)
        zero = gn == 0
        if f32:
            g32, _, _, pre32 = _forward(m32, xa.astype(np.float32), labels, loss, sign)
            g32 = g32.astype(np.float64)
            zero |= l2_norms(g32) == 0
            flags["saturated"] |= active & _saturated(m64, xa, labels, loss)
            noise = _OBS * np.abs(g32 - g)
            G = noise.copy()
            if loss == "ce":
                p = softmax(z)
                top = p.argmax(axis=1)
                ry, rt = _seed_rows(m64, z, caches, labels), _seed_rows(m64, z, caches, top)
                wy = _SOFTMAX * _EPS32 * (0.5 + p[rows, labels])
                wt = _SOFTMAX * _EPS32 * p[rows, top]
                G += wy[:, None] * np.abs(ry) + wt[:, None] * np.abs(rt)
            safe = np.where(gn > 0, gn, 1.0)
            e_t = a * (G.max(axis=1, initial=0.0) / safe
                       + np.abs(g).max(axis=1, initial=0.0) * l2_norms(G) / safe ** 2) \
                + 4 * _EPS32 * (np.abs(xa).reshape(n, -1).max(axis=1, initial=0.0) + a + e)
            sh = [_forward(m64, s, labels, loss, sign) for s in shadows]
            # ReLU kinks: a pre-activation within the reach of float32 (our float32 pass's
            # error, or the shadows' drift, times the safety factor) of 0 can take either
            # branch; the other branch's step (all such units flipped) is another
            # legitimate step: its difference joins the local error and shadow 0 follows it
            flip, dg = [], np.zeros_like(g)
            for i, h in pre.items():
                drift = np.zeros_like(h)
                for _, _, _, ps in sh:
                    drift = np.maximum(drift, np.abs(ps[i] - h))
                reach = _SAFETY * np.abs(pre32[i] - h) + _KINK_DRIFT * drift
                flip.append((i, (np.abs(h) <= reach) & _col(active, h.ndim)))
            kinked = np.zeros(n, dtype=bool)
            for _, f in flip:
                kinked |= f.reshape(n, -1).any(axis=1)
            if kinked.any():
                alt = list(caches)
                for i, f in flip:
                    alt[i] = caches[i] ^ f
                _, dz = get_loss(loss)(z, labels)
                g_alt = sign * network.backward(m64, dz, alt, need_params=False)[0] \
                    .reshape(n, -1)
                dg = np.where(kinked[:, None], g_alt - g, 0.0)
                e_t = e_t + np.abs(step(g + dg) - step(g)).max(axis=1, initial=0.0)
                flags["kink"] |= kinked
            first += np.where(active & ~zero, e_t, 0.0)
            for k, (s, (gs, *_)) in enumerate(zip(shadows, sh)):
                gs = gs + rng.choice([-1.0, 1.0], size=g.shape) * noise \
                    + (dg if k == 0 else rng.integers(0, 2, size=(n, 1)) * dg)
                if loss == "ce":
                    gs += (rng.choice([-1.0, 1.0], size=n) * wy)[:, None] * ry \
                        + (rng.choice([-1.0, 1.0], size=n) * wt)[:, None] * rt
                sn = _project(s + step(gs).reshape(x.shape), xc, st)
                sn = clip_box(sn * (1 + _EPS32 * rng.uniform(-1, 1, size=sn.shape)), *st["box"])
                shadows[k] = np.where(col(active), sn, s)
        flags["zero"] |= active & zero
        xn = _project(xa + step(g).reshape(x.shape), xc, st)
        xa = np.where(col(active), xn, xa)
    x64 = xa.reshape(n, -1)
    dev = np.zeros(n)
    for s in shadows:
        dev = np.maximum(dev, np.abs(s.reshape(n, -1) - x64).max(axis=1, initial=0.0))
    return x64, _SAFETY * np.maximum(dev, first), flags


def _l2_masks(model, x, st, cand64, cand_dtype, x0):
    """{class: (N, D) bool} for an L2-step attack (see the module docstring) and B (N,)."""
    f32 = np.dtype(cand_dtype) == np.float32
    n, d = len(x), x[0].size
    x64, bound, flags = _l2_analysis(model, x, st, x.copy() if x0 is None else x0, f32)
    found = {c: np.zeros((n, d), dtype=bool) for c in TIE_CLASSES}
    found["zero"][flags["zero"]] = True
    found["saturated"][flags["saturated"] & ~flags["zero"]] = True
    if f32:
        with np.errstate(invalid="ignore"):
            within = np.abs(cand64.reshape(n, -1) - x64) <= bound[:, None]
        within &= ~(found["zero"] | found["saturated"])
        found["kink"] = within & flags["kink"][:, None]
        found["rounding"] = within & ~flags["kink"][:, None]
    return found, bound


# -- the comparison -----------------------------------------------------------------------


def compare(model, x, y, ours, candidate, attack, kw, tie_rtol=1e-4, atol=1e-6, x_start=None):
    """Per-image and overall agreement of ``candidate`` (N, ...) with ``ours`` (an AttackRun).

    x_start: the candidate's random start (pgd with random_start, restarts=1; see the module
    docstring); ``ours`` is then not used (it may be None): the reference is replayed from
    x_start, in the candidate's float dtype.
    """
    if not np.isfinite(tie_rtol) or tie_rtol < 0:
        raise AdvkernError(f"tie_rtol must be finite and >= 0, got {tie_rtol!r}")
    cand_in = np.asarray(candidate)
    cand_dtype = cand_in.dtype if cand_in.dtype.kind == "f" else np.dtype(np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    st = _setup(model, x, y, attack, kw)
    x0 = None
    if x_start is not None:
        if isinstance(st, str):
            raise AdvkernError(f"x_start (a random start) given, but {attack} has no random "
                               "start: it is only used by pgd with random_start")
        x0 = check_x_start(x_start, x, st)
        xr = np.asarray(x, dtype=cand_dtype if cand_dtype in (np.float32, np.float64)
                        else np.float64)
        mine = replay_pgd(model, xr, st, x0).astype(np.float64)
    elif ours is None:
        raise AdvkernError("compare needs ours (an AttackRun), or x_start to replay from")
    else:
        mine = np.asarray(ours.x_adv, dtype=np.float64)
    if cand.shape != mine.shape:
        raise ShapeError(f"candidate x_adv has shape {cand.shape}, ours {mine.shape}")
    n = len(cand)
    diff = np.abs(cand - mine).reshape(n, -1)
    # a NaN/Inf candidate pixel differs (NaN > atol would be False and call it equal)
    diff[~np.isfinite(diff)] = np.inf
    differ = diff > atol

    classes, bound, kind, note = None, None, None, None
    if isinstance(st, str):
        note = st
    elif st["random_start"] and x0 is None:
        note = ("tie analysis n/a for random-start pgd without its draws: give the start "
                "(x_start, the point after the random draw and clipping) with the candidate "
                "to replay it")
    elif st["norm"] == "linf":
        kind = "sign"
        classes = _tie_masks(model, x, st, tie_rtol, cand_dtype, x0, cand=cand, ref=mine,
                             atol=atol)
    else:
        kind = "l2"
        classes, bound = _l2_masks(model, x, st, cand, cand_dtype, x0)
    ties = None if classes is None else np.any([classes[c] for c in TIE_CLASSES], axis=0)
    images = []
    for i in range(n):
        n_tie = int((differ[i] & ties[i]).sum()) if ties is not None else None
        r = {"index": i, "max_abs_diff": float(diff[i].max(initial=0.0)),
             "frac_equal": float(1 - differ[i].mean()) if diff[i].size else 1.0,
             "n_diff": int(differ[i].sum()), "n_tie": n_tie}
        if bound is not None:
            r["rounding_bound"] = float(bound[i])
        images.append(r)
    n_diff = int(differ.sum())
    explained = int((differ & ties).sum()) if ties is not None else None
    by_class = None if classes is None else \
        {c: int((differ & classes[c]).sum()) for c in TIE_CLASSES}
    summary = {"n": n, "images_identical": int((~differ.any(axis=1)).sum()),
               "tie_analysis": kind, "tie_note": note,
               "ties_by_class": by_class,
               "max_abs_diff": float(diff.max(initial=0.0)),
               "frac_equal": float(1 - differ.mean()) if differ.size else 1.0,
               "n_diff": n_diff, "diff_explained_by_ties": explained,
               "agree": n_diff == 0 or (explained is not None and explained == n_diff)}
    return {"attack": attack, "images": images, "summary": summary}
