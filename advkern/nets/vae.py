"""Variational autoencoders for the reconstruction-mismatch detector of seed 001.

- ``conv`` (the seed's: the Keras ``variational_autoencoder_deconv`` example, latent
  dimension 2): encoder Conv 32 3x3 s2 'same' -> ReLU -> Conv 64 3x3 s2 'same' -> ReLU ->
  Flatten -> Dense 16 -> ReLU -> Dense 2L; decoder Dense 7*7*64 -> ReLU -> Reshape (64, 7, 7)
  -> ConvT 64 3x3 s2 'same' -> ReLU -> ConvT 32 3x3 s2 'same' -> ReLU -> ConvT 1 3x3 s1
  'same' -> Flatten (784 Bernoulli logits). ``filters`` sets the two conv widths (32, 64)
  above; the cached recipe uses (16, 32) (see ``VAE_RECIPES``).
- ``dense`` (the Keras ``variational_autoencoder`` MLP example): 784 -> hidden -> ReLU ->
  2L; decoder L -> hidden -> ReLU -> 784 (recipe: hidden 512, L = 16).

The math (reparameterization, KL, BCE from logits, the detection score) is in
``advkern.reference.vae``. ``pretrained_vae(kind)`` trains with Adam on the bundled train
split (seeded) on first use and caches one .npz under ``$ADVKERN_CACHE`` like
``nets.zoo`` (key: kind, recipe, seed, library version; atomic replace).
"""

import hashlib
import json
import os
import sys
import time

import numpy as np

from .._progress import Progress
from .._validate import check_int
from ..errors import AdvkernError, ModelFileError
from .layers import Conv2D, Conv2DTranspose, Dense, Flatten, ReLU, Reshape
from .model import Sequential

MNIST_SHAPE = (1, 28, 28)


class VAE:
    """An encoder (image -> 2L: mu, logvar) and a decoder (L -> D Bernoulli logits).

    encoder, decoder: Sequentials; latent: L. ``kind`` and ``recipe`` are kept for the file.
    """

    def __init__(self, encoder, decoder, latent, kind=None):
        self.encoder, self.decoder = encoder, decoder
        self.latent = check_int(latent, "latent")
        self.kind = kind
        if encoder.shapes[-1] != (2 * self.latent,):
            raise AdvkernError(f"the encoder must output 2 * latent = {2 * self.latent} "
                               f"values (mu, logvar), got {encoder.shapes[-1]}")
        if decoder.input_shape != (self.latent,):
            raise AdvkernError(f"the decoder must take (latent,) = ({self.latent},), got "
                               f"{decoder.input_shape}")
        if decoder.shapes[-1] != (int(np.prod(encoder.input_shape)),):
            raise AdvkernError(f"the decoder must output prod(image) = "
                               f"{int(np.prod(encoder.input_shape))} logits, got "
                               f"{decoder.shapes[-1]}")

    @property
    def input_shape(self):
        return self.encoder.input_shape

    @property
    def params(self):
        """Encoder then decoder per-layer parameter dicts (what the optimizer steps)."""
        return self.encoder.params + self.decoder.params

    @property
    def num_params(self):
        return self.encoder.num_params + self.decoder.num_params

    def astype(self, dtype):
        return VAE(self.encoder.astype(dtype), self.decoder.astype(dtype), self.latent,
                   self.kind)

    def copy(self):
        return VAE(self.encoder.copy(), self.decoder.copy(), self.latent, self.kind)

    def reconstruct(self, x):
        from ..reference.vae import reconstruct
        return reconstruct(self, self.encoder.check_input(x))

    def __repr__(self):
        return f"VAE(kind={self.kind!r}, latent={self.latent}, params={self.num_params})"


def build_vae(kind="conv", latent=2, seed=0, input_shape=MNIST_SHAPE, filters=(32, 64),
              hidden=512, dtype="float32"):
    """A freshly initialised VAE (seeded He/Glorot). kind: 'conv' (28x28 inputs) or 'dense'."""
    latent = check_int(latent, "latent")
    d = int(np.prod(input_shape))
    if kind == "conv":
        c, h, w = input_shape
        if h % 4 or w % 4:
            raise AdvkernError(f"the conv VAE needs H and W divisible by 4, got {input_shape}")
        f1, f2 = (check_int(f, "filters") for f in filters)
        enc = [Conv2D(f1, 3, 2, "same"), ReLU(), Conv2D(f2, 3, 2, "same"), ReLU(), Flatten(),
               Dense(16), ReLU(), Dense(2 * latent)]
        dec = [Dense(f2 * (h // 4) * (w // 4)), ReLU(), Reshape((f2, h // 4, w // 4)),
               Conv2DTranspose(f2, 3, 2, "same"), ReLU(), Conv2DTranspose(f1, 3, 2, "same"),
               ReLU(), Conv2DTranspose(c, 3, 1, "same"), Flatten()]
    elif kind == "dense":
        hidden = check_int(hidden, "hidden")
        enc = [Flatten(), Dense(hidden), ReLU(), Dense(2 * latent)]
        dec = [Dense(hidden), ReLU(), Dense(d)]
    else:
        raise AdvkernError(f"unknown VAE kind {kind!r}: use 'conv' or 'dense'")
    encoder = Sequential(enc, input_shape, name=f"vae-{kind}-encoder", seed=seed, dtype=dtype)
    decoder = Sequential(dec, (latent,), name=f"vae-{kind}-decoder", seed=seed + 1,
                         dtype=dtype)
    return VAE(encoder, decoder, latent, kind)


# Adam, cosine decay, batch 64 on the bundled 4,000-image train split (seed 0). The conv
# widths are half the Keras example's (32, 64): its transposed convolutions cost ~12 MFLOP
# per image forward, 4x what (16, 32) costs, on a CPU shared by the training loop.
# The dense variant's latent is 16, not 2: on 4,000 images a 2-d latent reconstructs about
# half the test digits as another class (measured: 52% of reconstructions classified as
# the input's label by the mlp, dense VAE, 8 epochs), which the score reads as an attack.
VAE_RECIPES = {
    "conv": {"latent": 2, "filters": [16, 32], "epochs": 24, "lr": 2e-3, "batch_size": 64},
    "dense": {"latent": 16, "hidden": 512, "epochs": 20, "lr": 2e-3, "batch_size": 64},
}
# The demo's (quick) dense VAE: smaller and shorter, to train within its time budget.
QUICK_RECIPES = {"dense": {"epochs": 10}}


def train_vae(vae, x, *, epochs=30, lr=2e-3, batch_size=64, seed=0, progress=None,
              label="training vae"):
    """Train a copy of ``vae`` on images x (N, *image) in [0, 1] with Adam (cosine decay),
    minimising the mean negative ELBO per image. The caller's vae and x are not modified.

    Each epoch visits x in a seeded random order; eps ~ N(0, I) comes from the same seeded
    generator, so a seed gives the same weights. Returns (vae, history) with history a list
    of per-epoch dicts (epoch, loss, rec, kl, seconds), losses in nats per image.
    """
    from ..reference.vae import neg_elbo
    from .train import Adam

    x = vae.encoder.check_input(x)
    epochs, batch_size = check_int(epochs, "epochs"), check_int(batch_size, "batch_size")
    vae = vae.astype(x.dtype) if vae.encoder.dtype != x.dtype else vae.copy()
    rng = np.random.default_rng(seed)
    opt = Adam(lr=lr)
    steps = -(-len(x) // batch_size)
    total, step, history = epochs * steps, 0, []
    with Progress(total, label, enabled=progress) as bar:
        for epoch in range(epochs):
            t0 = time.perf_counter()
            order = rng.permutation(len(x))
            sums = np.zeros(3)
            for s in range(0, len(x), batch_size):
                xb = x[order[s: s + batch_size]]
                eps = rng.standard_normal((len(xb), vae.latent)).astype(x.dtype)
                out = neg_elbo(vae, xb, eps)
                loss = float(out["loss"].mean())
                if not np.isfinite(loss):
                    raise AdvkernError(f"VAE training diverged at epoch {epoch + 1} (loss "
                                       f"{loss}): lower the learning rate")
                n = len(xb)
                grads = [{k: a / n for k, a in g.items()}
                         for g in out["enc_grads"] + out["dec_grads"]]
                opt.lr = lr * 0.5 * (1 + np.cos(np.pi * step / total))
                opt.step(vae.params, grads)
                step += 1
                sums += [out["loss"].sum(), out["rec"].sum(), out["kl"].sum()]
                bar.update(1, epoch=epoch + 1, loss=loss)
            history.append({"epoch": epoch + 1, "loss": sums[0] / len(x),
                            "rec": sums[1] / len(x), "kl": sums[2] / len(x),
                            "seconds": time.perf_counter() - t0})
    return vae, history


# ----------------------------------------------------------------------------- files

_META = "__advkern_vae__"


def save_vae(vae, path):
    """One .npz: the two model configs and the latent size as JSON, arrays as
    ``encoder.layer{i}.{name}`` / ``decoder.layer{i}.{name}`` (no pickles)."""
    arrays = {f"{part}.layer{i}.{k}": a for part, m in (("encoder", vae.encoder),
                                                        ("decoder", vae.decoder))
              for i, p in enumerate(m.params) for k, a in p.items()}
    meta = json.dumps({"format": 1, "kind": vae.kind, "latent": vae.latent,
                       "encoder": vae.encoder.config(), "decoder": vae.decoder.config()})
    with open(path, "wb") as f:
        np.savez_compressed(f, **{_META: np.array(meta)}, **arrays)
    return path


def load_vae(path):
    """Read a file written by ``save_vae``; a defect is a ModelFileError naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            files = dict(z.items())
        meta = json.loads(str(files.pop(_META)))
        parts = {}
        for part in ("encoder", "decoder"):
            cfg = meta[part]
            params = [{} for _ in cfg["layers"]]
            for key, a in files.items():
                p, layer, name = key.split(".", 2)
                if p == part:
                    params[int(layer[5:])][name] = a
            parts[part] = Sequential.from_config(cfg, params)
        return VAE(parts["encoder"], parts["decoder"], meta["latent"], meta.get("kind"))
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ModelFileError(f"{path}: not a readable advkern VAE file ({e})") from None


def vae_cache_path(kind, seed=0, **recipe):
    from .. import __version__
    from .zoo import cache_dir
    key = json.dumps({"name": f"vae-{kind}", "seed": seed,
                      "recipe": {**VAE_RECIPES[kind], **recipe}, "version": __version__},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / f"vae-{kind}-s{seed}-{digest}.npz"


def pretrained_vae(kind="conv", seed=0, progress=None, refresh=False, x=None, **recipe):
    """A VAE of ``kind`` trained on the bundled train split (cached). Returns (vae, info):
    info {path, cached (bool), seconds (training time, 0 when loaded), history}.

    recipe overrides ``VAE_RECIPES[kind]`` (latent, filters / hidden, epochs, lr,
    batch_size; all part of the cache key). x: train on these images instead of the bundled
    split (not cached).
    """
    if kind not in VAE_RECIPES:
        raise AdvkernError(f"unknown VAE kind {kind!r}: use one of {sorted(VAE_RECIPES)}")
    r = {**VAE_RECIPES[kind], **recipe}
    arch = {k: r[k] for k in ("latent", "filters", "hidden") if k in r}
    fit = {k: r[k] for k in ("epochs", "lr", "batch_size")}
    path = None if x is not None else vae_cache_path(kind, seed, **recipe)
    if path is not None and path.exists() and not refresh:
        return load_vae(path), {"path": str(path), "cached": True, "seconds": 0.0,
                                "history": []}
    if x is None:
        from .datasets import load_mnist
        x, _ = load_mnist("train")
        if progress is not False:
            print(f"advkern: training the {kind} VAE on first use (cached at {path})",
                  file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    vae, hist = train_vae(build_vae(kind, seed=seed, input_shape=x.shape[1:], **arch), x,
                          seed=seed, progress=progress, label=f"training {kind} vae", **fit)
    seconds = time.perf_counter() - t0
    if path is not None:
        tmp = path.with_suffix(".tmp.npz")
        save_vae(vae, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees a half-written file
    return vae, {"path": None if path is None else str(path), "cached": False,
                 "seconds": seconds, "history": hist}
