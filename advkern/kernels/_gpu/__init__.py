"""What the two GPU backends (``cupy`` and ``numba_cuda``) share: the model's device form,
the forward / backward passes over cuBLAS GEMMs (``xp.matmul``), the loss, step, JSMA and
DE drivers. Only the custom kernels differ; each backend passes its ``ops`` module.

The ops interface (every GPU backend's ``ops`` module implements exactly these; arrays are
device arrays of ``xp``, C-contiguous, dtype ``dt`` = float32 or float64 unless said;
``out`` arguments are preallocated by the caller and written, never read; scalars are
Python numbers; nothing else is modified):

    count_nonfinite(a, b, c=None)
        A device integer array (1,): the number of positions i where a[i], b[i] or c[i]
        (same size) is NaN/Inf. One pass; the caller reads it back once.
    bias_act(y, b, inner, act)
        In place: y.flat[i] = act(y.flat[i] + b[(i // inner) % F]) with F = b.size (b None:
        no bias). act: 'none', 'relu', 'tanh', 'sigmoid' (1 / (1 + exp(-v))).
        Dense output (R, F): inner = 1. Conv output (N, F, HO, WO): inner = HO * WO.
    act_grad(d, out, act)
        In place: d *= f'(v) written from the activation's OUTPUT o: relu (o > 0),
        tanh (1 - o * o), sigmoid (o * (1 - o)).
    im2col(x, kh, kw, sh, sw, pt, pl, ho, wo, out)
        x (N, C, H, W) -> out (N, C*kh*kw, ho*wo): out[n, (c*kh + u)*kw + v, i*wo + j] =
        x[n, c, i*sh + u - pt, j*sw + v - pl], 0 outside the image.
    col2im(dcols, h, w, kh, kw, sh, sw, pt, pl, ho, wo, out)
        The adjoint: out (N, C, H, W) [n, c, y, x] = sum of dcols[n, (c*kh + u)*kw + v,
        i*wo + j] over the taps with i*sh + u - pt = y, j*sw + v - pl = x. A gather (one
        thread per input pixel), so no atomics and the same bits every run.
    maxpool_fwd(x, kh, kw, sh, sw, out, arg)
        x (N, C, H, W) -> out (N, C, HO, WO) the window max, arg (same shape, int32) the tap
        u*kw + v of the FIRST maximal element in row-major order (replace only on >).
    maxpool_bwd(dout, arg, kh, kw, sh, sw, dx)
        dx (N, C, H, W): each input pixel sums dout over the windows whose arg is it.
    softmax_xent(z, labels, values, dz)
        z (N, K), labels (N,) int64 -> values (N,) = logsumexp(z) - z_y, computed as in
        reference.losses.log_softmax (shift by the max, log1p of the others' exp sum);
        dz (N, K) = softmax - onehot (None: values only). K == 1: the two-class logits
        (0, z); dz is then d/dz of the second column.
    cw_margin(z, labels, values, dz)
        values = max_{j != y} z_j - z_y (first j on ties), dz +1 at j, -1 at y; K == 1 as
        above.
    linf_step(xa, g, x0, eps, alpha, lo, hi, active, out)
        (N, D) arrays, eps / alpha (N,) dt, active (N,) bool:
        out = active ? min(max(min(max(xa + alpha*sign(g), x0 - eps), x0 + eps), lo), hi) : xa
        in dt, bit-exact with the reference (sign(0) = 0).
    l2_step(xa, g, x0, eps, alpha, lo, hi, active, out)
        Per image (one block): s = alpha * g / ||g|| (0 when ||g|| = 0), d = xa + s - x0,
        d *= eps / ||d|| when ||d|| > eps, out = clip(x0 + d, lo, hi); norms accumulated in
        float64 with the max-scaling of reference.projections.l2_norms. Inactive: xa.
    jsma_pair(a, b, domain, positive, p, q, found)
        a, b (N, D) dt, domain (N, D) bool; positive: theta > 0. p, q (N,) int64, found (N,)
        bool: the pair of reference.jsma.best_pair (min alpha*beta over admissible pairs,
        ties to the smallest p then q; -1, -1, False if none). One block per image; no
        D x D table.
    jsma_feature(a, b, domain, positive, i, found)
        As reference.jsma.best_feature (i = -1 where not found).
    de_step(pop, r1, r2, r3, cross, forced, F, CR, lower, upper, out)
        As reference.pixel.de_step, bit-exact (no FMA contraction of a + F * (b - c)).
        cross, forced None when CR is None.
    de_patch_dense(base, w, x, pop, out)
        The first layer Dense(D -> M) on every candidate image, from the clean image's
        pre-activation base (N, M) = x_n @ w + b by a rank-k update: out (N*P, M) [n*P + p]
        = base[n] + sum_j sum_c (v_jc - x[n, c, r_j, s_j]) * w[(c*H + r_j)*W + s_j] over the
        candidate's k pixels (pop (N, P, k*(2+C)), pixel j = (row, col, v_1..v_C); r, s =
        clamp(floor(.)), a pixel written again by a later one of the same candidate is
        skipped: later pixels win, as in reference.pixel.apply_candidates).
    de_patch_conv(base, w, x, pop, sh, sw, pt, pl, out)
        The same for a first Conv2D layer: base (N, F, HO, WO) the clean pre-activation,
        w (F, C, KH, KW); out (N*P, F, HO, WO) = base plus each effective pixel's delta
        times the taps of every output in its receptive field.
"""
