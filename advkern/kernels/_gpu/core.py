"""The GPU backends' shared driver: every contract primitive written once over ``xp`` (CuPy on
a GPU; NumPy under the Numba CUDA simulator) and an ``ops`` module of custom kernels (the
interface is documented in ``advkern.kernels._gpu``).

GEMMs are ``xp.matmul`` (cuBLAS on a GPU; CuPy never uses TF32 unless ``CUPY_TF32=1`` is
set, and the GPU backends refuse to start when it is, so float32 GEMMs round like the
reference's); conv layers are im2col + one batched GEMM per layer, NCHW throughout, so the
weights keep the reference's layout and only a reshape separates a conv weight from its GEMM
operand. Arrays stay on the device for a whole attack: every primitive takes and returns
device arrays (host arrays are accepted and copied in), and the driver reads a value back to
the host only where the contract returns one (``param_grads``' mean loss) or an error must be
raised (NaN/Inf in a step's inputs: one device-wide check per step).

Scratch: intermediates (im2col columns, activations of a pass) come from CuPy's memory pool,
which after the first pass of a size hands back the same blocks without a cudaMalloc; the
arrays a primitive returns are fresh (the engine may keep any of them). Work that would not
fit (the DE scoring of N*P candidates, a Jacobian of N*R rows, a large batch) is chunked by
rows to a byte budget; an out-of-memory error halves the chunk and the work goes on.
"""

import math

import numpy as np

from ...errors import AdvkernError, ShapeError
from ...reference.projections import check_sparsity, per_sample_eps
from ..._validate import check_box
from ..contract import check_step_arrays, composed_momentum_step, composed_pgd_step

_ACTS = ("relu", "tanh", "sigmoid")
# Bytes of scratch one chunk of rows may use (the H200 has 141 GB; chunks this size keep
# every kernel launch far past its overhead while leaving the pool room for the caller).
_CHUNK_BYTES = 4 << 30


class _Stage:
    """One fused step of the forward pass: a layer with parameters followed by its activation,
    or a parameter-free layer. ``first``: the model layer index of its parameters."""

    def __init__(self, kind, first, in_shape, out_shape, act="none", **kw):
        self.kind, self.first, self.act = kind, first, act
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.__dict__.update(kw)


class GpuNet:
    """A Sequential on the device: weights in ``dtype`` in the reference layout (dense w
    (D, M), conv w as its (F, C*KH*KW) GEMM operand), and the fused stages.

    Read-only after construction; ``variant(dtype)`` gives (and caches) the same model in
    another dtype for inputs of that dtype.
    """

    def __init__(self, model, dtype, xp):
        dtype = np.dtype(dtype)
        self.xp = xp
        self.model = model.astype(dtype) if model.dtype != dtype else model
        self.dtype = dtype
        self.layers = self.model.layers
        self.shapes = self.model.shapes
        self.input_shape = tuple(self.model.input_shape)
        self.num_logits = self.model.num_logits
        self.num_classes = self.model.num_classes
        self.in_dim = int(np.prod(self.input_shape))
        self._variants = {dtype: self}
        self.stages = self._build()
        # Scratch elements one row needs over a pass (activations and im2col columns):
        # sizes the chunks.
        self.row_scratch = sum(getattr(st, "cols", 0) + int(np.prod(st.out_shape))
                               for st in self.stages) + self.in_dim

    def _build(self):
        xp, dt = self.xp, self.dtype
        stages = []
        layers, shapes, params = self.layers, self.shapes, self.model.params
        i = 0
        while i < len(layers):
            layer, src, dst = layers[i], shapes[i], shapes[i + 1]
            nxt = layers[i + 1].type if i + 1 < len(layers) else None
            act = nxt if nxt in _ACTS else "none"
            if layer.type == "dense":
                p = params[i]
                stages.append(_Stage("dense", i, src, dst, act,
                                     w=xp.asarray(np.ascontiguousarray(p["w"], dtype=dt)),
                                     b=xp.asarray(np.ascontiguousarray(p["b"], dtype=dt))))
                i += 2 if act != "none" else 1
            elif layer.type == "conv2d":
                p = params[i]
                f, c, kh, kw = p["w"].shape
                pt, _, pl, _ = layer.pads(src)
                stages.append(_Stage(
                    "conv", i, src, dst, act, kh=kh, kw=kw, sh=layer.stride[0],
                    sw=layer.stride[1], pt=pt, pl=pl, ho=dst[1], wo=dst[2], cols=c * kh * kw
                    * dst[1] * dst[2], w=xp.asarray(np.ascontiguousarray(
                        p["w"].reshape(f, c * kh * kw), dtype=dt)),
                    b=xp.asarray(np.ascontiguousarray(p["b"], dtype=dt))))
                i += 2 if act != "none" else 1
            elif layer.type == "maxpool2d":
                stages.append(_Stage("pool", i, src, dst, kh=layer.kernel[0],
                                     kw=layer.kernel[1], sh=layer.stride[0],
                                     sw=layer.stride[1]))
                i += 1
            elif layer.type in _ACTS:
                stages.append(_Stage("act", i, src, dst, layer.type))
                i += 1
            elif layer.type == "flatten":
                stages.append(_Stage("flatten", i, src, dst))
                i += 1
            elif layer.type == "maxout":
                stages.append(_Stage("maxout", i, src, dst, k=layer.pieces))
                i += 1
            elif layer.type == "rbf":
                c = np.ascontiguousarray(params[i]["c"], dtype=dt)
                beta = np.exp(np.asarray(params[i]["log_beta"], dtype=dt))
                stages.append(_Stage("rbf", i, src, dst, c=xp.asarray(c), beta=xp.asarray(beta),
                                     cnorm=xp.asarray(np.sum(c * c, axis=1))))
                i += 1
            else:
                raise AdvkernError(f"the GPU backends do not support layer type {layer.type!r}")
        return stages

    def variant(self, dtype):
        dtype = np.dtype(dtype)
        if dtype not in self._variants:
            other = GpuNet(self.model, dtype, self.xp)
            other._variants = self._variants
            self._variants[dtype] = other
        return self._variants[dtype]


class GpuBackend:
    """The contract's primitives over one array module and one ops module.

    xp: cupy (or numpy under the simulator); ops: the custom kernels; oom: the exception
    types an allocation raises when the device is full.
    """

    def __init__(self, xp, ops, oom=(MemoryError,), chunk_bytes=_CHUNK_BYTES):
        self.xp, self.ops, self.oom = xp, ops, tuple(oom)
        self.chunk_bytes = int(chunk_bytes)

    # ------------------------------------------------------------------ data movement

    def to_device(self, a, dtype=None):
        xp = self.xp
        if xp is np:
            return np.array(a, dtype=dtype, copy=True)
        return xp.array(a, dtype=dtype, copy=True)

    def to_host(self, a):
        if isinstance(a, np.ndarray):
            return a
        get = getattr(a, "get", None)
        return get() if get is not None else np.asarray(a)

    def _dev(self, a, dtype=None):
        """a as a C-contiguous device array (a copy only when it is not one already)."""
        return self.xp.ascontiguousarray(self.xp.asarray(a, dtype=dtype))

    def prepare(self, model, dtype):
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise AdvkernError(f"dtype must be float32 or float64, got {dtype}")
        return GpuNet(model, dtype, self.xp)

    # ------------------------------------------------------------------ checks

    def _batch(self, net, x):
        """(net variant of x's dtype, x as a contiguous device array (N, *input_shape))."""
        xp = self.xp
        x = xp.asarray(x)
        if x.dtype not in (np.float32, np.float64):
            raise AdvkernError(f"x must be a float32 or float64 array, got dtype {x.dtype}")
        want = net.input_shape
        if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want:
            raise ShapeError(f"x must have shape (N, {', '.join(map(str, want))}), "
                             f"got {tuple(x.shape)}")
        return net.variant(x.dtype), xp.ascontiguousarray(x)

    def _labels(self, labels, n, k):
        """Labels as a device int64 (n,) array. Host labels are range-checked; device labels
        are taken as the engine's own (checked on the host before they moved), so that an
        attack step needs no host read."""
        xp = self.xp
        on_host = isinstance(labels, (np.ndarray, list, tuple))
        y = xp.asarray(labels)
        if y.shape != (n,) or (y.size and y.dtype.kind not in "iu"):
            raise ShapeError(f"labels must be an integer array of shape ({n},), got "
                             f"{y.dtype} {tuple(y.shape)}")
        y = xp.ascontiguousarray(y, dtype=np.int64)
        classes = max(k, 2)
        if y.size and on_host:
            lo, hi = int(np.min(labels)), int(np.max(labels))
            if lo < 0 or hi >= classes:
                raise AdvkernError(f"labels must be in [0, {classes}), got values in "
                                   f"[{lo}, {hi}]")
        return y

    @staticmethod
    def _loss_kind(loss):
        if loss in ("ce", "cw"):
            return loss
        raise AdvkernError(f"unknown loss {loss!r}: use one of ['ce', 'cw']")

    def _nonfinite(self, pairs):
        """Raise the reference's error for the first of (array, name) holding NaN/Inf.

        One fused device pass over the (same-size) arrays and one host read; the per-array
        counts only on failure."""
        xp = self.xp
        arrays = [a for a, _ in pairs]
        if not arrays[0].size or not int(self.ops.count_nonfinite(*arrays)[0]):
            return
        for a, name in pairs:
            nb = int(a.size - int(xp.count_nonzero(xp.isfinite(a))))
            if nb:
                raise AdvkernError(f"{name} contains {nb} NaN/Inf value(s)")

    # ------------------------------------------------------------------ chunking

    def _chunks(self, n, row_bytes, fn):
        """Call fn(a, b) over [0, n) in chunks of at most chunk_bytes of scratch; an
        out-of-memory error halves the chunk and retries it (nothing is lost: fn writes
        only its own rows)."""
        size = max(1, int(self.chunk_bytes // max(row_bytes, 1)))
        a = 0
        while a < n:
            b = min(n, a + size)
            try:
                fn(a, b)
            except self.oom:
                if size == 1:
                    raise
                size = max(1, size // 2)
                self._free_pool()
                continue
            a = b

    def _free_pool(self):
        free = getattr(self.xp, "get_default_memory_pool", None)
        if free is not None:
            free().free_all_blocks()

    # ------------------------------------------------------------------ forward / backward

    def _forward(self, net, h, keep=False, params=False, start=0):
        """Run the stages from ``start`` on h (N, *shape). Returns (logits (N, K), saved):
        saved[i] holds what stage i's backward needs (keep) and, with params, the inputs
        of the parameter layers (dense input, conv columns)."""
        xp, ops = self.xp, self.ops
        n = h.shape[0]
        saved = [None] * len(net.stages)
        for i in range(start, len(net.stages)):
            st = net.stages[i]
            if st.kind in ("dense", "conv"):
                out, operand = self._linear(net, st, h, st.act)
                if keep:
                    saved[i] = (operand if params else None, out)
                h = out if st.kind == "dense" else out.reshape((n,) + st.out_shape)
            elif st.kind == "pool":
                c, hh, ww = st.in_shape
                _, ho, wo = st.out_shape
                out = xp.empty((n, c, ho, wo), net.dtype)
                arg = xp.empty((n, c, ho, wo), np.int32)
                ops.maxpool_fwd(h.reshape(n, c, hh, ww), st.kh, st.kw, st.sh, st.sw, out, arg)
                if keep:
                    saved[i] = arg
                h = out
            elif st.kind == "act":
                out = xp.ascontiguousarray(h).copy()
                ops.bias_act(out, None, 1, st.act)
                if keep:
                    saved[i] = out
                h = out
            elif st.kind == "maxout":
                # plain xp: one reduction over (N, M, k), O(activations) next to the GEMMs
                g = h.reshape(n, -1, st.k)
                out = xp.max(g, axis=2)
                if keep:
                    saved[i] = xp.argmax(g, axis=2)  # the first max, as the reference
                h = out
            elif st.kind == "rbf":
                # ||x||^2 - 2 x.c + ||c||^2 clamped at 0, as reference.layers.rbf_forward
                h2 = h.reshape(n, -1)
                raw = xp.sum(h2 * h2, axis=1)[:, None] - 2 * xp.matmul(h2, st.c.T) + st.cnorm
                out = xp.exp(-st.beta * xp.maximum(raw, 0))
                if keep:
                    saved[i] = (h2, out, raw)
                h = out
            else:  # flatten
                h = h.reshape((n,) + st.out_shape)
        return h.reshape(n, -1), saved

    def _linear(self, net, st, h, act):
        """A dense or conv stage on h: (output with bias and ``act`` applied, the GEMM's
        input operand: the dense input (N, D) or the conv columns (N, C*KH*KW, HO*WO)).
        Conv output (N, F, HO*WO), NCHW."""
        xp, ops = self.xp, self.ops
        n = h.shape[0]
        if st.kind == "dense":
            h2 = h.reshape(n, -1)
            out = xp.matmul(h2, st.w)
            ops.bias_act(out, st.b, 1, act)
            return out, h2
        c, hh, ww = st.in_shape
        cols = xp.empty((n, st.w.shape[1], st.ho * st.wo), net.dtype)
        ops.im2col(h.reshape(n, c, hh, ww), st.kh, st.kw, st.sh, st.sw, st.pt, st.pl, st.ho,
                   st.wo, cols)
        out = xp.matmul(st.w, cols)
        ops.bias_act(out, st.b, st.ho * st.wo, act)
        return out, cols

    def _backward(self, net, d, saved, need_dx=True, grads=None, stop=0):
        """d (N, K) -> dx (N, D) (None when not need_dx); grads: a list to fill with the
        parameter gradients (of whatever d is the gradient of) per model layer."""
        xp, ops = self.xp, self.ops
        n = d.shape[0]
        for i in range(len(net.stages) - 1, stop - 1, -1):
            st = net.stages[i]
            last = i == stop and not need_dx
            if st.kind == "dense":
                h_in, out = saved[i]
                d = xp.ascontiguousarray(d.reshape(out.shape))
                if st.act != "none":
                    ops.act_grad(d, out, st.act)
                if grads is not None:
                    grads[st.first] = {"w": xp.matmul(h_in.T, d), "b": d.sum(axis=0)}
                d = None if last else xp.matmul(d, st.w.T)
            elif st.kind == "conv":
                cols, out = saved[i]
                d = xp.ascontiguousarray(d.reshape(out.shape))
                if st.act != "none":
                    ops.act_grad(d, out, st.act)
                if grads is not None:
                    dw = xp.tensordot(d, cols, axes=([0, 2], [0, 2]))     # (F, CKK)
                    shape = net.model.params[st.first]["w"].shape
                    grads[st.first] = {"w": dw.reshape(shape), "b": d.sum(axis=(0, 2))}
                if last:
                    d = None
                    continue
                dcols = xp.matmul(st.w.T, d)                    # (N, CKK, HO*WO)
                c, hh, ww = st.in_shape
                dx = xp.empty((n, c, hh, ww), net.dtype)
                ops.col2im(dcols, hh, ww, st.kh, st.kw, st.sh, st.sw, st.pt, st.pl, st.ho,
                           st.wo, dx)
                d = dx
            elif st.kind == "pool":
                c, hh, ww = st.in_shape
                dx = xp.empty((n, c, hh, ww), net.dtype)
                ops.maxpool_bwd(xp.ascontiguousarray(d.reshape((n,) + st.out_shape)), saved[i],
                                st.kh, st.kw, st.sh, st.sw, dx)
                d = dx
            elif st.kind == "maxout":
                arg = saved[i]
                d = d.reshape(arg.shape)
                d = xp.where(xp.arange(st.k) == arg[..., None], d[..., None], 0) \
                    .astype(net.dtype, copy=False).reshape(n, -1)
            elif st.kind == "rbf":
                h_in, out, raw = saved[i]
                d = d.reshape(out.shape)
                e = xp.where(raw > 0, -st.beta * d * out, 0).astype(net.dtype, copy=False)
                if grads is not None:
                    grads[st.first] = {"c": 2 * (e.sum(axis=0)[:, None] * st.c
                                                 - xp.matmul(e.T, h_in)),
                                       "log_beta": (e * xp.maximum(raw, 0)).sum(axis=0)}
                d = None if last else 2 * (e.sum(axis=1)[:, None] * h_in - xp.matmul(e, st.c))
            elif st.kind == "act":
                d = xp.ascontiguousarray(d.reshape(saved[i].shape)).copy()
                ops.act_grad(d, saved[i], st.act)
            else:
                d = d.reshape((n,) + st.in_shape)
        return None if d is None else d.reshape(n, -1)

    def _loss(self, z, y, loss, want_grad=True):
        xp = self.xp
        values = xp.empty(z.shape[0], z.dtype)
        dz = xp.empty_like(z) if want_grad else None
        if z.shape[0]:
            (self.ops.cw_margin if loss == "cw" else self.ops.softmax_xent)(z, y, values, dz)
        return values, dz

    def _row_bytes(self, net, factor=1):
        return factor * (2 * net.row_scratch + net.in_dim) * net.dtype.itemsize

    # ------------------------------------------------------------------ network primitives

    def _mapped(self, n, row_bytes, fn, empty):
        """fn(a, b) -> a tuple of arrays with rows [a, b), over chunks of [0, n); the parts
        joined along rows (no copy when one chunk holds the batch, the usual case)."""
        parts = []
        self._chunks(n, row_bytes, lambda a, b: parts.append(fn(a, b)))
        if not parts:
            return empty()
        if len(parts) == 1:
            return parts[0]
        return tuple(self.xp.concatenate(col) for col in zip(*parts))

    def logits(self, net, x):
        net, x = self._batch(net, x)
        xp = self.xp
        return self._mapped(len(x), self._row_bytes(net),
                            lambda a, b: (self._forward(net, x[a:b])[0],),
                            lambda: (xp.empty((0, net.num_logits), net.dtype),))[0]

    def loss_grad(self, net, x, labels, loss):
        loss = self._loss_kind(loss)
        net, x = self._batch(net, x)
        n = len(x)
        y = self._labels(labels, n, net.num_logits)
        xp = self.xp

        def work(a, b):
            zc, saved = self._forward(net, x[a:b], keep=True)
            v, dz = self._loss(zc, y[a:b], loss)
            return v, self._backward(net, dz, saved), zc

        values, dx, z = self._mapped(
            n, self._row_bytes(net, 2), work,
            lambda: (xp.empty(0, net.dtype), xp.empty((0, net.in_dim), net.dtype),
                     xp.empty((0, net.num_logits), net.dtype)))
        return values, dx.reshape(x.shape), z

    def jacobian(self, net, x, seeds=None):
        net, x = self._batch(net, x)
        xp = self.xp
        n, k, d = len(x), net.num_logits, net.in_dim
        if seeds is None:
            r = k
            eye = xp.eye(k, dtype=net.dtype)
        else:
            seeds = self._dev(seeds, net.dtype)
            if seeds.ndim != 3 or seeds.shape[0] != n or seeds.shape[2] != k:
                raise ShapeError(f"seeds must have shape ({n}, R, {k}), got "
                                 f"{tuple(seeds.shape)}")
            r = seeds.shape[1]
        jac = xp.empty((n, r, d), net.dtype)
        z = xp.empty((n, k), net.dtype)

        def work(a, b):
            m = b - a
            # One forward per image, then a backward of m*r rows seeded with the r rows:
            # the saved activations are repeated r times (a gather, cheaper than r forwards).
            zc, saved = self._forward(net, x[a:b], keep=True)
            z[a:b] = zc
            rep = [None if s is None else self._repeat_saved(s, r) for s in saved]
            # a fresh array: the backward works on its seed in place
            g = xp.tile(eye, (m, 1)) if seeds is None else seeds[a:b].reshape(m * r, k).copy()
            jac[a:b] = self._backward(net, g, rep).reshape(m, r, d)
        self._chunks(n, self._row_bytes(net, 2 * (1 + r)), work)
        return jac, z

    def _repeat_saved(self, s, r):
        xp = self.xp
        if isinstance(s, tuple):
            return tuple(None if a is None else xp.repeat(a, r, axis=0) for a in s)
        return xp.repeat(s, r, axis=0)

    def param_grads(self, net, x, labels, loss):
        loss = self._loss_kind(loss)
        net, x = self._batch(net, x)
        xp = self.xp
        n = len(x)
        y = self._labels(labels, n, net.num_logits)
        total = [None] * len(net.layers)
        vsum = xp.zeros((), np.float64)

        def work(a, b):
            nonlocal vsum
            zc, saved = self._forward(net, x[a:b], keep=True, params=True)
            v, dz = self._loss(zc, y[a:b], loss)
            dz /= n  # the reference divides the gradient of the sum by N before the backward
            part = [None] * len(net.layers)
            self._backward(net, dz, saved, need_dx=False, grads=part)
            for i, g in enumerate(part):
                if g is not None:
                    total[i] = g if total[i] is None else \
                        {kk: total[i][kk] + g[kk] for kk in g}
            vsum = vsum + v.sum(dtype=np.float64)
        self._chunks(n, self._row_bytes(net, 3), work)
        grads = []
        for i, layer in enumerate(net.layers):
            if total[i] is None:
                shapes = net.model.params[i]
                grads.append({kk: np.zeros(a.shape, net.dtype) for kk, a in shapes.items()})
            else:
                grads.append({kk: self.to_host(a).astype(net.dtype, copy=False)
                              for kk, a in total[i].items()})
        mean = float(vsum) / n if n else float("nan")
        return mean, grads

    # ------------------------------------------------------------------ steps

    def _step_args(self, xa, g, x0, eps, alpha, lo, hi, active, kind):
        xp = self.xp
        xa, g, x0, act = check_step_arrays(xa, g, x0, active, lambda a, name: xp.asarray(a))
        dt = x0.dtype
        n = x0.shape[0]
        d = int(np.prod(x0.shape[1:], dtype=np.int64))
        # L-inf steps round eps and alpha to the array dtype (the reference's clip bounds
        # x0 +- eps are in it); the L2 / L1 steps use them in float64, as the reference does.
        pdt = dt if kind == "linf" else np.dtype(np.float64)
        e = self._per_image(eps, n, "eps", pdt)
        a = self._per_image(alpha, n, "alpha", pdt)
        lo, hi = check_box((lo, hi))
        xa2, g2, x02 = (xp.ascontiguousarray(v.reshape(n, d)) for v in (xa, g, x0))
        self._nonfinite(((g2, "g"), (xa2, "xa"), (x02, "x0")))
        return xa2, g2, x02, e, a, float(lo), float(hi), \
            xp.ascontiguousarray(act, dtype=bool), x0.shape

    def _per_image(self, v, n, name, dt):
        """eps / alpha as a (n,) device array in dt; host values are checked as the
        reference checks them, device arrays (the engine's, already checked) are taken."""
        xp = self.xp
        if xp is not np and isinstance(v, xp.ndarray):
            if v.shape != (n,):
                raise ShapeError(f"{name} must be a number or an array of shape ({n},), got "
                                 f"shape {tuple(v.shape)}")
            return xp.ascontiguousarray(v, dtype=dt)
        return xp.asarray(per_sample_eps(v, n, name=name).astype(dt))

    def _fused_step(self, kind, xa, g, x0, eps, alpha, lo, hi, active):
        """The one-kernel steps: ops.linf_step / ops.l2_step on the checked arguments."""
        xa, g, x0, e, a, lo, hi, act, shape = self._step_args(xa, g, x0, eps, alpha, lo, hi,
                                                              active, kind)
        out = self.xp.empty_like(xa)
        if out.size:
            getattr(self.ops, f"{kind}_step")(xa, g, x0, e, a, lo, hi, act, out)
        return out.reshape(shape)

    def linf_step(self, xa, g, x0, eps, alpha, lo, hi, active):
        return self._fused_step("linf", xa, g, x0, eps, alpha, lo, hi, active)

    def l2_step(self, xa, g, x0, eps, alpha, lo, hi, active):
        return self._fused_step("l2", xa, g, x0, eps, alpha, lo, hi, active)

    def l1_step(self, xa, g, x0, eps, alpha, lo, hi, active, sparsity):
        """SLIDE's sparse step, then Duchi's exact L1 projection, then the box: written with
        xp (two per-row sorts, CuPy's segmented radix sort on a GPU), every reduction in
        float64 as in the reference."""
        q = check_sparsity(sparsity)
        xa, g, x0, e, a, lo, hi, act, shape = self._step_args(xa, g, x0, eps, alpha, lo, hi,
                                                              active, "l1")
        xp = self.xp
        n, d = xa.shape
        if xa.size == 0:
            return xa.copy().reshape(shape)
        dt = xa.dtype
        g64 = g.astype(np.float64)
        m = xp.abs(g64)
        m[((xa <= lo) & (g64 < 0)) | ((xa >= hi) & (g64 > 0))] = 0.0
        # np.quantile 'linear': position q (d - 1) in the sorted row, interpolated as numpy's
        # _lerp does (a + (b - a) t, and b - (b - a) (1 - t) when t >= 0.5).
        srt = xp.sort(m, axis=1)
        pos = q * (d - 1)
        lo_i = int(math.floor(pos))
        hi_i = min(lo_i + 1, d - 1)
        t = pos - lo_i
        va, vb = srt[:, lo_i], srt[:, hi_i]
        diff = vb - va
        r = vb - diff * (1 - t) if t >= 0.5 else va + diff * t
        r = xp.where(va == vb, va, r)
        keep = (m >= r[:, None]) & (m > 0)
        count = keep.sum(axis=1)
        scale = xp.where(count > 0, a.astype(np.float64) / xp.maximum(count, 1), 0.0)
        step = (xp.sign(g64) * keep * scale[:, None]).astype(dt)
        new = xa + step
        # Duchi et al. 2008 on delta = new - x0 (float64), then x0 + P(delta), then the box.
        v = (new - x0).astype(np.float64)
        av = xp.abs(v)
        e64 = e.astype(np.float64)
        outside = av.sum(axis=1) > e64
        u = -xp.sort(-av, axis=1)
        c = xp.cumsum(u, axis=1)
        j = xp.arange(1, d + 1, dtype=np.float64)
        cond = u * j > c - e64[:, None]
        rho = d - xp.argmax(cond[:, ::-1], axis=1)
        rows = xp.arange(n)
        theta = (c[rows, rho - 1] - e64) / rho
        theta = xp.where(cond.any(axis=1), theta, u[:, 0])
        theta = xp.where(outside, theta, 0.0)
        w = (xp.sign(v) * xp.maximum(av - theta[:, None], 0.0)).astype(dt)
        res = xp.clip(x0 + w, dt.type(lo), dt.type(hi))
        res = xp.where(act[:, None], res, xa)
        return res.reshape(shape)

    def pgd_step(self, net, xa, labels, loss, flip, x0, eps, alpha, lo, hi, active, norm,
                 sparsity=0.95):
        return composed_pgd_step(self, net, xa, labels, loss, flip, x0, eps, alpha, lo, hi,
                                 active, norm, sparsity)

    def momentum_step(self, xa, g, mom, decay, flip, x0, eps, alpha, lo, hi, active):
        xp = self.xp
        return composed_momentum_step(self, xp.asarray(xa), xp.asarray(g), xp.asarray(mom),
                                      decay, flip, x0, eps, alpha, lo, hi, active)

    # ------------------------------------------------------------------ JSMA

    def _jsma_args(self, a, b, domain, theta):
        from ...reference.jsma import _check_theta
        xp = self.xp
        a, b = xp.asarray(a), xp.asarray(b)
        if a.ndim != 2:
            raise ShapeError(f"a must have shape (B, n), got {tuple(a.shape)}")
        if b.shape != a.shape:
            raise ShapeError(f"a and b must have the same shape (B, n), got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        dt = np.result_type(a.dtype, b.dtype)
        if dt.kind != "f":
            raise AdvkernError(f"a and b must be float arrays, got dtype {dt}")
        a, b = (xp.ascontiguousarray(v, dtype=dt) for v in (a, b))
        domain = xp.asarray(domain)
        if domain.dtype != np.bool_:
            raise AdvkernError(f"domain must be a boolean mask, got dtype {domain.dtype}")
        if domain.shape != a.shape:
            raise ShapeError(f"domain must have the shape of a {tuple(a.shape)}, got "
                             f"{tuple(domain.shape)}")
        self._nonfinite(((a, "a"), (b, "b")))
        return a, b, xp.ascontiguousarray(domain), _check_theta(theta)

    def jsma_best_pair(self, a, b, domain, theta):
        a, b, domain, theta = self._jsma_args(a, b, domain, theta)
        xp = self.xp
        n = a.shape[0]
        p = xp.full(n, -1, np.int64)
        q = xp.full(n, -1, np.int64)
        found = xp.zeros(n, bool)
        if n and a.shape[1] >= 2:
            self.ops.jsma_pair(a, b, domain, theta > 0, p, q, found)
        return p, q, found

    def jsma_best_feature(self, a, b, domain, theta):
        a, b, domain, theta = self._jsma_args(a, b, domain, theta)
        xp = self.xp
        n = a.shape[0]
        i = xp.full(n, -1, np.int64)
        found = xp.zeros(n, bool)
        if n and a.shape[1]:
            self.ops.jsma_feature(a, b, domain, theta > 0, i, found)
        return i, found

    # ------------------------------------------------------------------ DE

    def de_step(self, pop, draws, F, CR, lower, upper):
        xp = self.xp
        pop = self._dev(pop)
        if pop.ndim != 3:
            raise ShapeError(f"pop must be (B, P, dim), got shape {tuple(pop.shape)}")
        dt = pop.dtype
        r1, r2, r3 = (self._dev(draws[kk], np.int64) for kk in ("r1", "r2", "r3"))
        cross = forced = None
        if CR is not None:
            cross = self._dev(draws["cross"])
            forced = self._dev(draws["forced"], np.int64)
        lower, upper = self._dev(lower, dt), self._dev(upper, dt)
        out = xp.empty_like(pop)
        if out.size:
            self.ops.de_step(pop, r1, r2, r3, cross, forced, float(F),
                             None if CR is None else float(CR), lower, upper, out)
        return out

    def de_score(self, net, x, labels, pop, targeted):
        xp = self.xp
        net, x = self._batch(net, x)
        n = len(x)
        pop = self._dev(pop, net.dtype)
        if pop.ndim != 3 or pop.shape[0] != n:
            raise ShapeError(f"pop must be ({n}, P, dim), got shape {tuple(pop.shape)}")
        if len(net.input_shape) != 3:
            raise ShapeError(f"the pixel attack needs (C, H, W) images, got {net.input_shape}")
        c = net.input_shape[0]
        p, dim = pop.shape[1], pop.shape[2]
        if dim == 0 or dim % (2 + c):
            raise ShapeError(f"pop must be ({n}, P, k*{2 + c}), got {tuple(pop.shape)}")
        y = self._labels(labels, n, net.num_logits)
        fit = xp.empty((n, p), net.dtype)
        pred = xp.empty((n, p), np.int64)
        if n == 0 or p == 0:
            return fit, pred
        first, start = self._first_param_stage(net)
        if first is not None:
            # The clean images' first-layer pre-activations, once; each candidate patches
            # them (rank-k dense update / receptive-field conv update) instead of running
            # the first layer again.
            base = self._first_preact(net, first, x)
        ff, pf = fit.reshape(-1), pred.reshape(-1)
        yy = xp.repeat(y, p)

        def work(i0, i1):              # images i0:i1, i.e. candidate rows i0*P:i1*P
            cand = pop[i0:i1]
            if first is not None:
                h = self._patched(net, first, base[i0:i1], x[i0:i1], cand, (i1 - i0) * p)
                z, _ = self._forward(net, h, start=start)
            else:
                z, _ = self._forward(net, self._apply_candidates(x[i0:i1], cand))
            v, _ = self._loss(z, yy[i0 * p:i1 * p], "ce", want_grad=False)
            ff[i0 * p:i1 * p] = v if targeted else -v
            pf[i0 * p:i1 * p] = self._predict(z)

        self._chunks(n, self._row_bytes(net) * p, work)
        return fit, pred

    def _predict(self, z):
        xp = self.xp
        if z.shape[1] == 1:
            return (z[:, 0] > 0).astype(np.int64)
        return xp.argmax(z, axis=1).astype(np.int64)

    @staticmethod
    def _first_param_stage(net):
        """(index of the first stage when it is a dense or conv layer reading the image,
        possibly after a flatten; the index to resume the forward from), or (None, 0)."""
        for i, st in enumerate(net.stages):
            if st.kind == "flatten":
                continue
            if st.kind in ("dense", "conv"):
                return i, i + 1
            return None, 0
        return None, 0

    def _first_preact(self, net, i, x):
        """The first stage's pre-activation (bias added, no activation) on the clean x."""
        st = net.stages[i]
        base, _ = self._linear(net, st, x, "none")
        return base if st.kind == "dense" else base.reshape((len(x),) + st.out_shape)

    def _patched(self, net, i, base, x, cand, m):
        """The first stage's output (activation applied) on m = len(x) * P candidates."""
        xp, ops = self.xp, self.ops
        st = net.stages[i]
        if st.kind == "dense":
            out = xp.empty((m, st.w.shape[1]), net.dtype)
            ops.de_patch_dense(base, st.w, x, cand, out)
            ops.bias_act(out, None, 1, st.act)
            return out
        f = st.w.shape[0]
        w4 = st.w.reshape((f,) + (st.in_shape[0], st.kh, st.kw))
        out = xp.empty((m,) + st.out_shape, net.dtype)
        ops.de_patch_conv(base, xp.ascontiguousarray(w4), x, cand, st.sh, st.sw, st.pt,
                          st.pl, out)
        ops.bias_act(out, None, 1, st.act)
        return out

    def _apply_candidates(self, x, cand):
        """Every candidate written into a copy of its image (later pixels win), on the
        device: reference.pixel.apply_candidates."""
        xp = self.xp
        b, c, h, w = x.shape
        p, dim = cand.shape[1], cand.shape[2]
        k = dim // (2 + c)
        out = xp.repeat(x, p, axis=0)
        cc = cand.reshape(b * p, k, 2 + c)
        rows = xp.clip(xp.floor(cc[:, :, 0]), 0, h - 1).astype(np.int64)
        cols = xp.clip(xp.floor(cc[:, :, 1]), 0, w - 1).astype(np.int64)
        idx = xp.arange(b * p)
        for j in range(k):
            for ch in range(c):
                out[idx, ch, rows[:, j], cols[:, j]] = cc[:, j, 2 + ch]
        return out
