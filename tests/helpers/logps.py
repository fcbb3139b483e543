"""Summed response log-probabilities the plain way (full logits, log-softmax, gather, masked sum), the reference the
fast paths of rpo.batching are checked against, on a batch of three pairs with prompts of different lengths."""
from __future__ import annotations

import torch

from rpo.batching import collate

# Three pairs: the chosen and rejected sequences of a pair share their prompt; prompts differ in length.
PAIRS = [([5, 6, 7], [8, 9], [10, 11, 12, 13, 14]),
         ([5, 6], [10, 11, 12, 13], [9]),
         ([5, 6, 7, 8, 9, 10], [11], [12, 13])]


def pair_batch():
    seqs = [(p, c) for p, c, _ in PAIRS] + [(p, r) for p, _, r in PAIRS]
    return collate(seqs, pad_id=2)


def plain(model, batch):
    """The reference computation: full logits, log-softmax, gather, masked sum."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["labels_mask"][:, 1:]
    return logp.masked_fill(~mask, 0).sum(1), mask.sum(1)
