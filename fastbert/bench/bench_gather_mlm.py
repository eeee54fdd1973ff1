"""Masked-token gather and the whole MLM head (``--ops gather_mlm``).

``gather_masked`` (shapes ``[B, S, H]``, 15% of tokens labelled): eager ``hidden[labels != -100]``,
``torch.compile`` of it, and every fastbert backend that can run, forward and forward+backward.
Minimum bytes: fwd reads the M selected rows and writes them (2 M H elements; labels ignored);
fwd+bwd adds reading the M gradient rows and writing the whole ``[B, S, H]`` gradient.

``mlm_head`` (shapes ``[B, S, H, V]``), forward+backward of BERT's MLM head and loss: transform
(dense + GELU + LayerNorm), decoder to the vocabulary, cross-entropy over the labelled tokens:

* ``eager``: the Hugging Face way: transform and decoder on every token, ``[B*S, V]`` logits,
  ``F.cross_entropy(..., ignore_index=-100)``; ``torch.compile`` of the same;
* ``eager+gather``: eager PyTorch on the gathered rows only (what gathering alone buys);
* ``fastbert-<backend>``: ``gather_masked`` -> dense -> ``bias_gelu`` -> LayerNorm ->
  ``linear_cross_entropy`` (chunked, never holding the ``[M, V]`` logits).

Its "peak MB" includes the parameters' gradients every candidate allocates (``mlm_grad_bytes``:
94 MB of decoder weight gradient at V = 30522, H = 768, fp32); the memory beyond them is peak minus
that. GB/s is not reported for the MLM head (the matmuls make it compute-bound).
"""

import torch
import torch.nn.functional as F

import fastbert
from fastbert.bench.candidates import backend_candidates, timed_candidates
from fastbert.bench.harness import COMPILE, DTYPES, EAGER, Case, numel

GATHER_SHAPES = [(8, 128, 768), (32, 128, 768)]
MLM_SHAPES = [(8, 128, 768, 30522)]
MLM_FULL_SHAPES = [(32, 128, 768, 30522)]
LABELLED = 0.15
IGNORE = -100


def make_labels(b, s, v, device):
    labels = torch.randint(0, v, (b, s), device=device)
    return torch.where(torch.rand(b, s, device=device) < LABELLED, labels, torch.full_like(labels, IGNORE))


# ------------------------------------------------------------------------------------ gather


def eager_gather(hidden, labels):
    return hidden[labels != IGNORE]


def fastbert_gather(backend):
    def fn(hidden, labels):
        with fastbert.backend(backend):
            return fastbert.gather_masked(hidden, labels)[0]

    return fn


def gather_setup(shape, dtype, device, backward, use_compile):
    def setup():
        torch.manual_seed(0)
        hidden = torch.randn(shape, dtype=DTYPES[dtype], device=device, requires_grad=backward)
        labels = make_labels(shape[0], shape[1], 30522, device)
        m = int((labels != IGNORE).sum())
        dy = torch.randn(m, shape[2], dtype=hidden.dtype, device=device) if backward else None
        return timed_candidates(
            "gather_masked", device, eager_gather, fastbert_gather, (hidden, labels), dy, (hidden,), use_compile
        )

    return setup


# ---------------------------------------------------------------------------------- MLM head


def make_head(h, v, dtype, device):
    """The MLM head's parameters (leaves requiring grad): transform dense, LayerNorm, decoder."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def p(*shape, std=0.02):
        return (torch.randn(shape, generator=g) * std).to(device=device, dtype=dtype).requires_grad_()

    return dict(
        dense_w=p(h, h), dense_b=p(h), ln_w=(1 + p(h)).detach().requires_grad_(), ln_b=p(h), dec_w=p(v, h), dec_b=p(v)
    )


def mlm_grad_bytes(h, v, itemsize=4):
    return (h * h + 3 * h + v * h + v) * itemsize


def transform(x, w):
    x = F.gelu(F.linear(x, w["dense_w"], w["dense_b"]))
    return F.layer_norm(x, x.shape[-1:], w["ln_w"], w["ln_b"], 1e-12)


def eager_head(hidden, labels, w):
    """Hugging Face's BertLMPredictionHead + CrossEntropyLoss: every token, full logits."""
    logits = F.linear(transform(hidden, w), w["dec_w"], w["dec_b"])
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=IGNORE)


def eager_gathered_head(hidden, labels, w):
    sel = labels != IGNORE
    logits = F.linear(transform(hidden[sel], w), w["dec_w"], w["dec_b"])
    return F.cross_entropy(logits, labels[sel])


def fastbert_head(backend):
    def fn(hidden, labels, w):
        with fastbert.backend(backend):
            rows, targets, _ = fastbert.gather_masked(hidden, labels)
            x = fastbert.bias_gelu(F.linear(rows, w["dense_w"]), w["dense_b"])
            x = F.layer_norm(x, x.shape[-1:], w["ln_w"], w["ln_b"], 1e-12)
            return fastbert.linear_cross_entropy(x, w["dec_w"], targets, w["dec_b"])

    return fn


def mlm_setup(shape, dtype, device, use_compile):
    def setup():
        torch.manual_seed(0)
        b, s, h, v = shape
        hidden = torch.randn(b, s, h, dtype=DTYPES[dtype], device=device, requires_grad=True)
        labels = make_labels(b, s, v, device)
        w = make_head(h, v, DTYPES[dtype], device)
        args, leaves = (hidden, labels, w), [hidden, *w.values()]
        fused = backend_candidates(device, "linear_cross_entropy", [hidden], fastbert_head)
        fns = {EAGER: eager_head, "eager+gather": eager_gathered_head}
        if use_compile:
            torch._dynamo.reset()
            fns[COMPILE] = torch.compile(eager_head, dynamic=False)
        fns.update(fused)

        def fwd_bwd(fn):
            def call():
                fn(*args).backward()
                for t in leaves:
                    t.grad = None

            return call

        candidates = {name: fwd_bwd(fn) for name, fn in fns.items()}
        if use_compile:
            candidates[COMPILE]()  # compile outside the timed region
        return candidates

    return setup


def cases(device="cpu", mode="quick", dtypes=None, shapes=None, use_compile=True):
    out = []
    dtypes = dtypes or ["float32"] + (["bfloat16"] if mode == "full" else [])
    gather_shapes = [s for s in shapes or GATHER_SHAPES if len(s) == 3]
    mlm_shapes = [s for s in shapes or MLM_SHAPES + (MLM_FULL_SHAPES if mode == "full" else []) if len(s) == 4]
    for shape in gather_shapes:
        for dtype in dtypes:
            rows_bytes = round(LABELLED * numel(shape)) * DTYPES[dtype].itemsize
            full_bytes = numel(shape) * DTYPES[dtype].itemsize
            for pass_, nbytes, backward in (
                ("fwd", 2 * rows_bytes, False),
                ("fwd+bwd", 3 * rows_bytes + full_bytes, True),
            ):
                out.append(
                    Case(
                        "gather_masked",
                        tuple(shape),
                        dtype,
                        pass_,
                        nbytes,
                        gather_setup(tuple(shape), dtype, device, backward, use_compile),
                        params={"labelled": LABELLED},
                    )
                )
    for shape in mlm_shapes:
        for dtype in dtypes:
            out.append(
                Case(
                    "mlm_head",
                    tuple(shape),
                    dtype,
                    "fwd+bwd",
                    None,
                    mlm_setup(tuple(shape), dtype, device, use_compile),
                    params={
                        "labelled": LABELLED,
                        "mlm_grad_bytes": mlm_grad_bytes(shape[2], shape[3], DTYPES[dtype].itemsize),
                    },
                )
            )
    return out
