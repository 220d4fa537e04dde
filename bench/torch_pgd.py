"""A plain PyTorch autograd PGD loop on advkern's weights: the framework baseline.

PyTorch is not a dependency of advkern; this module imports it only when asked
(:func:`load`), and the harness skips the baseline with a note when it is missing.
It runs on the CPU (``python -m bench``) or on a CUDA device (``python -m bench --gpu``:
``build(..., device="cuda")``; the inputs come from numpy and the result goes back to it,
as with advkern's engine; :func:`set_tf32` switches TF32 in cuBLAS and cuDNN).
The module is built from the advkern model's own weights (dense w is (in, out), so
``Linear.weight = w.T``; conv weights (F, C, KH, KW) are used as they are; the C-order
flatten of NCHW is the same in both), and the harness checks that its logits equal
advkern's before timing anything.
"""

import numpy as np

THREADS = 2


def load(threads=THREADS):
    """(torch, None) when PyTorch imports, else (None, the reason).

    threads: torch's CPU threads (None: leave torch's default, as the GPU mode does)."""
    try:
        import torch
    except Exception as e:  # ImportError, or a broken install
        return None, f"PyTorch not importable: {e}"
    if threads:
        torch.set_num_threads(threads)
    return torch, None


def tf32_flags(torch):
    """The TF32 switches: {'matmul': cuBLAS float32 GEMMs, 'cudnn': cuDNN convolutions}."""
    return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn": bool(torch.backends.cudnn.allow_tf32)}


def set_tf32(torch, matmul, cudnn):
    """Allow (True) or forbid (False) TF32 in cuBLAS float32 GEMMs and cuDNN convolutions."""
    torch.backends.cuda.matmul.allow_tf32 = bool(matmul)
    torch.backends.cudnn.allow_tf32 = bool(cudnn)


def synchronize(torch, device):
    """Wait for the device's queued work (a no-op on the CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _device(net):
    return next(net.parameters()).device


def build(torch, model, device="cpu"):
    """An eval-mode float32 torch.nn.Sequential computing the advkern model's logits, with
    its parameters on ``device``."""
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
    return net.to(device)


def logits(torch, net, x):
    with torch.no_grad():
        xt = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(_device(net))
        return net(xt).cpu().numpy()


def pgd(torch, net, x, y, eps, alpha, steps, batch):
    """L-inf PGD (no random start), chunks of ``batch`` images; returns x_adv (numpy).

    Per step: x.requires_grad, loss = cross-entropy SUMMED over the batch, its input
    gradient by autograd, x + alpha * sign(grad), projected onto the eps-ball around x0 and
    the [0, 1] box -- the same iteration as advkern's engine.pgd. Runs on the device of the
    net's parameters; each chunk goes there from numpy and its result comes back.
    """
    ce = torch.nn.functional.cross_entropy
    dev = _device(net)
    out = np.empty_like(x, dtype=np.float32)
    for a in range(0, len(x), batch):
        x0 = torch.from_numpy(np.ascontiguousarray(x[a:a + batch], np.float32)).to(dev)
        yt = torch.from_numpy(np.asarray(y[a:a + batch], np.int64)).to(dev)
        xa = x0.clone()
        for _ in range(steps):
            xa.requires_grad_(True)
            loss = ce(net(xa), yt, reduction="sum")
            (g,) = torch.autograd.grad(loss, xa)
            with torch.no_grad():
                xa = torch.minimum(torch.maximum(xa + alpha * g.sign(), x0 - eps), x0 + eps)
                xa = xa.clamp(0.0, 1.0)
        out[a:a + batch] = xa.detach().cpu().numpy()
    return out
