r"""Triton kernels of the fused guard loss: one reduction kernel per direction.

Per sample ``i`` (a row of ``D`` latent values) with ``e = x - mu_old`` (``= s * noise``)
and ``d = mu - mu_old``, the forward kernel reduces

.. math:: C_i = \sum_D e\,d, \qquad Q_i = \sum_D d^2

in float32, chunk by chunk: program ``(c, i)`` writes its chunk's partial sums to a
workspace, then bumps a counter; the program that finishes last (``last block done``) adds
the partials of every sample in a fixed order (deterministic, no float atomics) and computes

.. math::

    r_i = \frac{\mathrm{scale}_i}{s_i^2 D}\big(C_i - \tfrac12 [\text{not debias}]\, Q_i\big),
    \quad \ell_i = \max(-A_i \rho_i, -A_i\,\mathrm{clip}(\rho_i)),
    \quad L = \frac1B \sum_i w_i \ell_i

with ``rho_i`` the eager path's :func:`regclip.surrogate.bounded_exp` (``e^{r_i}`` up to
``r = MAX_LOG_RATIO``, its tangent line above, so nothing overflows), plus
``dL/dr_i = -w_i A_i \rho'_i [\text{not clipped}] / B`` (``rho'`` the slope
``e^{min(r, MAX_LOG_RATIO)}``) and every metric of :mod:`regclip.diagnostics`. The backward
kernel writes ``dL/dmu = k_i (cc_i e + 2 cq_i d)`` with ``r_i = cc_i C_i + cq_i Q_i`` and
``k_i`` the upstream gradient of ``r_i`` (through the loss, the log-ratio and the ratio
outputs).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..surrogate import MAX_LOG_RATIO as _BOUND

STAT_COUNT = 19
"""Number of metrics the finalize step writes (``regclip.fused.function.STAT_NAMES``)."""

MAX_LOG_RATIO = tl.constexpr(_BOUND)
"""The eager surrogates' bound (:data:`regclip.surrogate.MAX_LOG_RATIO`), as a kernel constant."""


@triton.jit
def _load_pair(mean_ptr, other_ptr, next_ptr, s, offs, mask, NOISE: tl.constexpr):
    """(e, d) for one tile: ``e = x - mu_old``, ``d = mu - mu_old``, in float32."""
    mu = tl.load(mean_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")
    x = tl.load(next_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")
    o = tl.load(other_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")
    mu = mu.to(tl.float32)
    x = x.to(tl.float32)
    o = o.to(tl.float32)
    if NOISE:
        e = s * o
        d = mu - x + e
    else:
        e = x - o
        d = mu - o
    return e, d


@triton.jit
def _finalize(
    work_ptr, std_ptr, dt_ptr, scale_ptr, weight_ptr, adv_ptr,
    loss_ptr, log_ratio_ptr, ratio_ptr, clipped_ptr, aux_ptr,
    B, C, inv_d, inv_b, adv_clip, lo_bound, hi_bound, dual,
    DEBIAS: tl.constexpr, SCALE_MODE: tl.constexpr, WEIGHT_MODE: tl.constexpr,
    HAS_ADV_CLIP: tl.constexpr, HAS_LOW: tl.constexpr, HAS_HIGH: tl.constexpr,
    HAS_DUAL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    offs_b = tl.arange(0, BLOCK_B)
    valid = offs_b < B
    cross = tl.zeros([BLOCK_B], dtype=tl.float32)
    sq = tl.zeros([BLOCK_B], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        idx = offs_b[:, None] * C + offs_c[None, :]
        m = valid[:, None] & (offs_c[None, :] < C)
        cross += tl.sum(tl.load(work_ptr + idx, mask=m, other=0.0, cache_modifier=".cg"), 1)
        sq += tl.sum(tl.load(work_ptr + B * C + idx, mask=m, other=0.0, cache_modifier=".cg"), 1)

    s = tl.load(std_ptr + offs_b, mask=valid, other=1.0)
    if SCALE_MODE == 0:  # vanilla, mean-revised
        scale = s * 0.0 + 1.0
    elif SCALE_MODE == 1:  # RatioNorm
        scale = s
    else:
        scale = tl.load(scale_ptr + offs_b, mask=valid, other=0.0)
    if WEIGHT_MODE == 0:  # uniform
        w = tl.where(valid, 1.0, 0.0)
    elif WEIGHT_MODE == 1:  # inverse dt
        w = tl.where(valid, 1.0 / tl.abs(tl.load(dt_ptr + offs_b, mask=valid, other=-1.0)), 0.0)
    else:
        w = tl.load(weight_ptr + offs_b, mask=valid, other=0.0)
    a_raw = tl.load(adv_ptr + offs_b, mask=valid, other=0.0)
    a = a_raw
    if HAS_ADV_CLIP:
        a = tl.minimum(tl.maximum(a_raw, -adv_clip), adv_clip)
    cc = scale / (s * s) * inv_d
    cq = cc * 0.0 if DEBIAS else -0.5 * cc
    r = cc * cross + cq * sq
    r_capped = tl.minimum(r, MAX_LOG_RATIO)
    slope = tl.exp(r_capped)  # d rho / d r
    rho = slope * (1.0 + (r - r_capped))  # regclip.surrogate.bounded_exp
    none = offs_b < 0
    pos = valid & (a > 0)
    neg = valid & (a < 0)

    clamped = rho
    above = none
    below = none
    if HAS_LOW:
        clamped = tl.maximum(clamped, lo_bound)
        below = valid & (rho < lo_bound)
    if HAS_HIGH:
        clamped = tl.minimum(clamped, hi_bound)
        above = valid & (rho > hi_bound)
    per_sample = tl.maximum(-a * rho, -a * clamped)
    clipped = (above & pos) | (below & neg)
    dual_clipped = none
    if HAS_DUAL:
        per_sample = tl.where(neg, tl.minimum(per_sample, -dual * a), per_sample)
        dual_clipped = neg & (rho > dual)
        clipped = clipped | dual_clipped
    grad_r = tl.where(clipped | (offs_b >= B), 0.0, -a * slope * w * inv_b)
    policy = tl.sum(tl.where(valid, w * per_sample, 0.0), 0) * inv_b

    tl.store(loss_ptr, policy)
    tl.store(log_ratio_ptr + offs_b, r, mask=valid)
    tl.store(ratio_ptr + offs_b, rho, mask=valid)
    tl.store(clipped_ptr + offs_b, clipped, mask=valid)
    # aux rows (see regclip.fused.function): dL/dr, cc, cq, clipped advantages, weights
    tl.store(aux_ptr + offs_b, grad_r, mask=valid)
    tl.store(aux_ptr + B + offs_b, cc, mask=valid)
    tl.store(aux_ptr + 2 * B + offs_b, cq, mask=valid)
    tl.store(aux_ptr + 3 * B + offs_b, a, mask=valid)
    tl.store(aux_ptr + 4 * B + offs_b, w, mask=valid)
    stats_ptr = aux_ptr + 5 * B

    rho_mean = tl.sum(tl.where(valid, rho, 0.0), 0) * inv_b
    rho_dev = tl.where(valid, rho - rho_mean, 0.0)
    r_mean = tl.sum(tl.where(valid, r, 0.0), 0) * inv_b
    r_dev = tl.where(valid, r - r_mean, 0.0)
    r_std = tl.sqrt(tl.sum(r_dev * r_dev, 0) * inv_b)
    n_pos = tl.maximum(tl.sum(pos.to(tl.float32), 0), 1.0)
    n_neg = tl.maximum(tl.sum(neg.to(tl.float32), 0), 1.0)
    # order: regclip.fused.function.STAT_NAMES
    tl.store(stats_ptr + 0, policy)
    tl.store(stats_ptr + 1, policy)
    tl.store(stats_ptr + 2, rho_mean)
    tl.store(stats_ptr + 3, tl.sqrt(tl.sum(rho_dev * rho_dev, 0) * inv_b))
    tl.store(stats_ptr + 4, tl.min(tl.where(valid, rho, float("inf")), 0))
    tl.store(stats_ptr + 5, tl.max(tl.where(valid, rho, -float("inf")), 0))
    tl.store(stats_ptr + 6, r_mean)
    tl.store(stats_ptr + 7, r_std)
    tl.store(stats_ptr + 8, tl.where(r_std > 0, -r_mean / r_std, 0.0))
    tl.store(stats_ptr + 9, tl.sum(clipped.to(tl.float32), 0) * inv_b)
    tl.store(stats_ptr + 10, tl.sum((above & pos).to(tl.float32), 0) / n_pos)
    tl.store(stats_ptr + 11, tl.sum((below & pos).to(tl.float32), 0) / n_pos)
    tl.store(stats_ptr + 12, tl.sum((below & neg).to(tl.float32), 0) / n_neg)
    tl.store(stats_ptr + 13, tl.sum((above & neg).to(tl.float32), 0) / n_neg)
    tl.store(stats_ptr + 14, tl.sum(dual_clipped.to(tl.float32), 0) * inv_b)
    tl.store(stats_ptr + 15, tl.sum(a, 0) * inv_b)
    tl.store(stats_ptr + 16, tl.sum(tl.abs(a), 0) * inv_b)
    tl.store(stats_ptr + 17, tl.sum((valid & (a != a_raw)).to(tl.float32), 0) * inv_b)
    tl.store(stats_ptr + 18, tl.sum(w, 0) * inv_b)


@triton.jit
def guard_forward_kernel(
    mean_ptr, other_ptr, next_ptr, std_ptr, dt_ptr, scale_ptr, weight_ptr, adv_ptr,
    counter_ptr, work_ptr, loss_ptr, log_ratio_ptr, ratio_ptr, clipped_ptr, aux_ptr,
    B, C, D, CHUNK, inv_d, inv_b, adv_clip, lo_bound, hi_bound, dual,
    NOISE: tl.constexpr, DEBIAS: tl.constexpr, SCALE_MODE: tl.constexpr,
    WEIGHT_MODE: tl.constexpr, HAS_ADV_CLIP: tl.constexpr, HAS_LOW: tl.constexpr,
    HAS_HIGH: tl.constexpr, HAS_DUAL: tl.constexpr, FINALIZE: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Grid ``(C, B)``: chunk partial sums, and (``FINALIZE``) the last program finalizes.

    ``work_ptr`` holds the partials ``[C_partials (B, C), Q_partials (B, C)]``;
    ``counter_ptr`` is a float32 counter that is 0 on entry and that the finalizing
    program resets to 0 (so it needs no zeroing launch; calls on one device must not
    overlap on two streams).
    """
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    row = b.to(tl.int64) * D
    start = chunk * CHUNK
    s = tl.load(std_ptr + b)
    acc_c = tl.zeros([BLOCK], dtype=tl.float32)
    acc_q = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        e, d = _load_pair(mean_ptr, other_ptr, next_ptr, s, row + idx, idx < D, NOISE)
        acc_c += e * d
        acc_q += d * d
    tl.store(work_ptr + b * C + chunk, tl.sum(acc_c, 0))
    tl.store(work_ptr + B * C + b * C + chunk, tl.sum(acc_q, 0))
    if FINALIZE:
        tl.debug_barrier()
        done = tl.atomic_add(counter_ptr, 1.0, sem="acq_rel", scope="gpu")
        if done == B * C - 1:
            _finalize(
                work_ptr, std_ptr, dt_ptr, scale_ptr, weight_ptr, adv_ptr,
                loss_ptr, log_ratio_ptr, ratio_ptr, clipped_ptr, aux_ptr,
                B, C, inv_d, inv_b, adv_clip, lo_bound, hi_bound, dual,
                DEBIAS, SCALE_MODE, WEIGHT_MODE, HAS_ADV_CLIP, HAS_LOW, HAS_HIGH, HAS_DUAL,
                BLOCK_B, BLOCK_C,
            )  # fmt: skip
            tl.store(counter_ptr, 0.0)


@triton.jit
def guard_finalize_kernel(
    work_ptr, std_ptr, dt_ptr, scale_ptr, weight_ptr, adv_ptr,
    loss_ptr, log_ratio_ptr, ratio_ptr, clipped_ptr, aux_ptr,
    B, C, inv_d, inv_b, adv_clip, lo_bound, hi_bound, dual,
    DEBIAS: tl.constexpr, SCALE_MODE: tl.constexpr, WEIGHT_MODE: tl.constexpr,
    HAS_ADV_CLIP: tl.constexpr, HAS_LOW: tl.constexpr, HAS_HIGH: tl.constexpr,
    HAS_DUAL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Grid ``(1,)``: the finalize step as its own launch (the two-launch variant)."""
    _finalize(
        work_ptr, std_ptr, dt_ptr, scale_ptr, weight_ptr, adv_ptr,
        loss_ptr, log_ratio_ptr, ratio_ptr, clipped_ptr, aux_ptr,
        B, C, inv_d, inv_b, adv_clip, lo_bound, hi_bound, dual,
        DEBIAS, SCALE_MODE, WEIGHT_MODE, HAS_ADV_CLIP, HAS_LOW, HAS_HIGH, HAS_DUAL,
        BLOCK_B, BLOCK_C,
    )  # fmt: skip


@triton.jit
def guard_backward_kernel(
    grad_ptr, mean_ptr, other_ptr, next_ptr, std_ptr, coef_ptr, slope_ptr,
    grad_loss_ptr, grad_log_ratio_ptr, grad_ratio_ptr,
    B, D, CHUNK,
    NOISE: tl.constexpr, HAS_GRAD_LOSS: tl.constexpr, HAS_GRAD_LOG_RATIO: tl.constexpr,
    HAS_GRAD_RATIO: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Grid ``(C, B)``: ``grad[i] = k_i (cc_i e + 2 cq_i d)`` over the chunk, in ``grad``'s dtype.

    ``slope_ptr`` holds ``d rho / d r`` per sample (read only with ``HAS_GRAD_RATIO``).
    """
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    row = b.to(tl.int64) * D
    start = chunk * CHUNK
    s = tl.load(std_ptr + b)
    if HAS_GRAD_LOSS:
        k = tl.load(grad_loss_ptr).to(tl.float32) * tl.load(coef_ptr + b)
    else:
        k = tl.load(coef_ptr + b) * 0.0
    if HAS_GRAD_LOG_RATIO:
        k += tl.load(grad_log_ratio_ptr + b).to(tl.float32)
    if HAS_GRAD_RATIO:
        k += tl.load(grad_ratio_ptr + b).to(tl.float32) * tl.load(slope_ptr + b)
    kc = k * tl.load(coef_ptr + B + b)
    kq = 2.0 * k * tl.load(coef_ptr + 2 * B + b)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < D
        e, d = _load_pair(mean_ptr, other_ptr, next_ptr, s, row + idx, mask, NOISE)
        grad = kc * e + kq * d
        tl.store(grad_ptr + row + idx, grad.to(grad_ptr.dtype.element_ty), mask=mask)
