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
# A padding-free row of up to this many tokens is one masked sdpa call (AttentionPlan). DPO steps on the sample
# data, CPU, 4 pairs a batch (about 200 tokens a row): 11% faster than the per-segment batches on the tiny model and
# 8% on small; 8 pairs (about 400): 8% and 5%; 16 pairs (about 800): 14% slower (benchmarks/README.md).
ONE_CALL_TOKENS = 512


def register_varlen_attention() -> None:
    """Register ``sdpa_varlen`` with transformers: sdpa over the segments of a padding-free row.

    A padding-free batch is one row holding every document of the batch, with ``cu_seq_lens_q`` (the
    documents' start offsets and the total, as flash attention's varlen kernels take them). Each document
    attends to itself, causally: the same result as one document per row, without the padding, and on rows longer
    than :data:`ONE_CALL_TOKENS` without computing the masked-out blocks a block-diagonal mask costs (which grow
    with the square of the row; :class:`AttentionPlan`).
    ``attention_segments`` (an :class:`AttentionPlan`) describes rows whose segments also see a shared prefix, as
    DPO's rejected replies see their prompt. Inputs with neither (generation, evaluation outside the trainer)
    get plain sdpa with its usual mask. The name never reaches a saved config.json.
    """
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def sdpa_varlen_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            cu_seq_lens_q=None, attention_segments=None, **kwargs):
        one_row = query.shape[0] == 1 and query.shape[2] == key.shape[2]  # a padding-free training row
        plan = attention_segments
        if one_row and plan is None and cu_seq_lens_q is not None:
            plan = AttentionPlan.for_documents(cu_seq_lens_q)
        if not one_row or plan is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        return plan.attend(sdpa_attention_forward, module, query, key, value, dropout=dropout, scaling=scaling,
                           **kwargs), None

    def varlen_mask(*args, attention_mask=None, **kwargs):
        # A padding-free batch (no 2D mask) needs none: its segments say what attends to what. Building the
        # block-diagonal mask transformers would derive from the restarting position ids is skipped.
        return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)

    # Under --torch_compile the layers around it are compiled, not this: the plan is worked out in Python per batch
    # and would make the compiler trace (and recompile) the layer again for every new arrangement of documents.
    AttentionInterface.register(VARLEN_ATTENTION, torch.compiler.disable(sdpa_varlen_forward))
    AttentionMaskInterface.register(VARLEN_ATTENTION, varlen_mask)


class AttentionPlan:
    """What each query of one padding-free row attends to, worked out once per forward pass for every layer.

    ``segments`` lists ``(query_start, query_end, key_ranges)`` in row order: the queries of
    ``[query_start, query_end)`` see the keys of ``key_ranges`` (concatenated), the last range being the segment
    itself, causally (the i-th query sees every key before the segment and the segment's first i + 1). A
    document is ``(start, end, ((start, end),))``.

    A row of up to ``one_call_tokens`` tokens is one sdpa call over the whole row with a ``[T, T]`` mask
    (:attr:`mask`): it computes the blocks no segment needs too, but at a few hundred tokens the gathers, the extra
    calls and their backward cost more than those blocks. Longer rows are gathered into right-padded batches of
    segments, one sdpa call each (:attr:`batches`), so a layer makes a few calls instead of one per segment:
    segments that see only themselves in causal calls (a real query never sees the padding, which comes after it),
    the others with a boolean mask. Segments of similar size share a call: a batch is closed when padding would
    more than double its attention area.
    """

    _last_documents: tuple = (None, None)  # (cu_seq_lens_q, its plan): the layers of one forward pass share it

    def __init__(self, segments: Sequence[tuple], device=None, one_call_tokens: int = ONE_CALL_TOKENS):
        import torch

        def as_tensor(rows: list[list[int]], width: int):  # right-padded with token 0, which padding reads
            return torch.tensor([row + [0] * (width - len(row)) for row in rows], dtype=torch.long, device=device)

        segments = [s for s in segments if s[1] > s[0]]
        tokens = max((end for _, end, _ in segments), default=0)
        # (query index [S, Lq], key index [S, Lk] or None (the queries'), mask [S, 1, Lq, Lk] or None)
        self.batches: list[tuple] = []
        self.take = None  # the output slot of each row position, unless the slots are the row in order
        self.mask = self._row_mask(segments, tokens, device) if tokens <= one_call_tokens else None  # [1, 1, T, T]
        self._additive_masks: dict = {}  # dtype -> self.mask as 0 / the dtype's minimum, built once per pass
        if self.mask is not None:
            return
        produced = []  # the row position of each output slot of the batches, flattened and concatenated (-1: padding)
        for causal in (True, False):
            group = [s for s in segments if (tuple(map(tuple, s[2])) == ((s[0], s[1]),)) == causal]
            for batch in self._similar_sizes(group):
                queries = [list(range(start, end)) for start, end, _ in batch]
                keys = [[i for a, b in ranges for i in range(a, b)] for _, _, ranges in batch]
                longest_query, longest_key = max(map(len, queries)), max(map(len, keys))
                key_index, mask = None, None
                if not causal:
                    query_lengths = torch.tensor([len(q) for q in queries], device=device)
                    key_index = as_tensor(keys, longest_key)
                    key_lengths = torch.tensor([len(k) for k in keys], device=device)[:, None, None]
                    key_steps = torch.arange(longest_key, device=device)[None, None, :]
                    query_steps = torch.arange(longest_query, device=device)[None, :, None]
                    # query i of a segment with q queries and k keys sees key j < k with j <= i + k - q; padding
                    # queries see every real key, so no row of the mask is empty
                    mask = (key_steps < key_lengths) & (
                        key_steps <= query_steps + key_lengths - query_lengths[:, None, None])
                    mask = mask[:, None]
                self.batches.append((as_tensor(queries, longest_query), key_index, mask))
                produced += [i for q in queries for i in q + [-1] * (longest_query - len(q))]
        if produced != list(range(len(produced))):
            slots = {position: slot for slot, position in enumerate(produced) if position >= 0}
            self.take = torch.tensor([slots[position] for position in range(len(slots))], device=device)

    @staticmethod
    def _similar_sizes(segments: list[tuple]) -> list[list[tuple]]:
        """Segments in batches, largest first, each padded to at most twice the attention area it needs."""
        def size(segment):  # (queries, keys)
            return segment[1] - segment[0], sum(b - a for a, b in segment[2])

        batches: list[list[tuple]] = []
        longest_query = longest_key = needed = 0
        for segment in sorted(segments, key=lambda s: size(s)[::-1], reverse=True):
            queries, keys = size(segment)
            wider = max(longest_query, queries)
            if batches and (len(batches[-1]) + 1) * wider * longest_key <= 2 * (needed + queries * keys):
                batches[-1].append(segment)
                longest_query, needed = wider, needed + queries * keys
            else:
                batches.append([segment])
                longest_query, longest_key, needed = queries, keys, queries * keys
        return batches

    @staticmethod
    def _row_mask(segments: list[tuple], tokens: int, device):
        """``[1, 1, T, T]``, True where a query of the row may attend to a key, by the rule of the segments."""
        import torch

        mask = torch.zeros(tokens, tokens, dtype=torch.bool, device=device)
        for start, end, key_ranges in segments:
            *before, (own_start, own_end) = key_ranges
            for key_start, key_end in before:
                mask[start:end, key_start:key_end] = True
            own, queries = own_end - own_start, end - start
            mask[start:end, own_start:own_end] = torch.ones(queries, own, dtype=torch.bool, device=device).tril(
                own - queries)
        return mask[None, None]

    @classmethod
    def for_documents(cls, bounds) -> "AttentionPlan":
        """The plan of documents that each attend to themselves (``bounds``: start offsets and the total)."""
        last_bounds, last_plan = cls._last_documents
        if last_bounds is bounds:  # the same tensor reaches every layer of one forward pass
            return last_plan
        offsets = bounds.tolist()
        plan = cls([(start, end, ((start, end),)) for start, end in zip(offsets[:-1], offsets[1:])], bounds.device)
        AttentionPlan._last_documents = (bounds, plan)
        return plan

    def attend(self, attend, module, query, key, value, **kwargs):
        """Attention of one row ``[1, heads, tokens, dim]`` by this plan; returns ``[1, tokens, heads, dim]``.
        ``attend`` is transformers' ``sdpa_attention_forward``."""
        import torch

        if self.mask is not None:  # sdpa turns a boolean mask into an additive one at every call: done once here
            additive = self._additive_masks.get(query.dtype)
            if additive is None:
                additive = torch.zeros(self.mask.shape, dtype=query.dtype, device=query.device)
                additive = self._additive_masks[query.dtype] = additive.masked_fill_(
                    ~self.mask, torch.finfo(query.dtype).min)
            return attend(module, query, key, value, additive, is_causal=False, **kwargs)[0]

        def as_batch(states, index):  # [1, heads, tokens, dim] -> [segments, heads, longest, dim]
            return states[0][:, index].transpose(0, 1)

        pieces = []
        for query_index, key_index, mask in self.batches:
            key_index = query_index if key_index is None else key_index
            output = attend(module, as_batch(query, query_index), as_batch(key, key_index),
                            as_batch(value, key_index), mask, is_causal=mask is None, **kwargs)[0]
            pieces.append(output.flatten(0, 1))  # [segments, longest, heads, dim] -> [slots, heads, dim]
        output = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        return (output if self.take is None else output[self.take])[None]  # the real queries' outputs, in row order


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

