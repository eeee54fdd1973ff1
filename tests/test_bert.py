"""The BERT models: parity with Hugging Face transformers both ways (outputs, losses and every
parameter's gradient), fused against unfused and every backend, checkpoints, bad input."""

import json
import warnings

import pytest
import torch

import fastbert
from fastbert.models import (
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
    checkpoint,
    count_parameters,
)
from tests.utils import VocabMatmuls, assert_grads_match, backend_params, use_backend

transformers = pytest.importorskip("transformers")

CLASSES = ["BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForSequenceClassification"]
FASTBERT = {c.__name__: c for c in (BertModel, BertForPreTraining, BertForMaskedLM, BertForSequenceClassification)}
SMALL = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
)


def hf_model(name, hidden_act="gelu", **kw):
    config = transformers.BertConfig(**{**SMALL, **kw}, hidden_act=hidden_act, attn_implementation="eager")
    return getattr(transformers, name)(config).eval()


def batch(vocab=99, b=3, s=11):
    ids = torch.randint(1, vocab, (b, s))
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 7:] = 0  # padding in the batch
    tt = torch.zeros(b, s, dtype=torch.long)
    tt[:, s // 2 :] = 1
    # labelled real tokens only (unpadded models ignore labels at padding: see test_unpad.py)
    labels = torch.where((torch.rand(b, s) < 0.3) & mask.bool(), ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]  # at least one labelled token
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=tt), labels


def targets(name, labels, b=3):
    if name == "BertForPreTraining":
        return dict(labels=labels, next_sentence_label=torch.randint(0, 2, (b,)))
    if name == "BertForMaskedLM":
        return dict(labels=labels)
    if name == "BertForSequenceClassification":
        return dict(labels=torch.randint(0, 2, (b,)))
    return {}


def objective(name, out, proj):
    """A scalar to differentiate: the loss, or a random projection of BertModel's output."""
    return out.loss if name != "BertModel" else (out.last_hidden_state * proj).sum()


def grads_hf_names(model):
    g = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return checkpoint.to_hf(model, g) if isinstance(model, fastbert.models.bert.BertPreTrainedModel) else g


def run(model, name, inputs, extra, proj):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, **extra)
    objective(name, out, proj).backward()
    return out


def at_real(hidden, inputs, unpad):
    """Unpadded models compute real positions only (zeros elsewhere): compare those."""
    return hidden[inputs["attention_mask"].bool()] if unpad else hidden


@pytest.mark.parametrize("unpad", [True, False], ids=["unpadded", "padded"])
@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
@pytest.mark.parametrize("name", CLASSES)
def test_hugging_face_checkpoint_parity(tmp_path, seed, name, hidden_act, unpad):
    hf = hf_model(name, hidden_act)
    hf.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every weight found, none unused
        fb = FASTBERT[name].from_pretrained(tmp_path, unpad=unpad).eval()
    inputs, labels = batch()
    extra = targets(name, labels)
    proj = torch.randn(3, 11, 32)
    if unpad:  # padding positions are not computed: they carry no gradient
        proj = proj * inputs["attention_mask"][..., None]
    ho, fo = run(hf, name, inputs, extra, proj), run(fb, name, inputs, extra, proj)
    if name == "BertModel":
        torch.testing.assert_close(
            at_real(fo.last_hidden_state, inputs, unpad),
            at_real(ho.last_hidden_state, inputs, unpad),
            rtol=1e-5,
            atol=1e-5,
        )
        torch.testing.assert_close(fo.pooler_output, ho.pooler_output, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(fo.loss, ho.loss, rtol=1e-5, atol=1e-6)
    assert_grads_match(grads_hf_names(fb), grads_hf_names(hf), same_keys=False)


@pytest.mark.parametrize("name", CLASSES)
def test_save_pretrained_loads_in_transformers(tmp_path, seed, name):
    fb = FASTBERT[name](BertConfig(**SMALL, hidden_dropout_prob=0.0)).eval()
    fb.save_pretrained(tmp_path)
    hf, info = getattr(transformers, name).from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    inputs, labels = batch()
    extra = targets(name, labels)
    with torch.no_grad():
        ho, fo = hf.eval()(**inputs, **extra), fb(**inputs, **extra)
    if name == "BertModel":
        torch.testing.assert_close(
            at_real(fo.last_hidden_state, inputs, True),
            at_real(ho.last_hidden_state, inputs, True),
            rtol=1e-5,
            atol=1e-5,
        )
    else:
        torch.testing.assert_close(fo.loss, ho.loss, rtol=1e-5, atol=1e-6)
    if name in MLM_LOGITS:  # eval mode with labels: transformers' full [batch, seq, vocab] logits too
        key = MLM_LOGITS[name]
        assert getattr(fo, key).shape == getattr(ho, key).shape == (3, 11, 99)
        torch.testing.assert_close(
            at_real(getattr(fo, key), inputs, True), at_real(getattr(ho, key), inputs, True), rtol=1e-5, atol=1e-5
        )
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [name]


MLM_LOGITS = {"BertForMaskedLM": "logits", "BertForPreTraining": "prediction_logits"}


@pytest.mark.parametrize("unpad", [True, False], ids=["unpadded", "padded"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("name", list(MLM_LOGITS))
def test_mlm_output_contract(seed, name, fused, unpad):
    """Training mode with labels: logits None and no logits matmul (fused); ``return_logits=True``: the
    labelled rows' ``[M, vocab]`` logits, the full logits at ``labels != -100``; eval mode or no labels:
    the full ``[batch, seq, vocab]`` logits; ``return_logits=False``: no logits in either mode."""
    config = BertConfig(**SMALL, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, fused=fused, unpad=unpad)
    model, key = FASTBERT[name](config), MLM_LOGITS[name]
    inputs, labels = batch()
    extra, labelled = targets(name, labels), labels != -100  # batch(): labels at real tokens only
    with torch.no_grad():
        full = getattr(model.eval()(**inputs), key)
    assert full.shape == (3, 11, 99)
    model.train()
    with VocabMatmuls(99) as seen:
        out = model(**inputs, **extra)
    assert getattr(out, key) is None
    if fused:
        assert seen.shapes == []  # the loss never builds logits
    with VocabMatmuls(99) as seen:
        rows = model(**inputs, **extra, return_logits=True)
    assert getattr(rows, key).shape == (int(labelled.sum()), 99)
    if fused:
        assert seen.shapes == [(int(labelled.sum()), 99)]  # one matmul, on the labelled rows
    torch.testing.assert_close(getattr(rows, key), full[labelled], rtol=1e-5, atol=1e-5)
    assert torch.equal(rows.loss, out.loss)
    model.eval()
    evaluated = model(**inputs, **extra)
    torch.testing.assert_close(getattr(evaluated, key), full, rtol=0, atol=0)
    torch.testing.assert_close(evaluated.loss, out.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(**inputs, **extra, return_logits=True).loss, out.loss, rtol=1e-5, atol=1e-6)
    quiet = model(**inputs, **extra, return_logits=False)
    assert getattr(quiet, key) is None
    torch.testing.assert_close(quiet.loss, out.loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="return_logits must be None, True or False"):
        model(**inputs, **extra, return_logits="rows")
    with pytest.raises(TypeError):
        model(*inputs.values(), *extra.values(), True)  # with_accuracy / return_logits are keyword-only


def test_logits_without_labels_match(tmp_path, seed):
    hf = hf_model("BertForPreTraining")
    hf.save_pretrained(tmp_path)
    fb = BertForPreTraining.from_pretrained(tmp_path).eval()
    inputs, _ = batch()
    with torch.no_grad():
        ho, fo = hf(**inputs), fb(**inputs)
    torch.testing.assert_close(
        at_real(fo.prediction_logits, inputs, True), at_real(ho.prediction_logits, inputs, True), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(fo.seq_relationship_logits, ho.seq_relationship_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params("cpu"))
def test_fused_matches_unfused_on_every_backend(seed, backend):
    """Training mode without dropout: the fused model on each backend against the same weights on
    eager PyTorch (``fused=False``), losses, accuracies and every gradient."""
    config = BertConfig(**SMALL, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    fused = BertForPreTraining(config).train()
    eager = BertForPreTraining(config.replace(fused=False)).train()
    eager.load_state_dict(fused.state_dict())
    inputs, labels = batch()
    extra = dict(labels=labels, next_sentence_label=torch.tensor([0, 1, 1]), with_accuracy=True)
    with use_backend(backend):
        fo = run(fused, "BertForPreTraining", inputs, extra, None)
    eo = run(eager, "BertForPreTraining", inputs, extra, None)
    for name in ("loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy"):
        torch.testing.assert_close(getattr(fo, name), getattr(eo, name), rtol=1e-5, atol=1e-6)
    assert_grads_match(grads_hf_names(fused), grads_hf_names(eager), same_keys=False)


@pytest.mark.parametrize("unpad", [True, False], ids=["unpadded", "padded"])
@pytest.mark.parametrize("backend", backend_params("cuda"))
def test_fused_matches_unfused_on_cuda(seed, backend, unpad):
    """The same check on CUDA tensors (GPU only): every fused kernel of the backend inside the model,
    unpadded (varlen attention) and padded."""
    config = BertConfig(**SMALL, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, unpad=unpad)
    fused = BertForPreTraining(config).train().cuda()
    eager = BertForPreTraining(config.replace(fused=False)).train().cuda()
    eager.load_state_dict(fused.state_dict())
    inputs, labels = batch()
    inputs = {k: v.cuda() for k, v in inputs.items()}
    extra = dict(labels=labels.cuda(), next_sentence_label=torch.tensor([0, 1, 1]).cuda(), with_accuracy=True)
    with use_backend(backend):
        fo = run(fused, "BertForPreTraining", inputs, extra, None)
    eo = run(eager, "BertForPreTraining", inputs, extra, None)
    for name in ("loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy"):
        torch.testing.assert_close(getattr(fo, name), getattr(eo, name), rtol=1e-5, atol=1e-6)
    assert_grads_match(grads_hf_names(fused), grads_hf_names(eager), same_keys=False)


def test_sdpa_attention_matches_fused(seed):
    config = BertConfig(**SMALL)
    fused = BertModel(config).eval()
    sdpa = BertModel(config.replace(attention="sdpa")).eval()
    sdpa.load_state_dict(fused.state_dict())
    inputs, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            sdpa(**inputs).last_hidden_state, fused(**inputs).last_hidden_state, rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_fully_masked_row_attention_is_zero_on_every_attention(seed, training):
    """A sequence with no key to attend to gets a zero attention output from masked_softmax, eager
    softmax and SDPA alike (not uniform attention over its padding), also with dropout; the other
    rows agree."""
    from fastbert.models.bert import BertModel as _BM
    from fastbert.models.layers import SelfAttention

    config = BertConfig(**SMALL, attention_probs_dropout_prob=0.1 if training else 0.0)
    x = torch.randn(3, 5, 32)
    key_mask = torch.tensor([[1, 1, 1, 0, 0], [0] * 5, [1] * 5]).bool()
    outs, state = {}, SelfAttention(config).state_dict()
    for name, changes in {"fused": {}, "eager": dict(fused=False), "sdpa": dict(attention="sdpa")}.items():
        attn = SelfAttention(config.replace(**changes)).train(training)
        attn.load_state_dict(state)
        outs[name] = attn(x, *_BM.masks(key_mask, x))
        assert (outs[name][1] == 0).all(), name
    if not training:
        torch.testing.assert_close(outs["eager"], outs["fused"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs["sdpa"], outs["fused"], rtol=1e-5, atol=1e-5)


def test_dropout_is_on_in_training_and_reproducible(seed):
    model = BertForPreTraining(BertConfig(**SMALL)).train()
    inputs, labels = batch()
    losses = []
    for _ in range(2):
        torch.manual_seed(7)
        losses.append(model(**inputs, labels=labels).loss)
    torch.manual_seed(8)
    other = model(**inputs, labels=labels).loss
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], other)
    with torch.no_grad():
        a, b = model.eval()(**inputs, labels=labels).loss, model(**inputs, labels=labels).loss
    assert torch.equal(a, b)


def test_old_names_bare_encoder_and_missing_heads(tmp_path, seed):
    """A BertModel checkpoint in pytorch_model.bin with TF-era gamma/beta names loads into
    BertForPreTraining with the heads reported missing (not silently random)."""
    hf = hf_model("BertModel")
    hf.config.save_pretrained(tmp_path)
    sd = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in hf.state_dict().items()
    }
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.warns(UserWarning, match=r"keep their random initialisation: .*cls\.seq_relationship\.weight"):
        fb = BertForPreTraining.from_pretrained(tmp_path).eval()
    inputs, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            at_real(fb.bert(**inputs).last_hidden_state, inputs, True),
            at_real(hf(**inputs).last_hidden_state, inputs, True),
            rtol=1e-5,
            atol=1e-5,
        )
    with pytest.warns(UserWarning, match=r"not used by this model: .*cls\.predictions\.bias"):
        hf_pre = hf_model("BertForPreTraining")
        hf_pre.save_pretrained(tmp_path / "pre")
        BertModel.from_pretrained(tmp_path / "pre")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with output_loading_info the caller gets the lists, no warning
        fb, info = BertForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
        _, info_pre = BertModel.from_pretrained(tmp_path / "pre", output_loading_info=True)
    heads = {k for k in fb.state_dict() if k.startswith("cls.")} - {"cls.predictions.decoder.weight"}  # tied
    assert set(info["missing_keys"]) == heads, info
    assert info["unexpected_keys"] == []
    assert info_pre["missing_keys"] == []
    assert "cls.predictions.bias" in info_pre["unexpected_keys"]
    assert all(k.startswith("cls.") for k in info_pre["unexpected_keys"]), info_pre


def test_untied_decoder_round_trip(tmp_path, seed):
    fb = BertForMaskedLM(BertConfig(**SMALL, tie_word_embeddings=False))
    assert fb.cls.predictions.decoder.weight is not fb.bert.embeddings.word_embeddings.weight
    fb.save_pretrained(tmp_path)
    back = BertForMaskedLM.from_pretrained(tmp_path)
    torch.testing.assert_close(back.cls.predictions.decoder.weight, fb.cls.predictions.decoder.weight)
    tied = BertForMaskedLM(BertConfig(**SMALL))
    assert tied.cls.predictions.decoder.weight is tied.bert.embeddings.word_embeddings.weight


def test_mismatched_config_raises(tmp_path):
    hf_model("BertModel").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match its config.json"):
        BertModel.from_pretrained(tmp_path, hidden_size=64, num_attention_heads=4)
    with pytest.raises(FileNotFoundError, match="config.json"):
        BertModel.from_pretrained(tmp_path / "nowhere")


def _tiny_checkpoint(tmp_path, **config):
    model = BertModel(BertConfig(**{**SMALL, **config}))
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize(
    "name,shape",
    [
        ("encoder.layer.1.attention.self.query.weight", [32, 33]),
        ("encoder.layer.0.attention.self.key.bias", [31]),
        ("encoder.layer.0.attention.self.value.weight", [33, 32]),
        ("encoder.layer.0.intermediate.dense.weight", [38, 32]),
    ],
)
def test_wrong_shaped_weight_is_named_with_both_shapes(tmp_path, name, shape):
    """A checkpoint tensor of the wrong shape (a query/key/value part included, which used to fail in
    torch.cat or be reported as the joined qkv) raises one line naming it, expected and found."""
    from safetensors.torch import load_file, save_file

    _tiny_checkpoint(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    want = list(sd[name].shape)
    sd[name] = torch.zeros(shape)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="does not match its config.json") as err:
        BertModel.from_pretrained(tmp_path)
    msg = str(err.value)
    assert f"{name}: expected shape {want}, found {shape}" in msg and "\n" not in msg, msg
    assert "qkv" not in msg and msg.count("expected shape") == 1, msg
    parts = {k: v for k, v in sd.items() if "layer.0.attention.self" in k or "layer.1.attention.self" in k}
    if "query" in name or "key" in name or "value" in name:  # without the model's shapes: still named
        with pytest.raises(ValueError, match=name.replace(".", r"\.") + r" \[" + ", ".join(map(str, shape))):
            checkpoint.from_hf(parts, "")


@pytest.mark.parametrize(
    "field,value,match",
    [
        (None, [1, 2], "config.json must hold a JSON object of fields, got a list"),
        ("hidden_size", "32", r"hidden_size must be a positive int, got '32' \(str\)"),
        ("num_hidden_layers", None, r"num_hidden_layers must be a positive int, got None"),
        ("num_attention_heads", True, r"num_attention_heads must be a positive int, got True \(bool\)"),
        ("hidden_dropout_prob", None, r"hidden_dropout_prob must be a number in \[0, 1\), got None"),
        (
            "attention_probs_dropout_prob",
            "0.1",
            r"attention_probs_dropout_prob must be a number in \[0, 1\), got '0.1'",
        ),
        ("layer_norm_eps", "1e-12", r"layer_norm_eps must be a positive number, got '1e-12'"),
        ("initializer_range", None, "initializer_range must be a non-negative number"),
        ("hidden_act", ["gelu"], r"hidden_act must be one of .*got \['gelu'\]"),
        ("tie_word_embeddings", "false", r"tie_word_embeddings must be true or false \(a bool\), got 'false'"),
        ("tie_word_embeddings", 0, r"tie_word_embeddings must be true or false \(a bool\), got 0"),
        ("classifier_dropout", "0.1", r"classifier_dropout must be null or a number in \[0, 1\), got '0.1'"),
        ("pad_token_id", "0", r"pad_token_id must be null or an int"),
        ("id2label", ["a", "b"], r"id2label must be an object"),
    ],
)
def test_config_json_of_wrong_types_names_the_field(tmp_path, field, value, match):
    """A config.json holding a list, strings for numbers, null, or a string for a bool raises
    ValueError naming the field (and the file), never a TypeError from deep inside or a silent
    misreading (``"false"`` is truthy: it used to tie the decoder)."""
    _tiny_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    if field is None:
        cfg = value
    else:
        cfg[field] = value
        cfg.pop("num_labels", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match) as err:
        BertForMaskedLM.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)
    (tmp_path / "config.json").write_text('{"hidden_size": 32,')
    with pytest.raises(ValueError, match="is not valid JSON"):
        BertModel.from_pretrained(tmp_path)


def test_config_accepts_what_hugging_face_writes():
    """null classifier_dropout / pad_token_id, ints for float fields: accepted as before."""
    cfg = BertConfig.from_hf_dict(
        {
            **SMALL,
            "classifier_dropout": None,
            "pad_token_id": None,
            "hidden_dropout_prob": 0,
            "layer_norm_eps": 1,
            "tie_word_embeddings": False,
        }
    )
    assert cfg.pad_token_id is None and cfg.hidden_dropout_prob == 0 and cfg.tie_word_embeddings is False
    assert BertForMaskedLM(cfg).cls.predictions.decoder.weight is not None


def test_bad_input():
    model = BertForPreTraining(BertConfig(**SMALL))
    ids = torch.randint(0, 99, (2, 9))
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 99\)"):
        model(torch.full((2, 9), 99))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(ids, attention_mask=torch.ones(2, 8))
    with pytest.raises(ValueError, match=r"token_type_ids must be in \[0, 2\)"):
        model(ids, token_type_ids=torch.full((2, 9), 2))
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(torch.randn(2, 9))
    with pytest.raises(ValueError, match="labels must have shape"):
        model(ids, labels=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="not a multiple"):
        BertConfig(hidden_size=100, num_attention_heads=12)


def test_bf16_autocast_cpu(seed):
    model = BertForPreTraining(BertConfig(**SMALL, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    inputs, labels = batch()
    extra = dict(labels=labels, next_sentence_label=torch.tensor([0, 1, 1]))
    ref = model(**inputs, **extra).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs, **extra).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(loss.float(), ref, rtol=5e-2, atol=5e-2)


def test_presets_parameter_counts_and_config_json(tmp_path):
    assert count_parameters(BertModel(BertConfig.from_preset("base"))) == 109_482_240
    assert count_parameters(BertForPreTraining(BertConfig.from_preset("base"))) == 110_106_428
    large = BertConfig.from_preset("large")
    assert (large.num_hidden_layers, large.hidden_size, large.num_attention_heads, large.intermediate_size) == (
        24,
        1024,
        16,
        4096,
    )
    for name, approx in (("gelu", "none"), ("gelu_new", "tanh"), ("gelu_pytorch_tanh", "tanh")):
        cfg = BertConfig.from_hf_dict(
            transformers.BertConfig(hidden_act=name, layer_norm_eps=1e-7, hidden_dropout_prob=0.2).to_dict()
        )
        assert cfg.gelu_approximate == approx and cfg.layer_norm_eps == 1e-7 and cfg.hidden_dropout_prob == 0.2
        cfg.to_json_file(tmp_path / "config.json")
        assert BertConfig.from_json_file(tmp_path / "config.json").replace(extra={}) == cfg.replace(extra={})
    with pytest.raises(ValueError, match="unknown preset"):
        BertConfig.from_preset("huge")
