"""Fit the rational used by the CPU kernel for the exact GELU derivative (csrc/cpu/bias_gelu_kernel.cpp).

gelu'(z) = Phi(z) + z phi(z). With x = z / sqrt(2), h(x) = gelu'(z) - 1/2 = erf(x)/2 + z phi(z) is odd
and tends to 0 like z phi(z), so h(x) ~ x P(x^2) / Q(x^2) on |x| <= X (clamped beyond, where
|h - 1/2| < 3e-8). One rational costs as much as erf alone, instead of erf plus exp.

Method: Loeb's linearised least squares with Lawson's reweighting towards the minimax fit, in float64
with numpy; prints the coefficients (monomials in x^2, lowest first) and the maximum absolute error
of a float32 Horner evaluation. Run: python scripts/fit_gelu_grad.py [X=4.3] [deg P=7] [deg Q=5]
"""

import math
import sys

import numpy as np


def h(x):
    z = x * math.sqrt(2.0)
    return 0.5 * math.erf(x) + z * math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def fit(X, m, k, n=6000, iterations=200):
    xs = X * (1 - np.cos(np.linspace(0, np.pi, n))) / 2
    fx = np.array([h(x) for x in xs])
    s = (xs / X) ** 2  # basis variable in [0, 1] keeps the system well conditioned
    A = np.concatenate([np.stack([xs * s**i for i in range(m + 1)], 1),
                        np.stack([-fx * s**i for i in range(1, k + 1)], 1)], 1)
    w, q, best = np.ones(n), np.ones(n), None
    for _ in range(iterations):
        W = w / q
        coef = np.linalg.lstsq(A * W[:, None], fx * W, rcond=None)[0]
        p = np.polyval(coef[:m + 1][::-1], s) * xs
        q = 1 + np.polyval(np.r_[coef[m + 1:][::-1], 0], s)
        err = fx - p / q
        if best is None or np.abs(err).max() < best[0]:
            best = (np.abs(err).max(), coef.copy())
        w = np.maximum(w * np.abs(err) / (w * np.abs(err)).sum(), 1e-12)
    e, coef = best
    P = [coef[i] / X ** (2 * i) for i in range(m + 1)]
    Q = [1.0] + [coef[m + i] / X ** (2 * i) for i in range(1, k + 1)]
    return e, P, Q


def float32_error(X, P, Q):
    xx = np.linspace(0, X + 1, 200001)
    x = np.minimum(xx, X).astype(np.float32)
    u = x * x
    p = np.float32(P[-1])
    for c in P[-2::-1]:
        p = p * u + np.float32(c)
    q = np.float32(Q[-1])
    for c in Q[-2::-1]:
        q = q * u + np.float32(c)
    return np.abs(x * p / q - np.array([h(v) for v in xx])).max()


if __name__ == "__main__":
    X = float(sys.argv[1]) if len(sys.argv) > 1 else 4.3
    m = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    k = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    e, P, Q = fit(X, m, k)
    print(f"max abs error (float64 evaluation): {e:.3g}")
    print("P:", ", ".join(f"{c:.9e}" for c in P))
    print("Q:", ", ".join(f"{c:.9e}" for c in Q))
    print(f"max abs error (float32 Horner, clamped at {X}): {float32_error(X, P, Q):.3g}")
