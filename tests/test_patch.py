"""fastbert.patch on transformers' own BERT-family models: patched vs unpatched outputs, losses and
every parameter gradient (fp32, padded batches, train mode without dropout and eval mode; MLM logits:
None in training with labels, transformers' full logits in eval), the fused
ops really called, unpatch bit-identical, patching twice harmless, patch_transformers for models
built later, torch.compile, transformers' Trainer, and bad input."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastbert  # noqa: E402
from fastbert import ops  # noqa: E402
from fastbert.patch import FAMILIES, patch, patch_transformers, supported, unpatch, unpatch_transformers  # noqa: E402
from tests.utils import assert_grads_match  # noqa: E402

V, S, B = 101, 13, 3
CONFIGS = {
    "bert": ("BertConfig", "Bert", dict()),
    "roberta": ("RobertaConfig", "Roberta", dict(pad_token_id=1)),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRoberta", dict(pad_token_id=1)),
    "camembert": ("CamembertConfig", "Camembert", dict(pad_token_id=1)),
    "electra": ("ElectraConfig", "Electra", dict(embedding_size=24)),
}
KINDS = ("Model", "ForMaskedLM", "ForSequenceClassification", "ForPreTraining")


def config(kind, hidden_act="gelu", dropout=0.0, **extra):
    name, _, own = CONFIGS[kind]
    return getattr(transformers, name)(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_act=hidden_act,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        max_position_embeddings=S + 4,
        num_labels=3,
        **own,
        **extra,
    )


def build(kind, what, seed, **cfg):
    cls = getattr(transformers, CONFIGS[kind][1] + what)
    torch.manual_seed(seed)
    return cls(config(kind, **cfg))


def batch(what, gen):
    ids = torch.randint(3, V, (B, S), generator=gen)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    out = dict(input_ids=ids, attention_mask=mask)
    if what in ("ForMaskedLM", "ForPreTraining"):
        labels = torch.where(torch.rand(B, S, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
        labels[0, 0] = 7  # at least one labelled token
        out["labels"] = labels.masked_fill(mask == 0, -100)
    if what == "ForPreTraining":
        out["next_sentence_label"] = torch.randint(0, 2, (B,), generator=gen)
    if what == "ForSequenceClassification":
        out["labels"] = torch.randint(0, 3, (B,), generator=gen)
    return out


def step(model, inputs, proj):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    loss = out.loss if getattr(out, "loss", None) is not None else (out.last_hidden_state * proj).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, loss.detach(), grads


@pytest.fixture
def calls(monkeypatch):
    """How many times each fused op ran."""
    counts = {}
    for name in (
        "bias_gelu",
        "layernorm_residual",
        "masked_softmax",
        "gather_masked",
        "linear_cross_entropy",
        "varlen_attention",
        "unpad",
        "pad",
    ):
        real = getattr(ops, name)

        def counted(*a, _real=real, _name=name, **k):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*a, **k)

        monkeypatch.setattr(ops, name, counted)
    return counts


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind,what", [(k, w) for k in CONFIGS for w in KINDS if w != "ForPreTraining" or k == "bert"])
def test_patched_matches_transformers(kind, what, train, seed, calls):
    if kind not in supported():
        pytest.skip(f"this transformers has no {kind}")
    model = build(kind, what, seed).train(train)
    gen = torch.Generator().manual_seed(seed)
    inputs, proj = batch(what, gen), torch.randn(B, S, 32, generator=gen)
    want_out, want_loss, want_grads = step(model, inputs, proj)

    report = patch(model, unpad=False)  # the padded fused path (unpadded: tests/test_patch_unpad.py)
    assert report.replaced["bias_gelu"] == 2 and report.replaced["layernorm_residual"] == 4
    assert report.replaced["attention"] == 1 and model.config._attn_implementation == "fastbert"
    out, loss, grads = step(model, inputs, proj)
    mlm = what in ("ForMaskedLM", "ForPreTraining")
    fused_mlm = mlm and train  # eval mode: transformers' own head and loss, full logits
    assert calls["bias_gelu"] == 2 + fused_mlm and calls["layernorm_residual"] == 4 and calls["masked_softmax"] == 2
    assert calls.get("linear_cross_entropy", 0) == fused_mlm
    # the bare model's objective is a projection: a sum of many terms that cancel, so its rounding
    # scales with the terms' magnitudes (1e-6 of them), not with the small result
    atol = 1e-6 if what != "Model" else 1e-6 * (want_out.last_hidden_state * proj).abs().sum().item()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=atol)
    assert_grads_match(grads, want_grads)
    if mlm:  # training with labels: no logits built; eval: transformers' [batch, seq, vocab] logits
        key = "logits" if what == "ForMaskedLM" else "prediction_logits"
        if fused_mlm:
            assert getattr(out, key) is None
        else:
            torch.testing.assert_close(out[key], want_out[key], rtol=1e-5, atol=1e-5)
    elif what == "Model":
        torch.testing.assert_close(out.last_hidden_state, want_out.last_hidden_state, rtol=1e-5, atol=1e-5)

    assert patch(model, unpad=False).replaced == report.replaced  # twice: harmless
    again, loss2, grads2 = step(model, inputs, proj)
    assert torch.equal(loss2, loss)
    unpatch(model)
    assert not any(type(m).__name__.startswith("Fused") for m in model.modules())
    _, loss3, grads3 = step(model, inputs, proj)
    assert torch.equal(loss3, want_loss) and all(torch.equal(grads3[k], g) for k, g in want_grads.items())


@pytest.mark.parametrize("hidden_act", ["gelu_new", "gelu_pytorch_tanh", "relu"])
def test_activations(hidden_act, seed):
    model = build("bert", "ForMaskedLM", seed, hidden_act=hidden_act)
    gen = torch.Generator().manual_seed(seed)
    inputs = batch("ForMaskedLM", gen)
    want = step(model, inputs, None)
    report = patch(model)
    if hidden_act == "relu":
        assert "bias_gelu" not in report.replaced and "'relu'" in str(report)
    else:
        assert report.replaced["bias_gelu"] == 2
    got = step(model, inputs, None)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    assert_grads_match(got[2], want[2])


def test_no_labels_keeps_full_logits_and_dropout_runs(seed):
    model = build("bert", "ForPreTraining", seed, dropout=0.1).eval()
    inputs = batch("Model", torch.Generator().manual_seed(seed))
    want = model(**inputs).prediction_logits
    patch(model)  # unpadded: compare the real positions
    real = inputs["attention_mask"] != 0
    torch.testing.assert_close(model(**inputs).prediction_logits[real], want[real], rtol=1e-5, atol=1e-5)
    model.train()
    a, b = model(**inputs).prediction_logits, model(**inputs).prediction_logits
    assert a.shape == want.shape and not torch.equal(a, b)  # dropout is on in training


def test_patch_transformers_patches_models_built_later(tmp_path, seed):
    torch.manual_seed(seed)
    transformers.BertForMaskedLM(config("bert")).save_pretrained(tmp_path)
    patch_transformers(attention=False)
    try:
        built = transformers.BertForMaskedLM(config("bert"))
    finally:
        unpatch_transformers()
    patch_transformers()
    try:
        loaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path)
    finally:
        unpatch_transformers()
    for m in (built, loaded):
        assert type(m).__name__ == "FusedBertForMaskedLM"
        assert type(m.bert.encoder.layer[0].output).__name__ == "FusedBertOutput"
    assert built.config._attn_implementation != "fastbert" and loaded.config._attn_implementation == "fastbert"
    plain = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert type(plain).__name__ == "BertForMaskedLM"
    inputs = batch("ForMaskedLM", torch.Generator().manual_seed(seed))
    torch.testing.assert_close(loaded(**inputs).loss, plain(**inputs).loss, rtol=1e-5, atol=1e-6)


def test_torch_compile(seed):
    model = build("bert", "ForMaskedLM", seed)
    inputs = batch("ForMaskedLM", torch.Generator().manual_seed(seed))
    want = step(model, inputs, None)
    patch(model)
    compiled = torch.compile(model, dynamic=False)
    got = step(compiled, inputs, None)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    assert_grads_match({k.removeprefix("_orig_mod."): g for k, g in got[2].items()}, want[2])


def test_trainer_lowers_the_loss(tmp_path, seed):
    model = build("bert", "ForMaskedLM", seed)
    patch(model)
    gen = torch.Generator().manual_seed(seed)
    rows = [{k: v[0] for k, v in batch("ForMaskedLM", gen).items()} for _ in range(16)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=seed,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


def test_bad_input():
    with pytest.raises(TypeError, match="expects a transformers PreTrainedModel"):
        patch(torch.nn.Linear(2, 2))
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=50))
    with pytest.raises(ValueError, match="'gpt2' is not supported; supported: bert, roberta"):
        patch(gpt2)
    with pytest.raises(TypeError, match="unknown options"):
        patch_transformers(fast=True)
    decoder = transformers.BertModel(config("bert", is_decoder=True))
    report = patch(decoder)
    assert "attention" not in report.replaced and decoder.config._attn_implementation != "fastbert"
    assert "decoder" in str(report)


def test_every_family_is_described():
    for kind in supported():
        fam = FAMILIES[kind]
        module = __import__(fam.module, fromlist=["_"])
        for suffix in ("SelfOutput", "Output", "Intermediate"):
            assert hasattr(module, fam.prefix + suffix), (kind, suffix)
        for cls in fam.mlm:
            assert hasattr(module, cls), (kind, cls)
    assert fastbert.patch is patch
