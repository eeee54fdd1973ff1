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
    s = h + residual.to(acc)
    # written out (not F.layer_norm, whose fused a*s + b form leaves rounding noise times rstd in
    # s_hat, large when the variance is ~0 and eps tiny)
    mean = s.mean(-1, keepdim=True)
    centered = s - mean
    rstd = torch.rsqrt((centered * centered).mean(-1, keepdim=True) + eps)
    return (centered * rstd * weight.to(acc) + bias.to(acc)).to(x.dtype)


def masked_softmax(scores, mask=None, scale=1.0, dropout_p=0.0, seed=None):
    """``dropout(softmax(scores * scale + mask))`` over the last dimension.

    ``mask``: broadcastable to ``scores``; bool (True = attend) or additive float. A row whose every
    element is excluded (False, or -inf) gives zeros. Dropout as in :func:`layernorm_residual`.
    """
    from fastbert import philox

    acc = _acc(scores.dtype)
    x = scores.to(acc) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            x = x.masked_fill(~mask, float("-inf"))
        else:
            x = x + mask.to(acc)
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
