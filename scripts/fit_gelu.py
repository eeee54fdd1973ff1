"""Fit the two rationals the CPU (and CUDA) kernels use for the exact GELU.

forward:  erfcx(a) = exp(a^2) erfc(a) ~ P(a) / Q(a) on 0 <= a <= 4, minimising the *relative* error.
          Then erfc(a) = exp(-a^2) P(a) / Q(a) keeps its relative accuracy far into the tail, and
          Phi(z) = erfc(|z|/sqrt2)/2 (z < 0) or 1 - erfc(|z|/sqrt2)/2 (z >= 0) has no cancellation.
backward: h(x) = gelu'(z) - 1/2 = erf(x)/2 + z phi(z), x = z/sqrt2, is odd and tends to 0 like
          z phi(z): h ~ x P(x^2) / Q(x^2) on |x| <= 4.3, minimising the *absolute* error. One rational
          costs as much as erf alone, instead of erf plus exp.

Method: Loeb's linearised least squares with Lawson's reweighting towards the minimax fit, in float64
(numpy). Prints the coefficients (lowest order first, Q normalised to Q(0) = 1) and the maximum error
of a float32 Horner evaluation (no FMA, so a little pessimistic).

    python scripts/fit_gelu.py forward   # degrees 3/4
    python scripts/fit_gelu.py backward  # degrees 7/5
"""

import math
import sys

import numpy as np


def erfcx(a):
    return math.erfc(a) * math.exp(a * a)


def gelu_grad_minus_half(x):
    z = x * math.sqrt(2.0)
    return 0.5 * math.erf(x) + z * math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


# name: (target, interval end, P degree, Q degree, odd in x with powers of x^2?, relative error?,
#        sample points, iterations) -- the settings that produced the kernels' coefficients
FITS = {
    "forward": (erfcx, 4.0, 3, 4, False, True, 8000, 300),
    "backward": (gelu_grad_minus_half, 4.3, 7, 5, True, False, 6000, 200),
}


def fit(f, X, m, k, odd, relative, n=8000, iterations=300):
    xs = X * (1 - np.cos(np.linspace(0, np.pi, n))) / 2
    fx = np.array([f(x) for x in xs])
    s = (xs / X) ** 2 if odd else xs / X  # basis variable in [0, 1] keeps the system well conditioned
    lead = xs if odd else np.ones(n)
    A = np.concatenate(
        [np.stack([lead * s**i for i in range(m + 1)], 1), np.stack([-fx * s**i for i in range(1, k + 1)], 1)], 1
    )
    scale = 1 / np.abs(fx) if relative else np.ones(n)
    w, q, best = np.ones(n), np.ones(n), None
    for _ in range(iterations):
        W = w * scale / q
        coef = np.linalg.lstsq(A * W[:, None], fx * W, rcond=None)[0]
        p = np.polyval(coef[: m + 1][::-1], s) * lead
        q = 1 + np.polyval(np.r_[coef[m + 1 :][::-1], 0], s)
        err = (fx - p / q) * scale
        if best is None or np.abs(err).max() < best[0]:
            best = (np.abs(err).max(), coef.copy())
        w = np.maximum(w * np.abs(err) / (w * np.abs(err)).sum(), 1e-12)
    e, coef = best
    power = 2 if odd else 1
    P = [coef[i] / X ** (power * i) for i in range(m + 1)]
    Q = [1.0] + [coef[m + i] / X ** (power * i) for i in range(1, k + 1)]
    return e, P, Q


def float32_error(f, X, P, Q, odd, relative):
    xs = np.linspace(0, X, 400001)
    x = xs.astype(np.float32)
    u = x * x if odd else x
    p, q = np.float32(P[-1]), np.float32(Q[-1])
    for c in P[-2::-1]:
        p = p * u + np.float32(c)
    for c in Q[-2::-1]:
        q = q * u + np.float32(c)
    r = (x * p / q) if odd else (p / q)
    ref = np.array([f(float(v)) for v in x])
    err = np.abs(r - ref)
    return (err / np.abs(ref)).max() if relative else err.max()


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "forward"
    f, X, m, k, odd, relative, n, iterations = FITS[name]
    e, P, Q = fit(f, X, m, k, odd, relative, n, iterations)
    kind = "relative" if relative else "absolute"
    print(f"{name}: degrees {m}/{k} on [0, {X}], max {kind} error {e:.3g} (float64 evaluation)")
    print("P:", ", ".join(f"{c:.9e}" for c in P))
    print("Q:", ", ".join(f"{c:.9e}" for c in Q))
    print(f"max {kind} error, float32 Horner without FMA: {float32_error(f, X, P, Q, odd, relative):.3g}")
