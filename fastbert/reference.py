"""Pure-PyTorch implementations of every fastbert op: the test oracle and the last fallback.

Each function computes in fp32 (fp64 for fp64 inputs) and returns the input dtype, like the fused
kernels. Tests call them on inputs upcast to float64 to get the exact answer.
"""

import torch
import torch.nn.functional as F


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def bias_gelu(x, bias=None, approximate="none"):
    """``gelu(x + bias)``; exact (erf) or ``approximate="tanh"``."""
    z = x.to(_acc(x.dtype))
    if bias is not None:
        z = z + bias.to(z.dtype)
    return F.gelu(z, approximate=approximate).to(x.dtype)


def layernorm_residual(x, residual, weight, bias, eps=1e-12, x_bias=None, dropout_p=0.0, seed=None):
    """``LayerNorm(dropout(x + x_bias) + residual) * weight + bias`` over the last dimension.

    Dropout is active when ``seed`` (an int64 tensor, see :mod:`fastbert.philox`) is given and
    ``dropout_p > 0``; it drops exactly the elements the kernels drop for that seed.
    """
    from fastbert import philox

    acc = _acc(x.dtype)
    h = x.to(acc)
    if x_bias is not None:
        h = h + x_bias.to(acc)
    if seed is not None and dropout_p > 0:
        keep = philox.keep_mask(int(seed.reshape(-1)[0]), h.shape, dropout_p, h.device)
        h = torch.where(keep, h * philox.scale(dropout_p), torch.zeros((), dtype=acc, device=h.device))
    # the normalisation in float64 (as the kernels' rows of huge values): a fp32 (s - mean)^2
    # overflows for |s| near 2e19 (a 3.4e38 x_bias made rstd 0 and y = bias)
    s = (h + residual.to(acc)).to(torch.float64)
    # written out (not F.layer_norm, whose fused a*s + b form leaves rounding noise times rstd in
    # s_hat, large when the variance is ~0 and eps tiny)
    # the mean as s[0] + mean(s - s[0]) (as the kernels): exact for a constant row, whose centered
    # values are then exactly 0 (a plain fp32 mean's rounding error times rstd ~ 1 / sqrt(eps) is not
    # small: 0.0075 for a row of 0.1 at eps=1e-12). The shift is detached: the mean's derivative with
    # respect to it is exactly 0, which autograd would form as 1 - n (1 / n), rounding noise.
    shift = s[..., :1].detach()
    mean = shift + (s - shift).mean(-1, keepdim=True)
    centered = s - mean
    rstd = torch.rsqrt((centered * centered).mean(-1, keepdim=True) + eps)
    return (centered * rstd * weight.to(torch.float64) + bias.to(torch.float64)).to(x.dtype)


def masked_softmax(scores, mask=None, scale=1.0, dropout_p=0.0, seed=None):
    """``dropout(softmax(scores * scale + mask))`` over the last dimension.

    ``mask``: broadcastable to ``scores``; bool (True = attend) or additive float. A row whose every
    element is excluded (False, or -inf) gives zeros. Dropout as in :func:`layernorm_residual`.
    A float mask wider than the compute dtype (float64 on fp32 scores) has its finite values clamped
    to that dtype's range, so ``finfo(float64).min`` stays a finite large negative value (a row of it
    is uniform, as eager's float64 sum gives), not -inf. NaN and inf propagate as in eager.
    """
    from fastbert import philox

    acc = _acc(scores.dtype)
    x = scores.to(acc) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            x = x.masked_fill(~mask, float("-inf"))
        else:
            m = mask
            if torch.finfo(mask.dtype).max > torch.finfo(acc).max:
                big = torch.finfo(acc).max
                m = torch.where(mask.isinf(), mask, mask.clamp(-big, big))
            x = x + m.to(acc)
    if x.shape[-1] == 0:  # no keys: nothing to normalise
        return x.to(scores.dtype)
    mx = x.amax(-1, keepdim=True)
    e = torch.exp(x - torch.where(mx == float("-inf"), torch.zeros_like(mx), mx))
    total = e.sum(-1, keepdim=True)
    p = e / torch.where(total == 0, torch.ones_like(total), total)  # fully masked rows: 0, no NaN
    if seed is not None and dropout_p > 0:
        keep = philox.keep_mask(int(seed.reshape(-1)[0]), p.shape, dropout_p, p.device)
        p = torch.where(keep, p * philox.scale(dropout_p), torch.zeros((), dtype=acc, device=p.device))
    return p.to(scores.dtype)


def gather_masked(hidden, labels, ignore_index=-100):
    """Rows of ``hidden [N, H]`` whose ``labels [N]`` are not ``ignore_index``, row-major:
    ``(rows, targets, index, slot)``; ``slot[n]`` is row n's place in ``rows`` (-1 if unselected)."""
    selected = labels != ignore_index
    index = selected.nonzero().reshape(-1)
    slot = torch.full(labels.shape, -1, dtype=torch.int64, device=labels.device)
    slot[index] = torch.arange(index.numel(), device=labels.device)
    return hidden[index], labels[index].to(torch.int64), index, slot


def gather_masked_bwd(grad, slot):
    """The ``[N, H]`` gradient of :func:`gather_masked`: ``grad[slot[n]]`` where selected, else 0."""
    out = grad.new_zeros((slot.shape[0], grad.shape[1]))
    picked = slot >= 0
    out[picked] = grad[slot[picked]]
    return out


def cross_entropy_fwd(logits, targets, ignore_index=-100):
    """Per-row ``(loss, lse)`` of ``[c, V]`` logits in fp32 (fp64 for fp64): ``lse = logsumexp``,
    ``loss = lse - logits[target]``, 0 where ``target == ignore_index``."""
    x = logits.to(_acc(logits.dtype))
    # max + log(sum(exp(x - max))) as eager's log_softmax: NaN for a row with +inf (inf - inf) or all
    # -inf, where torch.logsumexp gives +-inf (and the loss inf, not eager's NaN)
    mx = x.amax(-1, keepdim=True) if x.shape[-1] else x.sum(-1, keepdim=True)
    lse = (mx + torch.log(torch.exp(x - mx).sum(-1, keepdim=True))).squeeze(-1)
    valid = targets != ignore_index
    picked = x.gather(1, torch.where(valid, targets, 0).to(torch.int64)[:, None]).squeeze(1)
    return torch.where(valid, lse - picked, torch.zeros_like(lse)), lse


def cross_entropy_bwd_(logits, targets, row_scale, ignore_index=-100):
    """:func:`cross_entropy_fwd`, and ``logits`` overwritten with the gradient of
    ``sum_i row_scale[i] * loss_i``: ``(softmax - onehot(target)) * row_scale`` (0 on ignored rows)."""
    loss, lse = cross_entropy_fwd(logits, targets, ignore_index)
    valid = targets != ignore_index
    g = torch.softmax(logits.to(lse.dtype), -1)  # not exp(x - lse): lse's rounding would scale every p
    rows = torch.arange(g.shape[0], device=g.device)
    # an inf or NaN row_scale: the target's term is NaN, as eager's -scale + p_t scale (not -inf)
    one = torch.where(row_scale[valid].isfinite(), 1.0, float("nan")).to(g.dtype)
    g[rows[valid], targets[valid].to(torch.int64)] -= one
    g *= torch.where(valid, row_scale.to(g.dtype), torch.zeros_like(lse))[:, None]
    logits.copy_(g)
    return loss, lse


def linear_cross_entropy(rows, weight, bias, targets, ignore_index=-100, reduction="mean"):
    """``F.cross_entropy(rows @ weight.T + bias, targets)`` (the test oracle), with fastbert's
    convention that a mean over no valid target is 0."""
    logits = rows @ weight.t()
    if bias is not None:
        logits = logits + bias
    if reduction == "mean":
        n = (targets != ignore_index).sum()
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum") / n.clamp(min=1)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p=0.0, seed=None):
    """Attention within each packed sequence: ``(out [T, heads, D], lse [heads, T])``.

    ``q, k, v``: ``[T, heads, D]``, sequence ``b`` is rows ``cu_seqlens[b] : cu_seqlens[b + 1]``.
    ``out = dropout(softmax(q k^T * scale)) v`` per sequence and head; ``lse`` is the fp32 (fp64 for
    fp64) log-sum-exp of each query row's scaled scores (-inf for no keys: never, in self-attention).
    Dropout element of (head h, query row t, key j of t's sequence) is ``(h * T + t) * max_seqlen + j``
    on the shared Philox stream (:mod:`fastbert.philox`).
    """
    from fastbert import philox

    acc = _acc(q.dtype)
    t_all, heads, _ = q.shape
    keep = None
    if seed is not None and dropout_p > 0:
        keep = philox.keep_mask(int(seed.reshape(-1)[0]), (heads, t_all, max_seqlen), dropout_p, q.device)
    outs, lses = [], []
    cu = cu_seqlens.tolist()
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        if e == s:
            continue
        qb, kb, vb = (t[s:e].to(acc).transpose(0, 1) for t in (q, k, v))  # [heads, L, D]
        x = (qb @ kb.transpose(-1, -2)) * scale
        lse = torch.logsumexp(x, -1)
        p = torch.softmax(x, -1)  # not exp(x - lse): lse's rounding would scale every probability
        if keep is not None:
            p = torch.where(
                keep[:, s:e, : e - s], p * philox.scale(dropout_p), torch.zeros((), dtype=acc, device=p.device)
            )
        outs.append((p @ vb).transpose(0, 1))
        lses.append(lse)
    # no sequences (T = 0): an empty output that is still in q's, k's and v's autograd graph
    out = torch.cat(outs) if outs else (q.to(acc) + k.to(acc) + v.to(acc)) * 0
    lse = torch.cat(lses, 1) if lses else q.new_zeros((heads, 0), dtype=acc)
    return out.to(q.dtype), lse.to(acc)
