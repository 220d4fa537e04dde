"""A plain PyTorch autograd PGD loop on advkern's weights: the framework baseline.

PyTorch is not a dependency of advkern; this module imports it only when asked
(:func:`load`), and the harness skips the baseline with a note when it is missing.
The module is built from the advkern model's own weights (dense w is (in, out), so
``Linear.weight = w.T``; conv weights (F, C, KH, KW) are used as they are; the C-order
flatten of NCHW is the same in both), and the harness checks that its logits equal
advkern's before timing anything.
"""

import numpy as np

THREADS = 2


def load():
    """(torch, None) when PyTorch imports, else (None, the reason)."""
    try:
        import torch
    except Exception as e:  # ImportError, or a broken install
        return None, f"PyTorch not importable: {e}"
    torch.set_num_threads(THREADS)
    return torch, None


def build(torch, model):
    """An eval-mode float32 torch.nn.Sequential computing the advkern model's logits."""
    nn = torch.nn
    mods = []
    for i, (layer, p) in enumerate(zip(model.layers, model.params)):
        if layer.type == "dense":
            m = nn.Linear(*p["w"].shape)
            m.weight.data = torch.from_numpy(np.ascontiguousarray(p["w"].T, np.float32))
            m.bias.data = torch.from_numpy(np.asarray(p["b"], np.float32).copy())
            mods.append(m)
        elif layer.type == "conv2d":
            t, b, left, r = layer.pads(model.shapes[i])
            sym = t == b and left == r
            if not sym:
                mods.append(nn.ZeroPad2d((left, r, t, b)))
            f, c, kh, kw = p["w"].shape
            m = nn.Conv2d(c, f, (kh, kw), stride=layer.stride, padding=(t, left) if sym else 0)
            m.weight.data = torch.from_numpy(np.asarray(p["w"], np.float32).copy())
            m.bias.data = torch.from_numpy(np.asarray(p["b"], np.float32).copy())
            mods.append(m)
        elif layer.type == "maxpool2d":
            mods.append(nn.MaxPool2d(layer.kernel, layer.stride))
        elif layer.type in ("relu", "tanh", "sigmoid"):
            mods.append({"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[layer.type]())
        elif layer.type == "flatten":
            mods.append(nn.Flatten())
        else:
            raise ValueError(f"no torch equivalent for layer {layer.type!r}")
    net = nn.Sequential(*mods).eval()
    for q in net.parameters():
        q.requires_grad_(False)
    return net


def logits(torch, net, x):
    with torch.no_grad():
        return net(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()


def pgd(torch, net, x, y, eps, alpha, steps, batch):
    """L-inf PGD (no random start), chunks of ``batch`` images; returns x_adv (numpy).

    Per step: x.requires_grad, loss = cross-entropy SUMMED over the batch, its input
    gradient by autograd, x + alpha * sign(grad), projected onto the eps-ball around x0 and
    the [0, 1] box -- the same iteration as advkern's engine.pgd.
    """
    ce = torch.nn.functional.cross_entropy
    out = np.empty_like(x, dtype=np.float32)
    for a in range(0, len(x), batch):
        x0 = torch.from_numpy(np.ascontiguousarray(x[a:a + batch], np.float32))
        yt = torch.from_numpy(np.asarray(y[a:a + batch], np.int64))
        xa = x0.clone()
        for _ in range(steps):
            xa.requires_grad_(True)
            loss = ce(net(xa), yt, reduction="sum")
            (g,) = torch.autograd.grad(loss, xa)
            with torch.no_grad():
                xa = torch.minimum(torch.maximum(xa + alpha * g.sign(), x0 - eps), x0 + eps)
                xa = xa.clamp(0.0, 1.0)
        out[a:a + batch] = xa.detach().numpy()
    return out
