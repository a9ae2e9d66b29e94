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
# sdpa run document by document over a padding-free batch (see register_varlen_attention).
VARLEN_ATTENTION = "sdpa_varlen"


def register_varlen_attention() -> None:
    """Register ``sdpa_varlen`` with transformers: sdpa run segment by segment over a padding-free row.

    A padding-free batch is one row holding every document of the batch, with ``cu_seq_lens_q`` (the
    documents' start offsets and the total, as flash attention's varlen kernels take them). Each document
    attends to itself through torch's causal sdpa (documents of similar length in one batched call, see
    :func:`documents_as_batch`): the same result as one document per row, without the padding, and without
    computing the masked-out blocks a block-diagonal mask costs (which grow with the square of the row). ``attention_segments`` (see :func:`segment_attention`) describes rows whose
    segments also see a shared prefix, as DPO's chosen and rejected replies see their prompt. Inputs with
    neither (generation, evaluation outside the trainer) get plain sdpa with its usual mask. The name never
    reaches a saved config.json.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def sdpa_varlen_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            cu_seq_lens_q=None, attention_segments=None, **kwargs):
        one_row = query.shape[0] == 1 and query.shape[2] == key.shape[2]  # a padding-free training row
        if one_row and attention_segments is None and cu_seq_lens_q is not None:
            bounds = cu_seq_lens_q.tolist()
            lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
            if len(lengths) * max(lengths) ** 2 <= 2 * sum(n * n for n in lengths):  # similar lengths: one call
                return documents_as_batch(sdpa_attention_forward, module, query, key, value, cu_seq_lens_q,
                                          max(lengths), dropout=dropout, scaling=scaling, **kwargs), None
            attention_segments = [(start, end, ((start, end),)) for start, end in zip(bounds[:-1], bounds[1:])]
        if not one_row or attention_segments is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        return segment_attention(sdpa_attention_forward, module, query, key, value, attention_segments,
                                 dropout=dropout, scaling=scaling, **kwargs), None

    def varlen_mask(*args, attention_mask=None, **kwargs):
        # A padding-free batch (no 2D mask) needs none: its segments say what attends to what. Building the
        # block-diagonal mask transformers would derive from the restarting position ids is skipped.
        return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)

    AttentionInterface.register(VARLEN_ATTENTION, sdpa_varlen_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, varlen_mask)


def documents_as_batch(attend, module, query, key, value, bounds, longest: int, **kwargs):
    """Causal attention of each document of one row ``[1, heads, tokens, dim]``, as one batch of documents.

    The documents (``bounds``: their start offsets and the total) become the rows of a right-padded batch, so one
    causal sdpa call serves them all: a real query never sees the padding, which comes after it. Returns
    ``[1, tokens, heads, dim]``. Worth it when the documents have similar lengths (little padded attention).
    """
    import torch

    starts, lengths = bounds[:-1].long(), (bounds[1:] - bounds[:-1]).long()
    steps = torch.arange(longest, device=query.device)
    real = steps[None, :] < lengths[:, None]  # [documents, longest]
    total = query.shape[2]
    index = torch.where(real, starts[:, None] + steps[None, :], total)  # padding reads a zero row after the end

    def as_batch(states):  # [1, heads, tokens, dim] -> [documents, heads, longest, dim]
        padded = torch.cat([states[0], states.new_zeros(states.shape[1], 1, states.shape[3])], dim=1)
        return padded[:, index].transpose(0, 1)

    output = attend(module, as_batch(query), as_batch(key), as_batch(value), None, is_causal=True, **kwargs)[0]
    return output[real][None]  # [documents, longest, heads, dim] -> the real tokens, in row order


def segment_attention(attend, module, query, key, value, segments, **kwargs):
    """Attention of one row ``[1, heads, tokens, dim]`` in segments; returns ``[1, tokens, heads, dim]``.

    ``segments`` lists ``(query_start, query_end, key_ranges)`` in row order: the queries of
    ``[query_start, query_end)`` see the keys of ``key_ranges`` (concatenated), the last range being the
    segment itself, causally (the i-th query sees every key before the segment and the segment's first
    i + 1). ``attend`` is transformers' ``sdpa_attention_forward``.
    """
    import torch

    pieces = []
    for query_start, query_end, key_ranges in segments:
        if query_end <= query_start:
            continue
        q = query[:, :, query_start:query_end]
        if len(key_ranges) == 1:
            (key_start, key_end), = key_ranges
            pieces.append(attend(module, q, key[:, :, key_start:key_end], value[:, :, key_start:key_end], None,
                                 is_causal=True, **kwargs)[0])
            continue
        k = torch.cat([key[:, :, start:end] for start, end in key_ranges], dim=2)
        v = torch.cat([value[:, :, start:end] for start, end in key_ranges], dim=2)
        q_len, k_len = q.shape[2], k.shape[2]
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
        pieces.append(attend(module, q, k, v, mask[None, None], is_causal=False, **kwargs)[0])
    return torch.cat(pieces, dim=1)


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

    ``attn_implementation`` decides how packed documents are kept apart: ``sdpa_varlen`` gets the whole
    batch as one padding-free row with ``cu_seq_lens_q`` (every row's documents, one after another);
    ``sdpa`` a boolean block-diagonal causal mask ``[batch, 1, q, k]`` (True = may attend), ``eager``
    the same as an additive float mask (0 / dtype-min) in ``mask_dtype``, and position-aware kernels
    (flash attention) only the restarted ``position_ids``. Batches without packed rows get a plain 2D
    padding mask.

    With ``select_logits`` the batch also names the positions whose next token is a label
    (``logits_to_keep``) and those labels (``shift_labels``): the model computes the output head and the
    loss there only, e.g. on the replies of SFT dialogues instead of every token. The loss is the same.

    The batch also carries ``num_real_tokens`` (tokens that are not padding), which the trainer pops
    before the forward pass to report real tokens per second.
    """

    pad_token_id: int
    attn_implementation: str = "sdpa"
    mask_dtype: Any = None  # torch dtype of the additive mask (eager attention); default float32
    select_logits: bool = False

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
        if self.attn_implementation == VARLEN_ATTENTION:
            return self._with_selected_logits(self._flattened(input_ids[real], labels[real], position_ids[real]))
        # A plain int: it stays on the host (no device sync to read it), the trainer pops it before the forward.
        batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "num_real_tokens": sum(lengths)}
        packed = bool((starts & real).sum(dim=1).gt(1).any())
        if not packed:
            batch["attention_mask"] = real.long()
            return self._with_selected_logits(batch)
        batch["position_ids"] = position_ids
        if self.attn_implementation in POSITION_ISOLATED:
            return self._with_selected_logits(batch)
        segments = starts.long().cumsum(dim=1)
        causal = torch.ones(longest, longest, dtype=torch.bool).tril()
        allowed = (segments[:, :, None] == segments[:, None, :]) & causal  # [batch, q, k]
        if self.attn_implementation == "eager":
            dtype = self.mask_dtype or torch.float32
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            batch["attention_mask"] = mask[:, None]
        else:
            batch["attention_mask"] = allowed[:, None]
        return self._with_selected_logits(batch)

    @staticmethod
    def _flattened(input_ids, labels, position_ids) -> dict[str, Any]:
        """One padding-free row of every real token, with the documents' start offsets (``sdpa_varlen``)."""
        import torch

        starts = torch.nonzero(position_ids == 0).squeeze(1)
        bounds = torch.cat([starts, torch.tensor([len(input_ids)])]).to(torch.int32)
        return {"input_ids": input_ids[None], "labels": labels[None], "position_ids": position_ids[None],
                "cu_seq_lens_q": bounds, "num_real_tokens": len(input_ids)}

    def _with_selected_logits(self, batch: dict[str, Any]) -> dict[str, Any]:
        if not self.select_logits:
            return batch
        import torch

        targets = batch["labels"][:, 1:]  # position i predicts token i + 1
        keep = torch.nonzero(targets.ne(IGNORE_INDEX).any(dim=0)).squeeze(1)  # shared by the rows of the batch
        batch["logits_to_keep"] = keep
        batch["shift_labels"] = targets[:, keep]
        return batch

