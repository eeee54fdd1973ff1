"""AdamW's decay groups, and checkpoints: exact resume, atomic writes, corruption detected."""

import pytest
import torch

from fastbert.data.masking import MaskingCollator
from fastbert.models import BertConfig, BertForPreTraining, count_parameters
from fastbert.train import checkpoint as ckpt
from fastbert.train import (
    decay_groups,
    latest_checkpoint,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    save_checkpoint,
)

CONFIG = BertConfig(
    vocab_size=120,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=32,
)
PAD, MASK, CLS, SEP = 0, 4, 2, 3


def batches(seed, n=6, b=4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ex = []
        for _ in range(b):
            k = int(torch.randint(6, 20, (), generator=g))
            ids = [CLS] + torch.randint(5, 120, (k,), generator=g).tolist() + [SEP]
            ex.append((ids, [0] * len(ids), int(torch.randint(0, 2, (), generator=g))))
        out.append(ex)
    return out


def setup(seed):
    torch.manual_seed(seed)
    model = BertForPreTraining(CONFIG).train()  # dropout on: the RNG state must be restored too
    opt = make_optimizer(model, lr=1e-3)
    sched = make_scheduler(opt, total_steps=6, warmup_steps=2)
    collate = MaskingCollator(120, MASK, PAD, {0, 1, 2, 3, 4}, seed=seed)
    return model, opt, sched, collate


def train(model, opt, sched, collate, data, start, stop):
    losses = []
    for step in range(start, stop):
        opt.zero_grad(set_to_none=True)
        loss = model(**collate(data[step])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def test_decay_groups_exclude_biases_and_layernorm():
    model = BertForPreTraining(CONFIG)
    decay, no_decay = decay_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert any("LayerNorm.weight" in names[id(p)] for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == count_parameters(model)


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, seed):
    data = batches(seed)
    full = train(*setup(seed), data, 0, 6)
    model, opt, sched, collate = setup(seed)
    first = train(model, opt, sched, collate, data, 0, 3)
    save_checkpoint(tmp_path, model, opt, sched, 3, extra={"collator": collate.state_dict(), "position": 3})
    torch.manual_seed(seed + 99)  # a fresh process would start from other RNG states
    model2, opt2, sched2, collate2 = setup(seed + 1)
    state = load_checkpoint(latest_checkpoint(tmp_path), model2, opt2, sched2)
    collate2.load_state_dict(state["extra"]["collator"])
    assert state["step"] == 3 and state["extra"]["position"] == 3
    rest = train(model2, opt2, sched2, collate2, data, state["extra"]["position"], 6)
    assert first + rest == full


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched, _ = setup(0)
    good = save_checkpoint(tmp_path, model, opt, sched, 1)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, model, opt, sched, 2)
    assert latest_checkpoint(tmp_path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1"]


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    model, opt, sched, _ = setup(0)
    path = save_checkpoint(tmp_path, model, opt, sched, 1)
    (path / "trainer_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="trainer_state.pt"):
        load_checkpoint(path, model, opt, sched)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read the model weights"):
        load_checkpoint(path, model, opt, sched)
    (tmp_path / "latest").write_text("step-7\n")
    with pytest.raises(ValueError, match="does not exist"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "none") is None


def test_latest_must_name_a_checkpoint_of_this_run(tmp_path):
    model, opt, sched, _ = setup(0)
    run, other = tmp_path / "run", tmp_path / "other"
    save_checkpoint(run, model, opt, sched, 1)
    elsewhere = save_checkpoint(other, model, opt, sched, 5)
    pointer = run / "latest"
    for text, message in [
        ("", "is empty"),
        ("\n", "is empty"),
        ("../other/step-5", "not a checkpoint folder"),
        (str(elsewhere), "not a checkpoint folder"),
        ("step-1/..", "not a checkpoint folder"),
        ("model.safetensors", "not a checkpoint folder"),
    ]:
        pointer.write_text(text)
        with pytest.raises(ValueError, match=message):
            latest_checkpoint(run)
    (run / "step-5").symlink_to(elsewhere)  # a step folder that is really another run's
    pointer.write_text("step-5\n")
    with pytest.raises(ValueError, match="leads outside"):
        latest_checkpoint(run)
    pointer.write_text("step-1\n")
    assert latest_checkpoint(run) == run / "step-1"


def test_trainer_state_is_checked_against_its_folder(tmp_path):
    model, opt, sched, _ = setup(0)
    path = save_checkpoint(tmp_path, model, opt, sched, 2, extra={"position": 2})
    good = torch.load(path / ckpt.STATE, weights_only=True)

    def damaged(change, message):
        state = {**good}
        change(state)
        torch.save(state, path / ckpt.STATE)
        with pytest.raises(ValueError, match=message):
            load_checkpoint(path, model, opt, sched)

    damaged(lambda s: s.update(step=7), "says step 7 but its folder is step-2")  # a hand-edited step
    damaged(lambda s: s.update(step="2"), "step is a str, expected int")
    damaged(lambda s: s.update(step=True), "step is a bool")
    damaged(lambda s: s.pop("optimizer"), "lacks optimizer")
    damaged(lambda s: s.update(extra=[1]), "extra is a list, expected dict")
    damaged(lambda s: s.update(optimizer={"state": {}, "param_groups": []}), "does not fit the optimizer")
    damaged(lambda s: s.update(rng_cpu=torch.zeros(3)), "does not fit")
    torch.save([1, 2], path / ckpt.STATE)
    with pytest.raises(ValueError, match="holds a list, not a fastbert trainer state"):
        load_checkpoint(path, model, opt, sched)
    torch.save(good, path / ckpt.STATE)
    assert load_checkpoint(path, model, opt, sched)["step"] == 2
