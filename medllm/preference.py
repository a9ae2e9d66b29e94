"""Direct preference optimisation: preference pairs become token ids, and trl's DPOTrainer is assembled around them.

One pair, with the glm4 template::

    prompt   [gMASK]<sop>[<|system|>\\n{s}]<|user|>\\n{q}<|assistant|>   template.generation_prompt(messages)
    chosen   \\n{good reply}<|user|>                                      template.reply_text(chosen)
    rejected \\n{bad reply}<|user|>                                       template.reply_text(rejected)

Each part is tokenized on its own, without special tokens added (the template writes them). Lengths are in tokens:

1. the prompt keeps its last ``--max_source_length`` tokens (cut from the left: the question nearest the reply stays);
2. each reply keeps its first ``--max_target_length`` tokens (cut from the right; a cut reply loses its end-of-turn
   token, so the model is never taught to stop mid-sentence);
3. prompt + reply is cut to ``--max_length`` from the right, as trl does, and a pair whose prompt alone fills
   ``--max_length`` is dropped. Cut and dropped pairs are counted in the log.

trl's collator then puts the chosen and rejected rows of a batch into one tensor padded to the longest row of that
batch only. The reference model is the base with the LoRA adapter switched off (no second copy of the weights); a
full-parameter run keeps a frozen copy, or none with ``--precompute_ref_log_probs``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from trl import DPOConfig, DPOTrainer

from medllm.arguments import DataArguments, flag_given
from medllm.errors import MedLLMError
from medllm.logprobs import log_probs_only, use_fast_cpu_head
from medllm.modeling import compile_decoder_layers, unwrap_peft
from medllm.training import (NonFiniteLossGuard, ParameterCountOnce, cached_map, default_callbacks, fingerprint,
                             peak_memory_mb, tokenizer_fingerprint)

logger = logging.getLogger(__name__)

COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "length", "truncated")
# Learning rates used when --learning_rate is not given (trl's own default, 1e-6, barely moves a LoRA adapter).
DEFAULT_LEARNING_RATE = {True: 5e-5, False: 5e-6}  # use_peft -> rate


@dataclass
class DPOArguments(DPOConfig):
    """trl's DPOConfig (every DPO flag: --beta, --loss_type, --max_length, --precompute_ref_log_probs, ...).

    Five changes: bf16 defaults on only where a CUDA GPU supports it (trl turns it on everywhere, which stops a
    CPU run at start-up); gradient checkpointing defaults on only where the model trains on an accelerator (on
    a CPU, where memory is not what limits a run, it made LoRA DPO steps 1.4-1.9x slower: benchmarks/README.md);
    several processes on a machine without an accelerator train on the CPU together (without ``use_cpu`` each
    torchrun process would train alone on all the data); ``trust_remote_code`` comes from ModelArguments (one
    flag, one place); and ``--padding_free`` is the toolkit's (DataArguments: on by default, exact on sdpa),
    which trl 1.16 has switched off in its own DPO.
    """

    trust_remote_code: bool = field(default=False, init=False)
    padding_free: Optional[bool] = field(
        default=None, metadata=next(f.metadata for f in dataclasses.fields(DataArguments) if f.name == "padding_free"))
    gradient_checkpointing: Optional[bool] = field(  # transformers' deprecated alias, the MedicalGPT family's name
        default=None, metadata={"help": (
            "Alias of --activation_checkpointing: recompute activations in the backward pass to save memory, at the "
            "cost of a slower step. Default in DPO: on when training on an accelerator (GPU), off on a CPU.")})

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = not self.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
            self.use_cpu = True  # read when the devices are set up, inside the parent's __post_init__
        if self.gradient_checkpointing is None and self.activation_checkpointing is None:
            from transformers.utils.generic import strtobool

            on_cpu = self.use_cpu or strtobool(os.environ.get("ACCELERATE_USE_CPU", "False"))  # as the Trainer reads it
            self.activation_checkpointing = not on_cpu and torch.accelerator.is_available()
        super().__post_init__()  # makes gradient_checkpointing mirror activation_checkpointing


def apply_dpo_defaults(argv: Sequence[str], training_args, data_args, lora_args, model_args) -> None:
    """Defaults that depend on other flags: the learning rate (LoRA or full) and ``--max_length`` from the
    older ``--max_source_length`` + ``--max_target_length``. Flags given on the command line always win."""
    training_args.trust_remote_code = model_args.trust_remote_code
    training_args.padding_free = False  # trl's own flag (disabled in trl 1.16); data_args.padding_free is ours
    if not flag_given(argv, "--learning_rate"):
        training_args.learning_rate = DEFAULT_LEARNING_RATE[bool(lora_args.use_peft)]
        logger.info("--learning_rate not given: %g for %s DPO.", training_args.learning_rate,
                    "LoRA" if lora_args.use_peft else "full-parameter")
    if training_args.truncation_mode != "keep_start":
        raise MedLLMError(f"--truncation_mode {training_args.truncation_mode}: only keep_start is supported; the "
                          "prompt is cut from the left by --max_source_length instead.")
    for name in ("max_source_length", "max_target_length"):
        value = getattr(data_args, name)
        if value is not None and value < 1:
            raise MedLLMError(f"--{name} {value}: must be at least 1 token.")
    if training_args.max_length is not None and training_args.max_length < 2:
        raise MedLLMError(f"--max_length {training_args.max_length}: must be at least 2 tokens.")
    if (not flag_given(argv, "--max_length") and data_args.max_source_length and data_args.max_target_length):
        training_args.max_length = data_args.max_source_length + data_args.max_target_length
        logger.info("--max_length not given: %d = --max_source_length %d + --max_target_length %d.",
                    training_args.max_length, data_args.max_source_length, data_args.max_target_length)


# --------------------------------------------------------------------------- tokenization

def fit_pair(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int],
             max_source_length: Optional[int], max_target_length: Optional[int],
             max_length: Optional[int]) -> Optional[dict]:
    """Cut one tokenized pair to the limits (see the module docstring); None when the prompt fills ``max_length``.

    Returns ``{prompt_ids, chosen_ids, rejected_ids, length, truncated}``; ``length`` is the longer of the two rows
    (prompt + reply), ``truncated`` whether anything was cut.
    """
    original = (len(prompt_ids), len(chosen_ids), len(rejected_ids))
    if max_source_length is not None:
        prompt_ids = prompt_ids[-max_source_length:]
    if max_target_length is not None:
        chosen_ids, rejected_ids = chosen_ids[:max_target_length], rejected_ids[:max_target_length]
    if max_length is not None:
        if len(prompt_ids) >= max_length:
            return None
        room = max_length - len(prompt_ids)
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        "length": len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)),
        "truncated": (len(prompt_ids), len(chosen_ids), len(rejected_ids)) != original,
    }


def tokenize_pairs(batch: dict, tokenizer, template, max_source_length: Optional[int] = None,
                   max_target_length: Optional[int] = None, max_length: Optional[int] = None) -> dict:
    """A batch of ``{prompt: [messages], chosen: str, rejected: str}`` -> the columns of :data:`COLUMNS`.

    Pairs whose prompt alone fills ``max_length`` are left out (the output may be shorter than the input).
    """

    def ids(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    prompts = ids([template.generation_prompt(messages) for messages in batch["prompt"]])
    chosen = ids([template.reply_text(text) for text in batch["chosen"]])
    rejected = ids([template.reply_text(text) for text in batch["rejected"]])
    out: dict[str, list] = {name: [] for name in COLUMNS}
    for pair in zip(prompts, chosen, rejected):
        fitted = fit_pair(*pair, max_source_length, max_target_length, max_length)
        if fitted is not None:
            for name in COLUMNS:
                out[name].append(fitted[name])
    return out


def tokenize_preference_pairs(splits, tokenizer, template, data_args, training_args, cache_dir: str):
    """Tokenize every split of ``load_preference_pairs`` (cached on disk); logs how many pairs were cut or dropped."""
    from datasets import DatasetDict

    limits = dict(max_source_length=data_args.max_source_length, max_target_length=data_args.max_target_length,
                  max_length=training_args.max_length)
    function = functools.partial(tokenize_pairs, tokenizer=tokenizer, template=template, **limits)
    key = ["dpo-v1", tokenizer_fingerprint(tokenizer), template_fingerprint(template), limits]
    out = DatasetDict()
    for name, split in splits.items():
        tokenized = cached_map(split, function, cache_dir, key, training_args, desc=f"tokenize dpo {name}",
                               num_proc=data_args.preprocessing_num_workers, overwrite=data_args.overwrite_cache)
        dropped, cut = len(split) - len(tokenized), sum(tokenized["truncated"])
        if dropped or cut:
            logger.warning("%s: %d of %d pairs cut to fit (prompt from the left to %s, replies from the right to %s, "
                           "in all %s tokens); %d dropped because the prompt alone fills --max_length.", name, cut,
                           len(split), limits["max_source_length"], limits["max_target_length"],
                           limits["max_length"], dropped)
        if len(tokenized) == 0:
            raise MedLLMError(f"{name}: every pair was dropped because its prompt fills --max_length "
                              f"{limits['max_length']}; raise --max_length or set --max_source_length lower.")
        logger.info("%s: %d pairs, %d tokens in the longest row.", name, len(tokenized), max(tokenized["length"]))
        out[name] = tokenized
    return out


def template_fingerprint(template) -> str:
    """What about a template changes token ids: its name, jinja and reply markup."""
    return fingerprint(template.name, template.to_jinja(), template.reply_text("{reply}"))


# --------------------------------------------------------------------------- trainer

class DPOTrainerWithGuard(NonFiniteLossGuard, ParameterCountOnce, DPOTrainer):
    """trl's DPOTrainer on pairs tokenized here; stops at a non-finite loss; counts real and padded tokens."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._token_counts = [0, 0, 0]  # [computed by the model, real (no padding), completion], training only

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" in dataset.column_names:  # tokenized and cut by tokenize_preference_pairs
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "length" not in self._signature_columns:  # kept for --group_by_length
            self._signature_columns = [*self._signature_columns, "length"]

    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        super()._save(output_dir, state_dict)
        # A continued adapter's frozen reference copy ("ref") is the --peft_path folder itself: not saved again.
        ref_copy = Path(output_dir or self.args.output_dir) / "ref"
        if self.args.should_save and "ref" in getattr(self.model, "peft_config", {}) and ref_copy.is_dir():
            shutil.rmtree(ref_copy)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            mask = inputs["attention_mask"]
            real = int(mask.sum())
            if getattr(unwrap_peft(self.model).base_model, "medllm_shares_prefixes", False):  # prompts computed once
                computed = real - sum(common_prefix_lengths(inputs["input_ids"], mask))
            else:
                computed = mask.numel()
            self._token_counts[0] += computed
            self._token_counts[1] += real
            self._token_counts[2] += int(inputs["completion_mask"].sum())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def token_stats(self, runtime_s: float) -> dict[str, float]:
        """Real tokens per second (chosen and rejected rows, prompts counted in both, no padding), the padded
        share of computed tokens, and computed tokens per real token, summed over processes."""
        counts = torch.tensor(self._token_counts, dtype=torch.float64, device=self.accelerator.device)
        computed, real, completion = self.accelerator.reduce(counts, reduction="sum").tolist()
        return {"train_real_tokens_per_second": real / runtime_s if runtime_s else 0.0,
                "train_pad_fraction": max(0.0, 1 - real / computed) if computed else 0.0,
                "train_computed_per_real_token": computed / real if real else 0.0,
                "train_completion_tokens": completion}


def load_reference_model(model_args, lora_args, training_args, model_max_length: Optional[int]):
    """The frozen reference: None with LoRA (the adapter is switched off instead) or with precomputed log-probs;
    otherwise a second copy of the base weights."""
    if lora_args.use_peft or training_args.precompute_ref_log_probs:
        return None
    from medllm.modeling import load_model

    reference = load_model(model_args, model_max_length=model_max_length)
    reference.requires_grad_(False)
    return reference.eval()


def switch_to_the_reference_cheaply() -> None:
    """Make trl's per-step switch from the LoRA policy to its reference (the adapter off, gradient checkpointing off,
    under ``torch.no_grad``) flip the same flags on layers found once per model.

    trl switches through peft's ``disable_adapter``, which builds a status report of every adapter layer and walks
    the model three times (also toggling ``requires_grad``, which no-grad makes moot), and through transformers'
    checkpointing enable/disable, which walks it twice and warns each time. That is 3.4 ms of a 56 ms DPO step on the
    ``tiny`` benchmark model and 4.6 ms of 178 ms on ``small`` (paired timing, same batches); the walks grow with
    the number of layers. Anything else (a named adapter such as a continued adapter's "ref", prompt learning,
    ``--modules_to_save``, adapters already off, grad enabled) goes through trl's own path. trl's per-step
    ``is_peft_model`` (accelerate's, which reads the installed packages' metadata twice a call: 0.8 ms) is answered
    once per model. Reference passes (trl's, with or without a reference copy, switch checkpointing off around them)
    score the log-probs only (:func:`~medllm.logprobs.log_probs_only`), not the policy's metrics.
    """
    import contextlib
    import weakref

    import trl.trainer.dpo_trainer as trl_dpo
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if getattr(trl_dpo.use_adapter, "medllm_cheap", False):
        return
    use_adapter, disable_checkpointing = trl_dpo.use_adapter, trl_dpo.disable_gradient_checkpointing
    is_peft_model = trl_dpo.is_peft_model
    peft_models: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> is_peft_model(model)
    adapter_layers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its LoRA layers, or None
    checkpointed: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its checkpointed modules

    def lora_layers(model):
        if model not in adapter_layers:
            modules = list(model.modules())
            config = model.peft_config.get(model.active_adapter)
            plain = (config is not None and not config.is_prompt_learning and not config.is_adaption_prompt
                     and not any(isinstance(m, AuxiliaryTrainingWrapper) for m in modules))
            adapter_layers[model] = [m for m in modules if isinstance(m, BaseTunerLayer)] if plain else None
        return adapter_layers[model]

    @contextlib.contextmanager
    def cheap_use_adapter(model, adapter_name):
        layers = None if adapter_name is not None or torch.is_grad_enabled() else lora_layers(model)
        if not layers or any(layer.disable_adapters for layer in layers):
            with use_adapter(model, adapter_name):
                yield
            return
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer in layers:
                layer._disable_adapters = False

    @contextlib.contextmanager
    def cheap_disable_checkpointing(model, gradient_checkpointing_kwargs=None):
        if model not in checkpointed:
            checkpointed[model] = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        switched = [m for m in checkpointed[model] if m.gradient_checkpointing is True]
        for module in switched:
            module.gradient_checkpointing = False
        try:
            with log_probs_only():  # trl enters this only for its reference passes, which read the log-probs alone
                yield
        finally:
            for module in switched:
                module.gradient_checkpointing = True

    def is_peft_model_once(model) -> bool:
        if model not in peft_models:
            peft_models[model] = is_peft_model(model)
        return peft_models[model]

    cheap_use_adapter.medllm_cheap = True
    trl_dpo.use_adapter, trl_dpo.disable_gradient_checkpointing = cheap_use_adapter, cheap_disable_checkpointing
    trl_dpo.is_peft_model = is_peft_model_once


def share_common_prefixes(causal_lm) -> None:
    """Run each pair's common prefix (its prompt) once, in the backbone of ``causal_lm`` (sdpa_varlen only).

    trl feeds the chosen rows of a batch, then the rejected rows, right-padded: ``[c_1 .. c_B; r_1 .. r_B]``.
    The patched backbone lays every pair out once, padding-free, as ``prefix, rest of c_i, rest of r_i``, where
    the rest of ``r_i`` sees the prefix and itself (not ``c_i``) and keeps its positions, and hands back hidden
    states in trl's padded layout. Tokens of a common prefix have the same hidden states in both rows (causal
    attention), so the loss is unchanged while DPO's prompt tokens, most of its input, are computed once.
    Batches of another shape go through the backbone unchanged.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPast

    from medllm.packing import VARLEN_ATTENTION

    backbone = causal_lm.base_model
    if getattr(backbone, "medllm_shares_prefixes", False):
        return
    original = backbone.forward

    @functools.wraps(original)
    def forward(input_ids=None, attention_mask=None, **kwargs):
        plain = (input_ids is None or attention_mask is None or input_ids.shape[0] % 2
                 or causal_lm.config._attn_implementation != VARLEN_ATTENTION
                 or any(kwargs.get(k) is not None for k in ("inputs_embeds", "position_ids", "past_key_values"))
                 or kwargs.get("use_cache") or kwargs.get("output_router_logits") or kwargs.get("output_hidden_states"))
        layout = None if plain else _pair_layout_and_plan(input_ids, attention_mask)
        if layout is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        flat_ids, positions, plan, gather = layout
        hidden = original(input_ids=flat_ids, position_ids=positions, attention_segments=plan,
                          **{**kwargs, "use_cache": False}).last_hidden_state[0]
        hidden = torch.cat([hidden, hidden.new_zeros(1, hidden.shape[-1])])  # the last row stands for padding
        return BaseModelOutputWithPast(last_hidden_state=hidden[gather].view(*input_ids.shape, -1))

    backbone.forward = forward
    backbone.medllm_shares_prefixes = True


def common_prefix_lengths(input_ids, attention_mask) -> list[int]:
    """Tokens that row i and row i + B (chosen and rejected of pair i) share from the start, for each pair."""
    pairs = input_ids.shape[0] // 2
    lengths = attention_mask.sum(dim=1)
    steps = torch.arange(input_ids.shape[1], device=input_ids.device)
    both = steps[None, :] < torch.minimum(lengths[:pairs], lengths[pairs:])[:, None]
    return ((input_ids[:pairs] == input_ids[pairs:]) & both).long().cumprod(dim=1).sum(dim=1).tolist()


_last_layout: dict = {}  # the last batch's "inputs" (input_ids, attention_mask), their "versions" and "layout"


def _pair_layout_and_plan(input_ids, attention_mask):
    """:func:`_pair_layout` with the segments worked out as an :class:`AttentionPlan` (read by every layer), or
    None. trl's reference and policy passes get the same tensors: the second pass reuses the first one's."""
    from medllm.packing import AttentionPlan

    versions = (input_ids._version, attention_mask._version)  # bumped by any write in place
    last_ids, last_mask = _last_layout.get("inputs", (None, None))
    if last_ids is input_ids and last_mask is attention_mask and _last_layout["versions"] == versions:
        return _last_layout["layout"]
    layout = _pair_layout(input_ids, attention_mask)
    if layout is not None:
        flat_ids, positions, segments, gather = layout
        layout = flat_ids, positions, AttentionPlan(segments, input_ids.device), gather
    _last_layout.update(inputs=(input_ids, attention_mask), versions=versions, layout=layout)
    return layout


def _pair_layout(input_ids, attention_mask):
    """(ids [1, T], positions [1, T], attention segments, gather index [2B * L]) for a right-padded batch of
    pairs, or None when the rows are not right-padded."""
    rows, width = input_ids.shape
    lengths = attention_mask.sum(dim=1)
    if not torch.equal(attention_mask.bool(), torch.arange(width, device=input_ids.device)[None, :] < lengths[:, None]):
        return None
    pairs = rows // 2
    prefixes, lengths, ids = common_prefix_lengths(input_ids, attention_mask), lengths.tolist(), input_ids.tolist()
    flat_ids, positions, segments = [], [], []
    gather = [[] for _ in range(rows)]
    for pair, shared in enumerate(prefixes):
        first, second = pair, pairs + pair
        start, first_len, second_len = len(flat_ids), lengths[first], lengths[second]
        second_start, second_end = start + first_len, start + first_len + second_len - shared
        flat_ids += ids[first][:first_len] + ids[second][shared:second_len]
        positions += [*range(first_len), *range(shared, second_len)]
        # The first row attends causally to itself; the second row's own part to the shared prefix and itself.
        segments += [(start, second_start, ((start, second_start),)),
                     (second_start, second_end, ((start, start + shared), (second_start, second_end)))]
        gather[first] = [*range(start, second_start)]
        gather[second] = [*range(start, start + shared), *range(second_start, second_end)]
    padding = len(flat_ids)  # padding reads the zero row after the last token
    gather = [index for row in gather for index in row + [padding] * (width - len(row))]
    device = input_ids.device
    as_tensor = functools.partial(torch.tensor, dtype=torch.long, device=device)
    return as_tensor([flat_ids]), as_tensor([positions]), segments, as_tensor(gather)


def build_dpo_trainer(model, ref_model, tokenizer, training_args, datasets, fresh_adapter: bool,
                      padding_free: Optional[bool] = None) -> DPOTrainerWithGuard:
    """Assemble the trainer. With a new LoRA adapter the reference is the base with the adapter disabled:
    trl copies the adapter as "ref" for any PeftModel it is given, which for a new (zero) adapter is the same
    function at extra cost, so that copy is removed. A continued adapter (``--peft_path``) keeps it as reference.

    ``padding_free`` (default: on where the model runs sdpa): batches are computed without padding and each
    pair's prompt once (:func:`share_common_prefixes`), for the policy and a reference copy alike."""
    from medllm.packing import VARLEN_ATTENTION, register_varlen_attention

    use_fast_cpu_head()
    switch_to_the_reference_cheaply()
    for causal_lm in (unwrap_peft(model), ref_model):
        attention = None if causal_lm is None else causal_lm.config._attn_implementation
        if attention is None or not (padding_free or (padding_free is None and attention == "sdpa")):
            continue
        if attention not in ("sdpa", VARLEN_ATTENTION):
            logger.warning("--padding_free needs --attn_implementation sdpa; with %s batches are padded.", attention)
            continue
        register_varlen_attention()
        causal_lm.set_attn_implementation(VARLEN_ATTENTION)
        share_common_prefixes(causal_lm)
    compile_decoder_layers([model, ref_model], training_args)
    trainer = DPOTrainerWithGuard(
        model=model,
        ref_model=ref_model,
        args=training_args,
        train_dataset=datasets["train"],
        eval_dataset=datasets.get("validation"),
        processing_class=tokenizer,
        callbacks=default_callbacks(),
    )
    peft_config = getattr(trainer.model, "peft_config", {})
    if fresh_adapter and "ref" in peft_config:
        trainer.model.delete_adapter("ref")
        trainer.model.set_adapter("default")
    return trainer


def log_peak_memory() -> dict[str, Any]:
    """Peak RSS (and CUDA memory where there is a GPU) of this process, as metrics."""
    metrics: dict[str, Any] = {name: round(value, 1) for name, value in peak_memory_mb().items()}
    logger.info("Peak memory (rank %s): %s", os.environ.get("RANK", "0"), metrics)
    return metrics
