"""The cases of fastbert/triton/trace_check.py: the Triton ops' (every ``*_triton`` op, forward
and backward) and the public ops' arguments, built on fake CUDA tensors."""


def cases():
    """``(label, op name, build)``: ``build()`` (called under FakeTensorMode) returns the op's
    arguments. Shapes are fake, so large ones cost nothing."""
    import torch

    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

    def t(*shape, dtype=f32):
        return torch.empty(shape, dtype=dtype, device="cuda")

    def seed():
        return t(1, dtype=torch.int64)

    cases = []

    def add(label, op, build):
        cases.append((label, op, build))

    # bias_gelu: (x, bias, approximate) / (grad, x, bias, approximate, need_dbias)
    add("bf16 768 bias exact", "bias_gelu_fwd_triton", lambda: (t(8, 768, dtype=bf16), t(768, dtype=bf16), "none"))
    add("fp32 [3,1] no bias tanh", "bias_gelu_fwd_triton", lambda: (t(3, 1), None, "tanh"))
    add("fp16 1000 bias tanh", "bias_gelu_fwd_triton", lambda: (t(2, 5, 1000, dtype=f16), t(1000, dtype=f16), "tanh"))
    add(
        "bf16 768 dbias",
        "bias_gelu_bwd_triton",
        lambda: (t(8, 768, dtype=bf16), t(8, 768, dtype=bf16), t(768, dtype=bf16), "none", True),
    )
    add("fp32 [3,1] no bias", "bias_gelu_bwd_triton", lambda: (t(3, 1), t(3, 1), None, "tanh", False))
    add(
        "fp16 4096x3072 dbias tanh",
        "bias_gelu_bwd_triton",
        lambda: (t(4096, 3072, dtype=f16), t(4096, 3072, dtype=f16), t(3072, dtype=f16), "tanh", True),
    )

    # layernorm_residual: (x, residual, weight, bias, eps, x_bias, dropout_p, seed)
    def ln(shape, dt, wdt, xb, p):
        n = shape[-1]
        return (
            t(*shape, dtype=dt),
            t(*shape, dtype=dt),
            t(n, dtype=wdt),
            t(n, dtype=wdt),
            1e-12,
            t(n, dtype=wdt) if xb else None,
            p,
            seed() if p else None,
        )

    def ln_bwd(shape, dt, wdt, xb, p):
        x, r, w, _, _, xbias, p, s = ln(shape, dt, wdt, xb, p)
        return (t(*shape, dtype=dt), x, r, w, xbias, t(*shape[:-1]), t(*shape[:-1]), p, s)

    for name, build in (("layernorm_residual_fwd_triton", ln), ("layernorm_residual_bwd_triton", ln_bwd)):
        add("bf16 768 x_bias dropout", name, lambda b=build: b((4, 128, 768), bf16, bf16, True, 0.1))
        add("bf16 1024 fp32 params no dropout", name, lambda b=build: b((16, 1024), bf16, f32, True, 0.0))
        add("fp32 [3,1] dropout", name, lambda b=build: b((3, 1), f32, f32, False, 0.1))
        add("fp16 1000 dropout (per-element)", name, lambda b=build: b((7, 1000), f16, f16, True, 0.1))
        add("fp32 32768 dropout (looped)", name, lambda b=build: b((2, 32768), f32, f32, True, 0.1))

    # masked_softmax: (scores, mask, scale, dropout_p, seed) / (grad, softmax, scale, dropout_p, seed)
    add(
        "bf16 128 HF mask dropout",
        "masked_softmax_fwd_triton",
        lambda: (t(2, 12, 128, 128, dtype=bf16), t(2, 1, 1, 128, dtype=bf16), 0.125, 0.1, seed()),
    )
    add(
        "fp32 77 bool mask",
        "masked_softmax_fwd_triton",
        lambda: (t(2, 4, 77, 77), t(2, 77, dtype=torch.bool), 0.125, 0.0, None),
    )
    add("fp16 Sk=1 no mask", "masked_softmax_fwd_triton", lambda: (t(2, 3, 5, 1, dtype=f16), None, 1.0, 0.0, None))
    add(
        "bf16 16384 fp32 mask dropout (streaming)",
        "masked_softmax_fwd_triton",
        lambda: (t(1, 2, 4, 16384, dtype=bf16), t(1, 1, 4, 16384), 0.125, 0.1, seed()),
    )
    add(
        "bf16 128 dropout",
        "masked_softmax_bwd_triton",
        lambda: (t(2, 12, 128, 128, dtype=bf16), t(2, 12, 128, 128, dtype=bf16), 0.125, 0.1, seed()),
    )
    add("fp32 Sk=1", "masked_softmax_bwd_triton", lambda: (t(2, 3, 5, 1), t(2, 3, 5, 1), 1.0, 0.0, None))
    add(
        "fp16 1000 dropout (per-element)",
        "masked_softmax_bwd_triton",
        lambda: (t(1, 2, 3, 1000, dtype=f16), t(1, 2, 3, 1000, dtype=f16), 0.5, 0.1, seed()),
    )
    add(
        "fp32 16384 (streaming)",
        "masked_softmax_bwd_triton",
        lambda: (t(1, 1, 2, 16384), t(1, 1, 2, 16384), 1.0, 0.0, None),
    )

    # gather_masked: (hidden, labels, ignore_index) / (grad, slot)
    add(
        "bf16 768 (opaque)",
        "gather_masked_fwd_triton",
        lambda: (t(4096, 768, dtype=bf16), t(4096, dtype=torch.int64), -100),
    )
    add("bf16 768", "gather_masked_bwd_triton", lambda: (t(600, 768, dtype=bf16), t(4096, dtype=torch.int64)))
    add("fp32 H=1", "gather_masked_bwd_triton", lambda: (t(5, 1), t(37, dtype=torch.int64)))

    # linear_cross_entropy: (logits, targets, ignore_index) / (logits, targets, row_scale, ignore_index)
    add(
        "bf16 30522 (streamed)",
        "linear_cross_entropy_fwd_triton",
        lambda: (t(600, 30522, dtype=bf16), t(600, dtype=torch.int64), -100),
    )
    add(
        "fp32 8000 int32 targets",
        "linear_cross_entropy_fwd_triton",
        lambda: (t(33, 8000), t(33, dtype=torch.int32), -100),
    )
    add(
        "fp16 1 row, V=1",
        "linear_cross_entropy_fwd_triton",
        lambda: (t(1, 1, dtype=f16), t(1, dtype=torch.int64), -100),
    )
    add(
        "bf16 30522 (streamed)",
        "linear_cross_entropy_bwd_triton",
        lambda: (t(600, 30522, dtype=bf16), t(600, dtype=torch.int64), t(600), -100),
    )
    add(
        "fp16 129 int32 targets",
        "linear_cross_entropy_bwd_triton",
        lambda: (t(40, 129, dtype=f16), t(40, dtype=torch.int32), t(40, dtype=f16), 0),
    )

    # varlen_attention: (q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed) / (grad, q, k, v, out,
    # lse, cu_seqlens, max_seqlen, scale, dropout_p, seed)
    def qkv(total, heads, d, dt):
        packed = t(total, 3, heads, d, dtype=dt)  # views of a packed QKV, as BERT's attention makes them
        return packed[:, 0], packed[:, 1], packed[:, 2]

    def va(total, heads, d, dt, batch, max_seqlen, p):
        q, k, v = qkv(total, heads, d, dt)
        return (q, k, v, t(batch + 1, dtype=torch.int32), max_seqlen, d**-0.5, p, seed() if p else None)

    def va_bwd(total, heads, d, dt, batch, max_seqlen, p):
        q, k, v, cu, ms, sc, p, s = va(total, heads, d, dt, batch, max_seqlen, p)
        return (t(total, heads, d, dtype=dt), q, k, v, t(total, heads, d, dtype=dt), t(heads, total), cu, ms, sc, p, s)

    for name, build in (("varlen_attention_fwd_triton", va), ("varlen_attention_bwd_triton", va_bwd)):
        add("bf16 12x64 packed, dropout, max_seqlen 128", name, lambda b=build: b(1000, 12, 64, bf16, 8, 128, 0.1))
        add("fp16 12x64 packed, dropout, max_seqlen 77", name, lambda b=build: b(300, 12, 64, f16, 4, 77, 0.1))
        add("fp32 1 head x 64, one token", name, lambda b=build: b(1, 1, 64, f32, 1, 1, 0.0))
    return cases


def public_cases():
    """``(label, fn, build, opaque)`` of public ops compiled with torch.compile(fullgraph=True);
    ``opaque``: the op the graph must call instead of launching kernels (None: launches)."""
    import torch

    import fastbert

    bf16 = torch.bfloat16

    def t(*shape, dtype=bf16):
        return torch.empty(shape, dtype=dtype, device="cuda")

    ops = fastbert.ops
    return [
        (
            "ops.bias_gelu tanh",
            lambda x, b: ops.bias_gelu(x, b, approximate="tanh"),
            lambda: (t(8, 3072), t(3072)),
            None,
        ),
        (
            "ops.layernorm_residual dropout",
            lambda x, r, w, b, xb: ops.layernorm_residual(x, r, w, b, x_bias=xb, dropout_p=0.1, training=True),
            lambda: (t(8, 768), t(8, 768), t(768), t(768), t(768)),
            None,
        ),
        (
            "ops.masked_softmax bool mask dropout",
            lambda s, m: ops.masked_softmax(s, m, scale=0.125, dropout_p=0.1, training=True),
            lambda: (t(2, 12, 128, 128), t(2, 128, dtype=torch.bool)),
            None,
        ),
        (
            "ops.varlen_attention dropout",
            lambda q, k, v, cu: ops.varlen_attention(q, k, v, cu, 128, dropout_p=0.1),
            lambda: (t(1000, 12, 64), t(1000, 12, 64), t(1000, 12, 64), t(9, dtype=torch.int32)),
            None,
        ),
        (
            "ops.gather_masked",
            lambda h, lab: ops.gather_masked(h, lab),
            lambda: (t(512, 768), t(512, dtype=torch.int64)),
            "gather_masked_fwd_triton",
        ),
        (
            "ops.linear_cross_entropy",
            lambda r, w, b, y: ops.linear_cross_entropy(r, w, y, b),
            lambda: (t(600, 768), t(30522, 768), t(30522), t(600, dtype=torch.int64)),
            "linear_cross_entropy_chunked",
        ),
    ]
