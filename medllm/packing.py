"""Rows for causal-LM training: packing documents or dialogues into rows, and the collator that batches them.

A row is ``input_ids`` (+ ``labels`` for SFT; pretraining labels are the ids themselves) and, when several
documents share it, ``position_ids`` that restart at 0 where each document begins. The collator turns the
restarts into isolation: no token attends across documents (a block-diagonal causal mask, or the
position ids alone for attention kernels that read them, e.g. flash_attention_2), and the first token of
each document is never a loss target (it would be predicted from the previous document's last token).
So a packed row gives the same loss as its documents run one by one.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Sequence

IGNORE_INDEX = -100  # label ignored by the loss (transformers' CrossEntropy ignore_index)
# Attention implementations that isolate packed documents by position_ids without a mask (varlen kernels,
# or transformers' own packed-sequence detection for flex attention); the others get a 4D mask.
POSITION_ISOLATED = ("flash_attention_2", "flash_attention_3", "flex_attention")


def pack_documents(documents: Sequence[Sequence[int]], block_size: int) -> dict[str, list]:
    """Concatenate token lists into rows of ``block_size`` tokens (pretraining packing).

    A document that does not fit in the current row continues at the start of the next one. The last
    row may be shorter (nothing is dropped). Returns ``input_ids``, ``position_ids`` (restarting at each
    document and each row) and ``length``, one entry per row.
    """
    rows: dict[str, list] = {"input_ids": [], "position_ids": [], "length": []}
    ids: list[int] = []
    positions: list[int] = []

    def flush():
        rows["input_ids"].append(ids)
        rows["position_ids"].append(positions)
        rows["length"].append(len(ids))

    for document in documents:
        start = 0
        while start < len(document):
            take = min(block_size - len(ids), len(document) - start)
            ids.extend(document[start:start + take])
            positions.extend(range(take))
            start += take
            if len(ids) == block_size:
                flush()
                ids, positions = [], []
    if ids:
        flush()
    return rows


def split_documents(documents: Sequence[Sequence[int]], block_size: int) -> dict[str, list]:
    """One document per row (padded later); a document longer than ``block_size`` becomes several rows."""
    rows: dict[str, list] = {"input_ids": [], "length": []}
    for document in documents:
        for start in range(0, len(document), block_size):
            piece = list(document[start:start + block_size])
            rows["input_ids"].append(piece)
            rows["length"].append(len(piece))
    return rows


def best_fit_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins of at most ``capacity`` total length (best-fit decreasing).

    Each item (longest first) goes to the fullest bin it still fits in, else a new bin. Items longer
    than ``capacity`` get a bin of their own. Deterministic for the same lengths.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for index in order:
        slot = bisect.bisect_left(free, (lengths[index], -1))
        if slot < len(free):
            room, bin_index = free.pop(slot)
        else:
            room, bin_index = capacity, len(bins)
            bins.append([])
        bins[bin_index].append(index)
        room -= lengths[index]
        if room > 0:
            bisect.insort(free, (room, bin_index))
    return bins


def pack_examples(batch: dict[str, list], max_length: int) -> dict[str, list]:
    """Batched ``datasets.map`` function: pack tokenized dialogues (input_ids, labels) into rows of at most
    ``max_length`` tokens, with ``position_ids`` restarting at each dialogue."""
    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "length": []}
    for members in best_fit_bins([len(ids) for ids in batch["input_ids"]], max_length):
        ids, labels, positions = [], [], []
        for index in sorted(members):  # keep the dialogues in their original order within a row
            ids += batch["input_ids"][index]
            labels += batch["labels"][index]
            positions += range(len(batch["input_ids"][index]))
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["position_ids"].append(positions)
        rows["length"].append(len(ids))
    return rows


@dataclass
class CausalLMCollator:
    """Pad rows to the longest in the batch; build labels, position ids and the attention mask.

    ``attn_implementation`` decides how packed documents are kept apart: ``sdpa`` gets a boolean
    block-diagonal causal mask ``[batch, 1, q, k]`` (True = may attend), ``eager`` the same as an
    additive float mask (0 / dtype-min) in ``mask_dtype``, and position-aware kernels (flash attention)
    only the restarted ``position_ids``. Batches without packed rows get a plain 2D padding mask.

    The batch also carries ``num_real_tokens`` (tokens that are not padding), which the trainer pops
    before the forward pass to report real tokens per second.
    """

    pad_token_id: int
    attn_implementation: str = "sdpa"
    mask_dtype: Any = None  # torch dtype of the additive mask (eager attention); default float32

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        batch_size, longest = len(features), max(lengths)
        input_ids = torch.full((batch_size, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)
        # Padding continues as one more "document" with its own restarted positions, so it never attends to,
        # nor is attended by, real tokens, and no row of the mask is empty.
        position_ids = torch.zeros((batch_size, longest), dtype=torch.long)
        for row, (feature, length) in enumerate(zip(features, lengths)):
            input_ids[row, :length] = torch.tensor(feature["input_ids"], dtype=torch.long)
            row_labels = feature.get("labels")
            labels[row, :length] = torch.tensor(feature["input_ids"] if row_labels is None else row_labels)
            row_positions = feature.get("position_ids")
            if row_positions is not None:
                position_ids[row, :length] = torch.tensor(row_positions, dtype=torch.long)
            else:
                position_ids[row, :length] = torch.arange(length)
            position_ids[row, length:] = torch.arange(longest - length)
        starts = position_ids == 0
        labels[starts] = IGNORE_INDEX  # a document's first token is not predicted from the one before it
        real = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
        # A plain int: it stays on the host (no device sync to read it), the trainer pops it before the forward.
        batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "num_real_tokens": sum(lengths)}
        packed = bool((starts & real).sum(dim=1).gt(1).any())
        if not packed:
            batch["attention_mask"] = real.long()
            return batch
        batch["position_ids"] = position_ids
        if self.attn_implementation in POSITION_ISOLATED:
            return batch
        segments = starts.long().cumsum(dim=1)
        causal = torch.ones(longest, longest, dtype=torch.bool).tril()
        allowed = (segments[:, :, None] == segments[:, None, :]) & causal  # [batch, q, k]
        if self.attn_implementation == "eager":
            dtype = self.mask_dtype or torch.float32
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            batch["attention_mask"] = mask[:, None]
        else:
            batch["attention_mask"] = allowed[:, None]
        return batch

