"""fastbert.patch keeps transformers' own contracts (the ones transformers' modeling tests check):

* MLM heads in eval mode with labels return transformers' outputs exactly as shaped
  (``[batch, seq, vocab]`` logits, same tuple layout); in training mode with labels the logits are
  None (never built) and the loss is transformers' loss; ``return_logits=True`` gives the labelled
  rows' logits ``[M, vocab]`` (transformers' full logits at ``labels != -100``), ``return_logits=False``
  no logits in eval mode either (the contract of ``fastbert.models``, tests/test_bert.py);
* patch_transformers keeps an attention the caller chose (``from_pretrained`` / ``_from_config``
  ``attn_implementation=``, or the config) and picks ``"fastbert"`` only where none was chosen, on
  the model's own copy of the config: a config the caller passed in is never written by fastbert;
* ``config.output_attentions = True`` works with the fastbert attention (forward and save_pretrained),
  while other non-eager attentions keep transformers' error."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastbert.patch import patch, patch_transformers, supported, unpatch_transformers  # noqa: E402
from tests.test_patch import CONFIGS  # noqa: E402  (the families' configs)
from tests.utils import VocabMatmuls  # noqa: E402

V, S, H, LAYERS, HEADS = 53, 9, 32, 2, 4
MLM = [("bert", "ForMaskedLM"), ("bert", "ForPreTraining"), ("roberta", "ForMaskedLM"), ("electra", "ForMaskedLM")]


def config(kind, **extra):
    name, _, own = CONFIGS[kind]
    return getattr(transformers, name)(
        vocab_size=V,
        hidden_size=H,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=37,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=S + 4,
        **own,
        **extra,
    )


def model_class(kind, what):
    if kind not in supported():
        pytest.skip(f"this transformers has no {kind}")
    return getattr(transformers, CONFIGS[kind][1] + what)


def inputs(kind, what, gen, labels=True):
    pad = CONFIGS[kind][2].get("pad_token_id", 0)
    mask = torch.ones(3, S, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    ids = torch.randint(3, V, (3, S), generator=gen).masked_fill(mask == 0, pad)
    out = dict(input_ids=ids, attention_mask=mask)
    if labels:
        lab = torch.where(torch.rand(3, S, generator=gen) < 0.4, ids, -100)
        lab[0, 0] = 5
        out["labels"] = lab.masked_fill(mask == 0, -100)
        if what == "ForPreTraining":
            out["next_sentence_label"] = torch.randint(0, 2, (3,), generator=gen)
    return out


def logits_key(what):
    return "prediction_logits" if what == "ForPreTraining" else "logits"


@pytest.mark.parametrize("unpad", [True, False], ids=["unpad", "padded"])
@pytest.mark.parametrize("kind,what", MLM)
def test_eval_mode_with_labels_returns_transformers_outputs(kind, what, unpad, seed):
    torch.manual_seed(seed)
    model = model_class(kind, what)(config(kind)).eval()
    batch = inputs(kind, what, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want, want_tuple = model(**batch), model(**batch, return_dict=False)
        patch(model, unpad=unpad)
        got, got_tuple = model(**batch), model(**batch, return_dict=False)
    key = logits_key(what)
    assert got[key].shape == want[key].shape == (3, S, V)
    real = batch["attention_mask"] != 0  # unpadded: zeros at padding, so the logits there differ
    at = real if unpad else slice(None)
    torch.testing.assert_close(got[key][at], want[key][at], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)  # labels are -100 at padding
    assert len(got_tuple) == len(want_tuple)
    assert [t.shape for t in got_tuple] == [t.shape for t in want_tuple]


@pytest.mark.parametrize("kind,what", MLM)
def test_training_mode_with_labels_builds_no_logits(kind, what, seed):
    torch.manual_seed(seed)
    model = model_class(kind, what)(config(kind)).train()
    batch = inputs(kind, what, torch.Generator().manual_seed(seed))
    want = model(**batch)
    with torch.no_grad():
        full = model.eval()(**batch)[logits_key(what)]  # transformers' own (dropout is 0 in these configs)
    model.train()
    patch(model)
    with VocabMatmuls(V) as seen:
        got = model(**batch)
    got_tuple = model(**batch, return_dict=False)
    assert getattr(got, logits_key(what)) is None and seen.shapes == []  # no logits matmul
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    # the tuple drops the None, as transformers' tuples do: the loss first, then what was computed
    assert torch.equal(got_tuple[0], got.loss) and len(got_tuple) == (2 if what == "ForPreTraining" else 1)
    no_labels = {k: v for k, v in batch.items() if k not in ("labels", "next_sentence_label")}
    assert model(**no_labels)[logits_key(what)].shape == (3, S, V)  # without labels: the full logits
    labelled = batch["labels"] != -100
    with VocabMatmuls(V) as seen:
        rows = model(**batch, return_logits=True)  # the labelled rows' logits, one more matmul
    assert rows[logits_key(what)].shape == (int(labelled.sum()), V) and len(seen.shapes) == 1
    torch.testing.assert_close(rows[logits_key(what)], full[labelled], rtol=1e-5, atol=1e-5)
    assert torch.equal(rows.loss, got.loss)
    model.eval()
    quiet = model(**batch, return_logits=False)  # eval mode, no logits: the fused loss only
    assert getattr(quiet, logits_key(what)) is None
    torch.testing.assert_close(quiet.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert model(**batch, return_logits=True)[logits_key(what)].shape == (3, S, V)  # eval: the full logits


def attention_configs(model):
    return {m.config._attn_implementation for m in model.modules() if getattr(m, "config", None) is not None}


@pytest.mark.parametrize("kind", ["bert", "roberta", "electra"])
def test_patch_transformers_keeps_the_attention_the_caller_chose(kind, tmp_path, seed):
    cls = model_class(kind, "ForMaskedLM")
    prefix = CONFIGS[kind][1]
    torch.manual_seed(seed)
    cls(config(kind)).save_pretrained(tmp_path)
    explicit_config = config(kind)
    explicit_config._attn_implementation = "sdpa"
    patch_transformers()
    try:
        built = {
            "from_pretrained sdpa": (cls.from_pretrained(tmp_path, attn_implementation="sdpa"), "sdpa"),
            "from_pretrained eager": (cls.from_pretrained(tmp_path, attn_implementation="eager"), "eager"),
            "config eager": (cls(config(kind, attn_implementation="eager")), "eager"),
            "config._attn_implementation sdpa": (cls(explicit_config), "sdpa"),
            "_from_config eager": (cls._from_config(config(kind), attn_implementation="eager"), "eager"),
            "from_pretrained fastbert": (cls.from_pretrained(tmp_path, attn_implementation="fastbert"), "fastbert"),
            "none chosen (from_pretrained)": (cls.from_pretrained(tmp_path), "fastbert"),
            "none chosen (config)": (cls(config(kind)), "fastbert"),
        }
    finally:
        unpatch_transformers()
    batch = inputs(kind, "ForMaskedLM", torch.Generator().manual_seed(seed), labels=False)
    plain = cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        want = plain(**batch).logits
    real = batch["attention_mask"] != 0
    for how, (model, attention) in built.items():
        assert attention_configs(model) == {attention}, how
        assert (
            type(model.get_submodule(f"{model.base_model_prefix}.encoder.layer.0.output")).__name__
            == f"Fused{prefix}Output"
        ), how  # the other layers are fused either way
        unpadded = type(model.base_model).__name__ == f"Fused{prefix}Model"
        assert unpadded == (attention == "fastbert"), how  # unpadded execution needs the fastbert attention
        if how.startswith("from_pretrained"):
            with torch.no_grad():
                got = model.eval()(**batch).logits
            torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5, msg=how)
    model = built["from_pretrained eager"][0]
    model.set_attn_implementation("sdpa")  # switching later works as in transformers
    assert attention_configs(model) == {"sdpa"}


def test_patch_transformers_never_writes_the_callers_config(seed):
    cls = model_class("bert", "ForMaskedLM")
    mine, twin = config("bert"), config("bert")
    cls(twin)  # what transformers itself does to a config it builds from (it resolves the default attention)
    patch_transformers()
    try:
        model = cls(mine)
    finally:
        unpatch_transformers()
    assert model.config._attn_implementation == "fastbert"
    assert mine._attn_implementation == twin._attn_implementation == "sdpa"
    assert mine.to_dict() == twin.to_dict()
    assert model.config is not mine
    # the model and every module that shared the caller's config share the model's copy
    holders = [m for m in model.modules() if getattr(m, "config", None) is not None]
    assert len(holders) > 2 and all(m.config is model.config for m in holders)
    model.config.output_attentions = True  # the model's config, not the caller's
    assert not mine.output_attentions
    again = cls(mine)  # a model built later from the caller's config is transformers' own
    assert type(again).__name__ == "BertForMaskedLM" and again.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("kind", ["bert", "roberta", "electra"])
def test_output_attentions_through_the_config(kind, tmp_path, seed):
    cls = model_class(kind, "ForSequenceClassification")
    torch.manual_seed(seed)
    model = cls(config(kind, attn_implementation="eager")).eval()
    batch = inputs(kind, "Model", torch.Generator().manual_seed(seed), labels=False)
    with torch.no_grad():
        want = model(**batch, output_attentions=True).attentions
    patch(model)
    assert model.config._attn_implementation == "fastbert"
    model.config.output_attentions = True
    with torch.no_grad():
        got = model(**batch).attentions
    assert len(got) == LAYERS
    for g, w in zip(got, want):
        assert g.shape == (3, HEADS, S, S)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path)  # save_pretrained validates the config: fastbert passes as eager does
    assert transformers.AutoConfig.from_pretrained(tmp_path).output_attentions
    model.config.output_attentions = False
    with torch.no_grad():
        assert model(**batch).attentions is None
    # transformers' check still refuses the attentions that return no probabilities
    sdpa = config(kind, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="not supported when using the `attn_implementation` set to sdpa"):
        sdpa.output_attentions = True
