"""The variational autoencoder's math and the reconstruction-mismatch detector, in NumPy.

A VAE here is an encoder and a decoder, each an ``advkern.nets.Sequential`` run by the
reference passes (``reference.network``):

- encoder: x (N, *image) -> h (N, 2L); mu = h[:, :L], logvar = h[:, L:] (q(z|x) is
  N(mu, diag(exp(logvar))));
- reparameterization (Kingma & Welling 2014): z = mu + exp(logvar / 2) * eps with
  eps ~ N(0, I) drawn outside, so z is a differentiable function of (mu, logvar);
- decoder: z (N, L) -> Bernoulli logits l (N, D), D = prod(image); the mean image is
  sigmoid(l).

Per image, the negative ELBO minimised in training is (natural logs, summed over pixels)

    loss = BCE(l, x) + KL(q(z|x) || N(0, I))
    BCE(l, x) = sum_d softplus(l_d) - x_d l_d          (= -log p(x|z) for Bernoulli pixels)
    KL        = 1/2 sum_j (mu_j^2 + exp(logvar_j) - 1 - logvar_j)

with softplus(l) = log(1 + e^l) = logaddexp(0, l), exact for any l (no sigmoid then log).

Detection (seed 001): the classifier's softmax on the input against its softmax on the
VAE's reconstruction,

    S(x) = KL(p(x) || p(r(x))) = sum_k p_k(x) (log p_k(x) - log p_k(r(x))),

p = softmax(f(.)), and r(x) = sigmoid(decoder(mu(x))) reshaped to the image: the decoder's
mean image at the posterior mean (no sampling, so S is deterministic). It lies in (0, 1)
already, so the seed's clip to the pixel box is the identity. Both log-probabilities come
from ``losses.log_softmax`` (log-sum-exp), so S is finite and >= 0 for any logits.

The seed's words ("the KL divergence between the adversarial input and its generated
output") also read literally as a KL between the two IMAGES, each taken as a distribution
over its D pixels (Keras' ``kullback_leibler_divergence(x, x_gen)`` on flattened images):

    S_img(x) = KL(P || Q) = sum_d P_d log(P_d / Q_d),
    P = (x + c) / sum(x + c),  Q = (r(x) + c) / sum(r(x) + c),  c = IMAGE_FLOOR = 1e-6

(the floor c keeps every log finite: MNIST background pixels are exactly 0, and float32
sigmoids underflow to 0). ``score="image"`` selects it; it needs no classifier.
Everything keeps x's dtype; nothing modifies its arguments.
"""

import numpy as np

from . import network
from .losses import log_softmax


def _flat(a):
    return a.reshape(a.shape[0], -1)


# ----------------------------------------------------------------------------- ELBO pieces


def kl_standard_normal(mu, logvar):
    """KL(N(mu, diag e^logvar) || N(0, I)) per row and its gradients.

    mu, logvar: (N, L) -> kl (N,), dmu (N, L) = mu, dlogvar (N, L) = (e^logvar - 1) / 2.
    """
    var = np.exp(logvar)
    kl = 0.5 * np.sum(mu * mu + var - 1 - logvar, axis=1)
    return kl, mu.copy(), 0.5 * (var - 1)


def bce_with_logits(logits, x):
    """Bernoulli negative log-likelihood of targets x in [0, 1] under logits, per row.

    logits, x: (N, D) -> loss (N,) = sum_d softplus(l_d) - x_d l_d, dlogits (N, D) =
    sigmoid(l) - x, dx (N, D) = -l (x is a target here, but the input-gradient of the ELBO
    needs it).
    """
    loss = np.sum(np.logaddexp(0, logits) - x * logits, axis=1)
    sig = np.exp(-np.logaddexp(0, -logits))
    return loss, sig - x, -logits


def reparameterize(mu, logvar, eps):
    """z = mu + exp(logvar / 2) * eps; mu, logvar, eps: (N, L) -> z, std (both (N, L))."""
    std = np.exp(0.5 * logvar)
    return mu + std * eps, std


def encode(vae, x):
    """x (N, *image) -> mu, logvar (N, L) each, and the encoder's caches."""
    h, caches = network.forward(vae.encoder, x)
    lat = vae.latent
    return h[:, :lat], h[:, lat:], caches


def decode_logits(vae, z):
    """z (N, L) -> Bernoulli logits (N, D) and the decoder's caches."""
    return network.forward(vae.decoder, z)


def neg_elbo(vae, x, eps, need_params=True, need_dx=False, target=None):
    """Per-image negative ELBO and the gradients of its batch SUM.

    x: (N, *image) in [0, 1]; eps: (N, L) the reparameterization noise (fixed, so the loss
    is a deterministic function of the weights and x). Returns a dict: loss (N,), rec (N,)
    (BCE), kl (N,), and when asked, enc_grads / dec_grads (lists of per-layer dicts, like
    ``network.backward``) and dx (N, *image).
    Cost: one encoder and one decoder pass forward and backward.
    """
    mu, logvar, ecache = encode(vae, x)
    z, std = reparameterize(mu, logvar, eps)
    logits, dcache = decode_logits(vae, z)
    rec, dlogits, dx_target = bce_with_logits(logits, _flat(x if target is None else target))
    kl, dmu_kl, dlogvar_kl = kl_standard_normal(mu, logvar)
    dz, dec_grads = network.backward(vae.decoder, dlogits, dcache, need_params=need_params)
    # z = mu + std * eps: dz/dmu = 1, dz/dlogvar = eps * std / 2.
    dh = np.concatenate([dz + dmu_kl, dz * eps * std * 0.5 + dlogvar_kl], axis=1)
    out = {"loss": rec + kl, "rec": rec, "kl": kl}
    if need_params or need_dx:
        dx_enc, enc_grads = network.backward(vae.encoder, dh, ecache, need_params=need_params)
        if need_params:
            out["enc_grads"], out["dec_grads"] = enc_grads, dec_grads
        if need_dx:
            out["dx"] = dx_enc + dx_target.reshape(x.shape)
    return out


# ----------------------------------------------------------------------------- detector


def reconstruct(vae, x):
    """The decoder's mean image at the posterior mean: sigmoid(decoder(mu(x))), x's shape."""
    mu, _, _ = encode(vae, x)
    logits, _ = decode_logits(vae, mu)
    return np.exp(-np.logaddexp(0, -logits)).reshape(x.shape).astype(x.dtype, copy=False)


def _kl_logits(zx, zr):
    """KL(softmax(zx) || softmax(zr)) per row and its gradients with respect to both logits.

    zx, zr: (N, K) -> kl (N,), dzx (N, K) = p (a - KL), dzr (N, K) = q - p, where
    p = softmax(zx), q = softmax(zr), a = log p - log q. (dKL/dzx_j = sum_k dp_k/dzx_j a_k
    + sum_k p_k dlogp_k/dzx_j; the second sum is p_j - p_j sum_k p_k = 0.)
    A binary model's single logit z is read as (0, z), as in ``losses``.
    """
    lp, lq = log_softmax(zx), log_softmax(zr)
    p = np.exp(lp)
    a = lp - lq
    kl = np.sum(p * a, axis=1)
    dzx, dzr = p * (a - kl[:, None]), np.exp(lq) - p
    if zx.shape[1] == 1:   # d/dz of f(0, z): the second column
        dzx, dzr = dzx[:, 1:], dzr[:, 1:]
    return np.maximum(kl, 0), dzx, dzr


IMAGE_FLOOR = 1e-6
SCORES = ("classifier", "image")


def _kl_images(a, b, floor=IMAGE_FLOOR):
    """KL(P || Q) per row between images a, b (N, D) >= 0 taken as pixel distributions,
    P = (a + c) / sum(a + c), Q = (b + c) / sum(b + c), c = floor; and its gradients.

    Returns kl (N,), da (N, D) = (log(P / Q) - KL) / A, db (N, D) = (1 - P / Q) / B, with
    A, B the row sums of a + c, b + c. (dKL/dP_i = log(P_i / Q_i) + 1 and
    dP_i/da_j = (delta_ij - P_i) / A, so dKL/da_j = (log(P_j / Q_j) + 1 - sum_i P_i
    (log(P_i / Q_i) + 1)) / A; likewise dKL/dQ_i = -P_i / Q_i with sum_i Q_i P_i / Q_i = 1.)
    """
    a, b = a + floor, b + floor
    sa, sb = a.sum(axis=1, keepdims=True), b.sum(axis=1, keepdims=True)
    p, q = a / sa, b / sb
    lr = np.log(p) - np.log(q)
    kl = np.sum(p * lr, axis=1)
    return np.maximum(kl, 0), (lr - kl[:, None]) / sa, (1 - p / q) / sb


def _check_score(score):
    if score not in SCORES:
        from ..errors import AdvkernError
        raise AdvkernError(f"unknown detection score {score!r}: use one of {SCORES}")


def detection_score(classifier, vae, x, batch_size=500, score="classifier"):
    """Per image (see the module docstring): score 'classifier', S(x) = KL(softmax f(x) ||
    softmax f(r(x))); score 'image', S_img(x) = KL(P_x || P_r(x)) between the pixel
    distributions of x and r(x) (classifier unused, may be None).

    classifier: a Sequential; x: (N, *image) -> (N,) in x's dtype.
    """
    _check_score(score)
    out = []
    for s in range(0, len(x), batch_size):
        xb = x[s: s + batch_size]
        if score == "image":
            out.append(_kl_images(_flat(xb), _flat(reconstruct(vae, xb)))[0])
            continue
        zx = network.forward(classifier, xb)[0]
        zr = network.forward(classifier, reconstruct(vae, xb))[0]
        out.append(_kl_logits(zx, zr)[0])
    return np.concatenate(out).astype(x.dtype, copy=False) if out else np.zeros(0, x.dtype)


def detection_score_grad(classifier, vae, x, y=None, lam=1.0, return_logits=False,
                         score="classifier"):
    """The adaptive attacker's objective J = CE(f(x), y) - lam * S(x) per image and dJ/dx.

    With y None, J = S(x) (lam ignored) and dx = dS/dx. x: (N, *image); y: (N,) labels;
    score: 'classifier' or 'image' (``detection_score``). Returns (J (N,), S (N,),
    dx (N, *image)), dx the gradient of sum_n J_n, and with return_logits the classifier's
    logits f(x) (N, K) as a fourth item.
    S depends on x directly (through f(x), or the pixels of x) and through r = sigmoid(
    dec(mu(x))): classifier score, dS/dx = f'(x)^T dzx + mu'(x)^T dec'(mu)^T (r (1 - r) *
    f'(r)^T dzr), four reference backward passes (classifier twice, decoder, encoder with
    a zero logvar gradient); image score, dS/dx = da + mu'(x)^T dec'(mu)^T (r (1 - r) * db)
    (``_kl_images``), two (decoder, encoder), plus the classifier's for the CE term.
    """
    _check_score(score)
    need_clf = score == "classifier" or y is not None or return_logits
    if need_clf:
        zx, ccx = network.forward(classifier, x)
    mu, logvar, ecache = encode(vae, x)
    logits, dcache = decode_logits(vae, mu)
    r = np.exp(-np.logaddexp(0, -logits)).astype(x.dtype, copy=False)
    if score == "classifier":
        zr, ccr = network.forward(classifier, r.reshape(x.shape))
        s, dzx, dzr = _kl_logits(zx, zr)
    else:
        s, dpix, dr_flat = _kl_images(_flat(x), r)
        dzx = None
    if y is None:
        value, wx = s, dzx
        wr = dzr if score == "classifier" else dr_flat
        wpix = None if score == "classifier" else dpix
    else:
        from .losses import cross_entropy
        ce, dce = cross_entropy(zx, y)
        value = ce - lam * s
        if score == "classifier":
            wx, wr, wpix = dce - lam * dzx, -lam * dzr, None
        else:
            wx, wr, wpix = dce, -lam * dr_flat, -lam * dpix
    if score == "classifier":
        dr, _ = network.backward(classifier, wr.astype(x.dtype, copy=False), ccr,
                                 need_params=False)
        dlog = _flat(dr) * r * (1 - r)
    else:
        dlog = (wr * r * (1 - r)).astype(x.dtype, copy=False)
    dmu, _ = network.backward(vae.decoder, dlog, dcache, need_params=False)
    dh = np.concatenate([dmu, np.zeros_like(logvar)], axis=1)
    dx, _ = network.backward(vae.encoder, dh, ecache, need_params=False)
    if wx is not None:
        dx = dx + network.backward(classifier, wx.astype(x.dtype, copy=False), ccx,
                                   need_params=False)[0]
    if wpix is not None:
        dx = dx + wpix.reshape(x.shape).astype(x.dtype, copy=False)
    value, s = value.astype(x.dtype, copy=False), s.astype(x.dtype, copy=False)
    if return_logits:
        return value, s, dx, zx
    return value, s, dx

