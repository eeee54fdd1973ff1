"""Masked-LM batches: padding, attention masks, and BERT's 15% / 80-10-10 masking.

Per sequence, the candidates are the tokens that are neither special ([CLS], [SEP], [PAD], ...) nor
padding. ``round(mlm_probability * candidates)`` of them (at least one) are selected, as the
original ``create_pretraining_data.py`` does (a fixed count rather than a coin per token, so every
sequence carries its share of labels). Each selected token gets its original id as its label (the
rest ``-100``) and its input is replaced by [MASK] with probability 0.8, by a random token drawn
uniformly from the non-special vocabulary with probability 0.1, and kept with probability 0.1.

Whole-word masking groups each word's ``##`` continuation pieces with the piece before them, visits
the words in random order and selects whole words as long as they fit the same budget (a word that
would exceed it is skipped and a shorter one may still fit), so the rate stays ~15% and no word is
split. The 80/10/10 choice is then made once per word and applied to all its pieces (Hugging Face's
``DataCollatorForWholeWordMask`` applies it per token and loses the random replacement for words).

Randomness comes from the collator's own ``torch.Generator`` (``seed``), whose state is part of
``state_dict()``, so a resumed run draws the same masks.
"""

import torch

IGNORE = -100


class MaskingCollator:
    """``collator(examples) -> dict`` of ``input_ids``, ``token_type_ids``, ``attention_mask``,
    ``labels`` (``[batch, length]``, padded to the longest example or to ``pad_to``) and
    ``next_sentence_label`` (``[batch]``, when the examples carry one).

    Args:
        vocab_size, mask_id, pad_id: of the tokenizer.
        special_ids: ids never selected and never used as random replacements.
        continuation: bool ``[vocab_size]``, True for ``##`` pieces (whole-word masking needs it).
        examples: ``(input_ids, token_type_ids[, next_sentence_label])`` tuples (lists or 1-D
            tensors) or dicts with those keys.
    """

    def __init__(
        self,
        vocab_size,
        mask_id,
        pad_id,
        special_ids,
        continuation=None,
        mlm_probability=0.15,
        whole_word=False,
        mask_prob=0.8,
        random_prob=0.1,
        pad_to=None,
        seed=0,
    ):
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"MaskingCollator: mlm_probability must be in (0, 1), got {mlm_probability!r}")
        if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
            raise ValueError(
                f"MaskingCollator: mask_prob {mask_prob} and random_prob {random_prob} must be >= 0 with a sum <= 1"
            )
        special = torch.zeros(vocab_size, dtype=torch.bool)
        special[torch.tensor(sorted({*special_ids, pad_id, mask_id}), dtype=torch.long)] = True
        if whole_word and continuation is None:
            raise ValueError("MaskingCollator: whole_word=True needs the continuation mask (True for ## pieces)")
        self.vocab_size, self.mask_id, self.pad_id = vocab_size, mask_id, pad_id
        self.special = special
        self.replacements = (~special).nonzero().reshape(-1)
        if self.replacements.numel() == 0:
            raise ValueError("MaskingCollator: the vocabulary has no non-special token to draw replacements from")
        self.continuation = None if continuation is None else torch.as_tensor(continuation, dtype=torch.bool)
        self.p, self.whole_word = mlm_probability, whole_word
        self.mask_prob, self.random_prob, self.pad_to = mask_prob, random_prob, pad_to
        self.generator = torch.Generator().manual_seed(seed)

    # ---- resumable randomness
    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])

    # ---- batching
    def __call__(self, examples):
        rows = [self._unpack(e) for e in examples]
        if not rows:
            raise ValueError("MaskingCollator: an empty batch")
        length = max(len(ids) for ids, _, _ in rows)
        if self.pad_to is not None:
            if length > self.pad_to:
                raise ValueError(f"MaskingCollator: an example of {length} tokens is longer than pad_to={self.pad_to}")
            length = self.pad_to
        b = len(rows)
        input_ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        token_type_ids = torch.zeros((b, length), dtype=torch.long)
        attention_mask = torch.zeros((b, length), dtype=torch.long)
        for i, (ids, types, _) in enumerate(rows):
            input_ids[i, : len(ids)], token_type_ids[i, : len(ids)], attention_mask[i, : len(ids)] = ids, types, 1
        labels = torch.full_like(input_ids, IGNORE)
        for i, (ids, _, _) in enumerate(rows):
            self._mask_row(input_ids[i, : len(ids)], labels[i, : len(ids)])
        out = dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask, labels=labels)
        nsp = [n for _, _, n in rows]
        if all(n is not None for n in nsp):
            out["next_sentence_label"] = torch.tensor(nsp, dtype=torch.long)
        return out

    def _unpack(self, e):
        if isinstance(e, dict):
            ids, types, nsp = e["input_ids"], e.get("token_type_ids"), e.get("next_sentence_label")
        else:
            ids, types, nsp = (tuple(e) + (None, None))[:3]
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        types = torch.zeros_like(ids) if types is None else torch.as_tensor(types, dtype=torch.long).reshape(-1)
        if types.shape != ids.shape:
            raise ValueError(
                f"MaskingCollator: token_type_ids {list(types.shape)} do not match input_ids {list(ids.shape)}"
            )
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"MaskingCollator: token ids must be in [0, {self.vocab_size})")
        return ids, types, None if nsp is None else int(nsp)

    def _rand(self, *shape):
        return torch.rand(shape, generator=self.generator)

    def _mask_row(self, ids, labels):
        """Select and replace in place (``ids``, ``labels``: one unpadded row)."""
        candidates = (~self.special[ids]).nonzero().reshape(-1)
        n = candidates.numel()
        if n == 0:
            return
        budget = max(1, round(self.p * n))
        if self.whole_word:
            groups = self._select_words(ids, candidates, budget)
        else:
            pick = candidates[torch.randperm(n, generator=self.generator)[:budget]]
            groups = [pick[i : i + 1] for i in range(pick.numel())]
        if not groups:
            return
        action = self._rand(len(groups))  # one draw per group (per word under whole-word masking)
        for group, a in zip(groups, action.tolist()):
            labels[group] = ids[group]
            if a < self.mask_prob:
                ids[group] = self.mask_id
            elif a < self.mask_prob + self.random_prob:
                draw = torch.randint(self.replacements.numel(), (group.numel(),), generator=self.generator)
                ids[group] = self.replacements[draw]

    def _select_words(self, ids, candidates, budget):
        """Whole words (a piece and its following ## pieces, all candidates) in random order, as
        long as they fit ``budget`` tokens."""
        starts = ~self.continuation[ids[candidates]]
        starts[0] = True  # a row starting with a ## piece: it begins a word of its own
        # a word also ends where the candidates are not adjacent (a special token in between)
        gaps = torch.ones_like(starts)
        gaps[1:] = candidates[1:] != candidates[:-1] + 1
        word_of = torch.cumsum(starts | gaps, 0) - 1
        words = [candidates[word_of == w] for w in range(int(word_of[-1]) + 1)]
        chosen, used = [], 0
        for w in torch.randperm(len(words), generator=self.generator).tolist():
            if used + words[w].numel() <= budget:
                chosen.append(words[w])
                used += words[w].numel()
            if used == budget:
                break
        return chosen
