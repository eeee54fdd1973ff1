"""``fastbert pretrain`` / ``fastbert finetune`` end to end on a small slice of the bundled novels:
outputs on disk, loss falling, a real SIGINT then ``--resume`` reproducing the uninterrupted run,
and every bad input a clear error (exit status 2) that leaves no checkpoint half-written."""

import json
import signal

import pytest
import torch

import fastbert
from fastbert import cli
from fastbert.data import default_corpus_documents
from fastbert.train import commands, trainer
from tests.utils import within

SMALL = ["--preset", "tiny", "--seq-len", "64", "--vocab-size", "600", "--batch", "8", "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three documents of 250 sentences each, one sentence a paragraph."""
    folder = tmp_path_factory.mktemp("corpus")
    for d in default_corpus_documents()[:3]:
        (folder / f"{d.title}.txt").write_text("\n\n".join(d.sentences[:250]) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def vocab(corpus, tmp_path_factory):
    """One tokenizer for runs that must agree (tokenizers' trainer breaks merge ties in hash order)."""
    from fastbert.data import WordPieceTokenizer, read_documents

    tok = WordPieceTokenizer.train_from_texts([s for d in read_documents(corpus) for s in d.sentences], vocab_size=600)
    return str(tok.save(tmp_path_factory.mktemp("tok")))


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_writes_a_run_and_learns(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "pretrain",
                *SMALL,
                "--corpus",
                str(corpus),
                "--steps",
                "30",
                "--lr",
                "2e-3",
                "--save-every",
                "10",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "MLM accuracy" in text and "tokens/s" in text
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert sum(r["mlm_loss"] for r in rows[-5:]) / 5 < sum(r["mlm_loss"] for r in rows[:5]) / 5 - 0.5
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and 0.0 <= summary["held_out"]["mlm_accuracy"] <= 1.0
    curve = [json.loads(line) for line in (out / "held_out.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [10, 20, 30]  # every checkpoint, the final one last
    assert summary["held_out"] == curve[-1] and [r["step"] for r in summary["held_out_curve"]] == [10, 20, 30]
    assert curve[-1]["mlm_loss"] < curve[0]["mlm_loss"]  # it learns on held-out text too
    assert "held-out MLM accuracy by step: 10: " in text
    assert summary["held_out"]["masked_tokens"] > 0 and summary["tokens_per_s_median"] > 0
    pad = summary["padding"]  # the batches' padding, logged per step; the unpadded model computes none of it
    assert pad["unpadded"] is True and pad["computed_padding"] == 0.0 and "padding; unpadded execution" in text
    assert all(0.0 <= r["padding"] < 1.0 for r in rows)
    assert pad["batch_padding"] == pytest.approx(sum(r["padding"] for r in rows) / len(rows), abs=1e-4)
    assert sorted(p.name for p in out.glob("step-*")) == ["step-20", "step-30"]  # the newest two are kept
    assert (out / "latest").read_text().strip() == "step-30"
    assert (out / "tokenizer" / "vocab.txt").exists()
    assert json.loads((out / "run.json").read_text())["steps"] == 30


@pytest.mark.parametrize("local", [False, True], ids=["plain", "local_attention"])
def test_sigint_then_resume_equals_the_uninterrupted_run(tmp_path, corpus, vocab, monkeypatch, terminal_signals, local):
    args = [*SMALL, "--corpus", str(corpus), "--vocab", vocab, "--steps", "6", "--grad-accum", "2", "--warmup", "2"]
    args += ["--local-attention"] if local else ["--no-local-attention"]
    assert cli.main(["pretrain", *args, "--out", str(tmp_path / "full")]) == 0
    real, calls = trainer.DataStream.next, {"n": 0}

    def next_then_sigint(self):  # a real SIGINT during step 4's second micro-batch
        calls["n"] += 1
        if calls["n"] == 8:
            signal.raise_signal(signal.SIGINT)
        return real(self)

    monkeypatch.setattr(trainer.DataStream, "next", next_then_sigint)
    assert cli.main(["pretrain", *args, "--out", str(tmp_path / "cut")]) == 130
    assert (tmp_path / "cut" / "latest").read_text().strip() == "step-3"
    monkeypatch.setattr(trainer.DataStream, "next", real)
    assert cli.main(["pretrain", "--out", str(tmp_path / "cut"), "--resume", "--no-progress"]) == 0
    assert [r["loss"] for r in metrics(tmp_path / "cut")] == [r["loss"] for r in metrics(tmp_path / "full")]
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["local_attention"] is local
    if local:  # the resumed run pinned the checkpoint's rows: position embeddings as set at the start
        from safetensors.torch import load_file

        from fastbert.models import BertConfig, BertForPreTraining
        from fastbert.train.local_attention import local_attention_init

        cut, full = (load_file(tmp_path / r / "step-6" / "model.safetensors") for r in ("cut", "full"))
        assert all(torch.equal(cut[k], full[k]) for k in full)
        config = BertConfig.from_json_file(tmp_path / "full" / "step-6" / "config.json")
        fresh = local_attention_init(BertForPreTraining(config), seed=0)
        pos = "bert.embeddings.position_embeddings.weight"
        assert torch.equal(cut[pos], fresh.state_dict()[pos])


@pytest.fixture
def terminal_signals():
    """SIGINT/SIGTERM as in a terminal, also when the tests run as a background job (SIGINT ignored)."""
    saved = {
        sig: signal.signal(sig, handler)
        for sig, handler in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL))
    }
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_signal_during_the_update_waits_for_it(terminal_signals):
    w = torch.zeros(3)
    with trainer.SignalGuard() as guard:
        with pytest.raises(KeyboardInterrupt):
            with guard.critical():
                signal.raise_signal(signal.SIGINT)
                w += 1  # still runs: the interrupt is held to the end of the block
        assert w.tolist() == [1, 1, 1]
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)  # outside: at once
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with trainer.SignalGuard():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # an ignored signal stays ignored


def test_finetune_compare(tmp_path, corpus, capsys):
    from fastbert.data import WordPieceTokenizer, read_documents
    from fastbert.data.novels import novel_passages, take_fraction, word_order_passages

    src = tmp_path / "pre"
    assert cli.main(["pretrain", *SMALL, "--corpus", str(corpus), "--steps", "3", "--out", str(src)]) == 0
    out = tmp_path / "ft"
    flags = ["--seq-len", "64", "--max-steps", "4", "--batch", "8", "--no-progress", "--bf16"]
    argv = ["finetune", "--from", str(src), "--corpus", str(corpus), "--compare", *flags, "--out", str(out)]
    assert cli.main([*argv, "--task", "novel", "--seeds", "2", "--seed", "5", "--train-fraction", "0.5"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["bf16"] is True and res["seeds"] == [5, 6] and res["train_fraction"] == 0.5
    assert res["task"] == "novel" and res["classes"] == sorted(p.stem for p in corpus.glob("*.txt"))
    assert res["lr"] == 1e-3  # the default for a small model
    tok = WordPieceTokenizer.load(src / "tokenizer")
    train, test = novel_passages(read_documents(corpus), tok, max_seq_length=64, seed=5)
    assert res["train"] == len(train) and res["test"] == len(test)
    for run in ("pretrained", "scratch"):
        rows = res[run]["seeds"]
        assert [r["seed"] for r in rows] == [5, 6]
        assert [r["train"] for r in rows] == [len(take_fraction(train, 0.5, s)) for s in (5, 6)]
        accs = [r["accuracy"] for r in rows]
        assert all(r["steps"] == 4 and 0.0 <= r["accuracy"] <= 1.0 for r in rows)
        assert res[run]["accuracy"] == pytest.approx(sum(accs) / 2)
        assert res[run]["accuracy_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)
        assert (out / run / "model" / "model.safetensors").exists()
        for r in rows:
            steps = [
                json.loads(line)
                for line in (out / run / f"seed-{r['seed']}" / "finetune_metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "train"
            ]
            assert len(steps) == 4 and all(0.0 <= s["padding"] < 1.0 for s in steps)
            assert r["padding"]["unpadded"] is True
            assert r["padding"]["batch_padding"] == pytest.approx(sum(s["padding"] for s in steps) / 4, abs=1e-4)
    pre, scr = (res[run]["accuracy"] for run in ("pretrained", "scratch"))
    assert res["gain"]["mean"] == pytest.approx(pre - scr)
    assert (out / "finetune.png").stat().st_size > 10_000
    captured = capsys.readouterr()
    assert "over 2 seed(s)" in captured.out and "gain from pretraining" in captured.out
    assert ("no bf16 instructions" in captured.err) == commands.bf16_is_slow("cpu")
    # the default task: the same passages, about half of them shuffled
    assert cli.main([*argv, "--seeds", "1", "--seed", "5", "--lr", "3e-4", "--out", str(tmp_path / "order")]) == 0
    res = json.loads((tmp_path / "order" / "results.json").read_text())
    assert res["task"] == "order" and res["classes"] == ["original order", "shuffled"] and res["lr"] == 3e-4
    orders = [word_order_passages(p, s) for p, s in ((train, 5), (test, 6))]
    assert (res["train"], res["test"]) == tuple(map(len, orders))
    assert res["pretrained"]["seeds"][0]["evals"][-1]["per_class"] != [None, None]
    assert "task order: 2 classes (original order, shuffled)" in capsys.readouterr().out


def test_finetune_refuses_a_checkpoint_without_encoder_weights(tmp_path, corpus, capsys):
    from safetensors.torch import load_file, save_file

    from fastbert.train import latest_checkpoint

    src = tmp_path / "pre"
    assert cli.main(["pretrain", *SMALL, "--corpus", str(corpus), "--steps", "1", "--out", str(src)]) == 0
    weights = latest_checkpoint(src) / "model.safetensors"
    sd = load_file(weights)
    dropped = next(k for k in sd if "layer.1.attention" in k)
    save_file({k: v for k, v in sd.items() if k != dropped}, weights)
    argv = ["finetune", "--from", str(src), "--corpus", str(corpus), "--seq-len", "64", "--max-steps", "1"]
    bad([*argv, "--out", str(tmp_path / "ft"), "--no-progress"], capsys, f"lacks encoder weights (1): {dropped}")


def test_bf16_is_slow_only_on_cpus_without_bf16_instructions(monkeypatch):
    class FakeC:
        def __init__(self, isas):
            self.isas = isas

        def cpu_isas_supported(self):
            return self.isas

    monkeypatch.setattr(fastbert._ext, "C", FakeC(["avx512bf16", "avx512", "avx2", "generic"]))
    assert not commands.bf16_is_slow("cpu")
    monkeypatch.setattr(fastbert._ext, "C", FakeC(["avx2", "generic"]))
    assert commands.bf16_is_slow("cpu") and commands.bf16_is_slow(torch.device("cpu"))
    assert not commands.bf16_is_slow("cuda")


def bad(argv, capsys, match):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err


def test_bad_input_is_a_clear_error(tmp_path, corpus, capsys):
    out = ["--out", str(tmp_path / "o")]
    (tmp_path / "empty").mkdir()
    bad(["pretrain", *SMALL, "--corpus", str(tmp_path / "empty"), *out], capsys, "no .txt files")
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "a.txt").write_bytes("caf\xe9 au lait.\n".encode("latin-1"))
    bad(["pretrain", *SMALL, "--corpus", str(tmp_path / "latin1"), *out], capsys, "not valid UTF-8 at byte offset 3")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "a", "##s"]) + "\n")
    bad(["pretrain", *SMALL, "--corpus", str(corpus), "--vocab", str(vocab), *out], capsys, "[MASK]")
    bad(
        ["pretrain", *SMALL[:2], "--seq-len", "600", "--vocab-size", "600", "--corpus", str(corpus), *out],
        capsys,
        "max_position_embeddings 512",
    )
    bad(["finetune", "--from", str(tmp_path / "nothing")], capsys, "has no tokenizer")
    for flag, value in (("--seeds", "0"), ("--seeds", "101"), ("--train-fraction", "0"), ("--train-fraction", "1.5")):
        bad(["finetune", flag, value], capsys, f"{flag} must be")
    assert not any((tmp_path / "o").glob("step-*"))


def test_resume_from_a_corrupted_checkpoint(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    args = ["pretrain", *SMALL, "--corpus", str(corpus), "--steps", "2", "--out", str(out)]
    assert cli.main(args) == 0
    weights = out / "step-2" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    before = sorted(p.name for p in out.iterdir())
    bad(["pretrain", "--out", str(out), "--resume", "--steps", "4"], capsys, "--steps 4 (run: 2)")
    bad(["pretrain", "--out", str(out), "--resume"], capsys, "cannot read the model weights")
    assert sorted(p.name for p in out.iterdir()) == before  # nothing new, nothing half-written
    assert weights.read_bytes() == data[: len(data) // 2]
    bad(["pretrain", "--out", str(tmp_path / "none"), "--resume"], capsys, "run.json does not exist")


def snapshot(folder):
    """Every file under ``folder``: its bytes and modification time (a rewrite with the same bytes shows)."""
    return {
        p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_bad_flags_are_rejected_before_anything_is_written(tmp_path, corpus, vocab, capsys, monkeypatch):
    out = tmp_path / "run"
    assert (
        cli.main(["pretrain", *SMALL, "--corpus", str(corpus), "--vocab", vocab, "--steps", "2", "--out", str(out)])
        == 0
    )
    before = snapshot(out)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = [
        "pretrain",
        "--preset",
        "tiny",
        "--seq-len",
        "64",
        "--vocab-size",
        "300",
        "--batch",
        "8",
        "--no-progress",
        "--corpus",
        str(corpus),
        "--out",
        str(out),
    ]  # would retrain (and overwrite) the run's tokenizer
    for flags, message in [
        (["--steps", "0"], "--steps must be an int >= 1, got 0"),
        (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["--lr", "nan"], "--lr must be"),
        (["--lr", "0"], "--lr must be"),
        (["--warmup", "inf"], "--warmup must be"),
        (["--warmup", "2.5"], "--warmup must be"),
        (["--steps", "3", "--warmup", "5"], "at most the 3 steps"),
        (["--eval-fraction", "nan"], "--eval-fraction must be"),
        (["--save-every", "-1"], "--save-every must be"),
        (["--seed", str(2**70)], "--seed must be an int in [0, 2**32 - 1]"),
        (["--seed", "-1"], "--seed must be"),
        (["--device", "bogus"], "--device must be cpu, cuda or cuda:N, got 'bogus'"),
        (["--device", "cuda"], "--device cuda: no CUDA GPU is available"),
        (["--seq-len", "600"], "--seq-len must be at most 512"),
        (["--batch", "100000"], "fewer than one batch"),
    ]:
        bad(base + flags, capsys, message)
        assert snapshot(out) == before, flags
    ft = ["finetune", "--from", str(out), "--out", str(tmp_path / "ft"), "--corpus", str(corpus), "--no-progress"]
    for flags, message in [
        (["--lr", "inf"], "--lr must be a finite number > 0"),
        (["--epochs", "0"], "--epochs must be"),
        (["--seed", str(2**70)], "--seed must be"),
        (["--device", "bogus"], "--device must be"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--seq-len", "9999"], "--seq-len must be at most"),
    ]:
        bad(ft + flags, capsys, message)
    assert not (tmp_path / "ft").exists() and snapshot(out) == before


def test_resume_checks_what_it_reads(tmp_path, corpus, vocab, capsys):
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "pretrain",
                *SMALL,
                "--corpus",
                str(corpus),
                "--vocab",
                vocab,
                "--steps",
                "2",
                "--save-every",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    resume = ["pretrain", "--out", str(out), "--resume", "--no-progress"]
    state_file = out / "step-2" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)

    def edited(change):
        s = {**state}
        change(s)
        torch.save(s, state_file)
        return state_file.read_bytes()

    settings = json.loads((out / "run.json").read_text())
    for path, data, message in [
        (out / "latest", b"", "latest is empty"),
        (out / "latest", b"../other/step-2\n", "not a checkpoint folder step-N"),
        (state_file, edited(lambda s: s.update(step=1)), "says step 1 but its folder is step-2"),
        (state_file, edited(lambda s: s.pop("optimizer")), "lacks optimizer"),
        (state_file, edited(lambda s: s.update(step="2")), "step is a str"),
        (state_file, edited(lambda s: s["extra"].update(position=5)), "data position 5 is not step 2"),
        (
            out / "run.json",
            json.dumps({k: v for k, v in settings.items() if k != "steps"}).encode(),
            "lacks the setting(s) steps",
        ),
        (out / "run.json", b"{", "run.json is not valid JSON"),
        (out / "tokenizer" / "tokenizer.json", b'{"version": "1.0", "model": 3', "cannot read"),
    ]:
        original = path.read_bytes() if path != state_file else None
        torch.save(state, state_file)
        path.write_bytes(data)
        before = snapshot(out)
        bad(resume, capsys, message)
        assert snapshot(out) == before, message  # nothing written, no checkpoint pruned
        if original is not None:
            path.write_bytes(original)
    torch.save(state, state_file)
    assert cli.main(resume + ["--steps", "3"]) == 2  # a flag that differs from run.json, as before
    assert sorted(p.name for p in out.glob("step-*")) == ["step-1", "step-2"]


def test_pretrain_on_a_corpus_with_one_huge_line(tmp_path, corpus, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for p in corpus.glob("*.txt"):
        (folder / p.name).write_bytes(p.read_bytes())
    # one line, one sentence of ~280,000 tokens, with an 80,000-character word (61 s to split, once)
    (folder / "one_line.txt").write_text("the cat sat on the mat and " * 40_000 + "x" * 80_000 + " end.\n")
    with within(120):
        assert (
            cli.main(["pretrain", *SMALL, "--corpus", str(folder), "--steps", "1", "--out", str(tmp_path / "r")]) == 0
        )
    assert "NSP pairs" in capsys.readouterr().out
