"""What continued pretraining and SFT share: cached tokenization into rows, the model to train, the
trainer (real tokens per second, perplexity) and the train -> save -> evaluate sequence."""

from __future__ import annotations

import inspect
import logging
import math
import time
from functools import partial
from typing import Any, Optional

from medllm.errors import MedLLMError
from medllm.packing import (IGNORE_INDEX, VARLEN_ATTENTION, CausalLMCollator, pack_documents, pack_examples,
                            register_varlen_attention, split_documents)
from medllm.training import (NonFiniteLossGuard, ParameterCountOnce, cached_map, default_cache_dir, default_callbacks,
                             tokenizer_fingerprint)

logger = logging.getLogger(__name__)

# Bump when the rows these functions produce change, so cached tokenizations are not reused.
ROWS_VERSION = 1
KEPT, TRUNCATED, DROPPED = 0, 1, 2  # what happened to a dialogue that was longer than --model_max_length


def parse_training_args(argv: list[str]) -> tuple:
    """(model, data, lora, run, training) arguments of a causal-LM training stage, from one parser."""
    from transformers import TrainingArguments

    from medllm.arguments import DataArguments, LoraArguments, ModelArguments, RunArguments, parse_args

    return parse_args(argv, ModelArguments, DataArguments, LoraArguments, RunArguments, TrainingArguments)


# --------------------------------------------------------------------------- tokenization

def _pretrain_rows(batch: dict, tokenizer, block_size: int, packing: bool) -> dict:
    eos = tokenizer.eos_token_id
    documents = tokenizer(batch["text"])["input_ids"]  # the tokenizer's own special tokens (e.g. [gMASK]<sop>)
    documents = [ids if ids and ids[-1] == eos else list(ids) + [eos] for ids in documents]
    return pack_documents(documents, block_size) if packing else split_documents(documents, block_size)


def _conversation_rows(batch: dict, tokenizer, template, max_length: int, train_on_inputs: bool) -> dict:
    rows: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "status": []}
    for messages in batch["messages"]:
        encoded, status = template.encode(tokenizer, messages, None, train_on_inputs), KEPT
        if len(encoded["input_ids"]) > max_length:  # rare: only long dialogues are encoded twice
            encoded = template.encode(tokenizer, messages, max_length, train_on_inputs)
            status = TRUNCATED if encoded else DROPPED
            encoded = encoded or {"input_ids": [], "labels": []}
        rows["input_ids"].append(encoded["input_ids"])
        rows["labels"].append(encoded["labels"])
        rows["length"].append(len(encoded["input_ids"]))
        rows["status"].append(status)
    return rows


def _log_rows(split: str, rows, sources: int, unit: str, capacity: Optional[int]) -> None:
    lengths = rows["length"]
    tokens = sum(lengths)
    if capacity:  # packed
        shape = f"{100 * tokens / max(1, len(lengths) * capacity):.1f}% of {capacity}-token rows filled"
    else:
        shape = f"one {unit[:-1]} per row, {tokens / max(1, len(lengths)):.0f} tokens on average, padded per batch"
    logger.info("%s: %d %s -> %d rows, %d tokens (%s).", split, sources, unit, len(lengths), tokens, shape)


def tokenize_pretrain(texts, tokenizer, data_args, model_args, training_args) -> dict:
    """Each split of ``texts`` (column ``text``) as training rows, cached in ``--cache_dir``.

    Every document ends with EOS. With ``--packing`` documents are concatenated into ``--block_size``
    rows (``position_ids`` restart per document); without, each document is a row of its own (split
    every ``--block_size`` tokens) and is padded in the batch.
    """
    if data_args.packing is None:
        data_args.packing = True
    block_size = data_args.block_size
    if not block_size or block_size < 2:
        raise MedLLMError(f"--block_size {block_size}: must be at least 2 tokens.")
    if tokenizer.eos_token_id is None:
        raise MedLLMError("the tokenizer has no eos_token to end each document with; set one in tokenizer_config.json.")
    function = partial(_pretrain_rows, tokenizer=tokenizer, block_size=block_size, packing=data_args.packing)
    key = ["pretrain", ROWS_VERSION, tokenizer_fingerprint(tokenizer), block_size, data_args.packing]
    result = {}
    for split, dataset in texts.items():
        result[split] = cached_map(dataset, function, default_cache_dir(model_args, training_args), key,
                                   training_args, desc=f"pretrain {split} rows",
                                   num_proc=data_args.preprocessing_num_workers, overwrite=data_args.overwrite_cache)
        _log_rows(split, result[split], len(dataset), "documents", block_size if data_args.packing else None)
    return result


def tokenize_conversations(dialogues, tokenizer, template, data_args, model_args, training_args) -> dict:
    """Each split of ``dialogues`` (column ``messages``) as SFT rows with labels, cached in ``--cache_dir``.

    Labels come from ``template.encode`` (replies and their end-of-turn token only, unless
    ``--train_on_inputs``); a dialogue longer than ``--model_max_length`` keeps its first whole turns,
    or is dropped (counted in the log) when not even its first reply fits. With ``--packing`` several
    dialogues share a row (best-fit, ``position_ids`` restart per dialogue).
    """
    if data_args.packing is None:
        data_args.packing = False
    max_length = data_args.model_max_length
    function = partial(_conversation_rows, tokenizer=tokenizer, template=template, max_length=max_length,
                       train_on_inputs=data_args.train_on_inputs)
    key = ["sft", ROWS_VERSION, tokenizer_fingerprint(tokenizer), template.name, template.to_jinja(),
           max_length, data_args.train_on_inputs]
    result = {}
    for split, dataset in dialogues.items():
        rows = cached_map(dataset, function, default_cache_dir(model_args, training_args), key, training_args,
                          desc=f"sft {split} rows", num_proc=data_args.preprocessing_num_workers,
                          overwrite=data_args.overwrite_cache)
        status = rows["status"]
        dropped, truncated = status.count(DROPPED), status.count(TRUNCATED)
        if truncated:
            logger.info("%s: %d dialogue(s) cut to their first whole turns to fit --model_max_length %d.", split,
                        truncated, max_length)
        if dropped:
            logger.warning("%s: dropped %d of %d dialogue(s) whose first reply does not fit --model_max_length %d.",
                           split, dropped, len(status), max_length)
        rows = rows.remove_columns("status")
        if dropped:
            rows = rows.select([i for i, s in enumerate(status) if s != DROPPED])
        if len(rows) == 0:
            raise MedLLMError(f"{split}: no dialogue fits --model_max_length {max_length}; raise it.")
        if data_args.packing:
            with training_args.main_process_first(desc=f"pack sft {split}"):
                rows = rows.map(pack_examples, batched=True, fn_kwargs={"max_length": max_length},
                                remove_columns=rows.column_names, desc=f"pack sft {split}")
        _log_rows(split, rows, len(status) - dropped, "dialogues", max_length if data_args.packing else None)
        result[split] = rows
    return result


# --------------------------------------------------------------------------- model

def prepare_model(model_args, lora_args, training_args, max_length: Optional[int] = None):
    """The model to train: loaded (4-bit for ``--qlora``), wrapped in LoRA unless ``--use_peft False``.

    With ``--fp16``, weights that will be trained are kept in float32 (the fp16 grad scaler cannot
    unscale float16 gradients); the frozen base stays in ``--torch_dtype``.
    """
    import torch

    from medllm.arguments import cuda_available
    from medllm.modeling import build_peft_model, load_model

    if lora_args.qlora:
        if not lora_args.use_peft:
            raise MedLLMError("--qlora trains a LoRA adapter on a 4-bit model: it needs --use_peft True.")
        if not cuda_available():
            raise MedLLMError("--qlora needs a CUDA GPU (bitsandbytes 4-bit); this machine has none.")
        model_args.load_in_4bit = model_args.load_in_4bit or not model_args.load_in_8bit
    if not lora_args.use_peft and (model_args.load_in_4bit or model_args.load_in_8bit):
        raise MedLLMError("a 4/8-bit model cannot be trained in full: use --use_peft True (QLoRA).")
    if not lora_args.use_peft and lora_args.peft_path:
        raise MedLLMError("--peft_path continues a LoRA adapter: it needs --use_peft True.")
    if model_args.device_map and not (model_args.load_in_4bit or model_args.load_in_8bit):
        logger.warning("--device_map %s set aside: for training the Trainer puts the model on this process's "
                       "device.", model_args.device_map)
    model = load_model(model_args, model_max_length=max_length)
    if lora_args.use_peft:
        model = build_peft_model(model, lora_args, training_args)
    else:
        logger.info("Training all %d parameters.", sum(p.numel() for p in model.parameters()))
    if training_args.fp16:
        for parameter in model.parameters():
            if parameter.requires_grad and parameter.dtype == torch.float16:
                parameter.data = parameter.data.float()
    return model


# --------------------------------------------------------------------------- trainer

def perplexity(loss: float) -> float:
    """exp(loss), or inf when that overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def _trainer_class():
    from transformers import Trainer

    class CausalLMTrainer(NonFiniteLossGuard, ParameterCountOnce, Trainer):
        """Trainer that logs real (non-padding) tokens per second and eval perplexity."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.real_tokens = 0  # this rank's training tokens that were not padding
            self.label_tokens = 0  # of them, those whose next token is a loss target
            self._real_mark: tuple[int, Optional[float]] = (0, None)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            real = inputs.pop("num_real_tokens", None)
            if real is not None and model.training:
                if self._real_mark[1] is None:
                    self._real_mark = (self.real_tokens, time.perf_counter())
                self.real_tokens += int(real)
                targets = inputs.get("shift_labels", inputs["labels"][:, 1:])
                self.label_tokens += int(targets.ne(IGNORE_INDEX).sum())
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def _real_tokens_all_ranks(self, count: Optional[int] = None) -> int:
            count = self.real_tokens if count is None else count
            if self.args.world_size <= 1:
                return count
            import torch

            return int(self.accelerator.gather(torch.tensor([count], device=self.args.device)).sum())

        def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
            # Both kinds of log below happen on every rank at the same step, so the gather is safe.
            if "train_runtime" in logs:
                total = self._real_tokens_all_ranks()
                logs["train_real_tokens"] = total
                logs["train_label_tokens"] = self._real_tokens_all_ranks(self.label_tokens)
                logs["train_real_tokens_per_second"] = round(total / max(logs["train_runtime"], 1e-9), 1)
            elif "loss" in logs:
                total, now = self._real_tokens_all_ranks(), time.perf_counter()
                last_total, last_time = self._real_mark
                if last_time is not None and now > last_time:
                    logs["real_tokens_per_second"] = round((total - last_total) / (now - last_time), 1)
                self._real_mark = (total, now)
            if "eval_loss" in logs:
                logs["eval_perplexity"] = perplexity(logs["eval_loss"])
            super().log(logs, start_time)

    return CausalLMTrainer


def build_trainer(model, tokenizer, training_args, rows: dict, padding_free: Optional[bool] = None):
    """A Trainer over ``rows`` (from :func:`tokenize_pretrain` / :func:`tokenize_conversations`) with the
    packing-aware collator for the model's attention implementation.

    ``padding_free`` (default: on where the model runs sdpa) switches the model to ``sdpa_varlen``: every
    batch becomes one row without padding, attended document by document. The output head runs only where
    there is a label, when the model's forward takes ``logits_to_keep``.
    """
    from medllm.logprobs import use_fast_cpu_loss
    from medllm.modeling import compile_decoder_layers, unwrap_peft

    training_args.remove_unused_columns = False  # the collator picks its inputs; 'length' feeds --group_by_length
    training_args.prediction_loss_only = True  # evaluation needs the loss, not every logit of the eval set
    if training_args.do_train and "train" not in rows:
        raise MedLLMError("--do_train needs training data (--train_file_dir).")
    hf_model = unwrap_peft(model)
    attention = hf_model.config._attn_implementation
    if padding_free is None:
        padding_free = attention in ("sdpa", VARLEN_ATTENTION)
    if padding_free and attention == "sdpa":
        register_varlen_attention()
        hf_model.set_attn_implementation(VARLEN_ATTENTION)
        attention = hf_model.config._attn_implementation
    elif padding_free and attention != VARLEN_ATTENTION:
        logger.warning("--padding_free needs --attn_implementation sdpa; with %s batches are padded.", attention)
    select_logits = "logits_to_keep" in inspect.signature(hf_model.forward).parameters
    use_fast_cpu_loss(hf_model)  # the same loss, without three logits-sized tensors a step on a CPU
    compile_decoder_layers([model], training_args)
    collator = CausalLMCollator(pad_token_id=tokenizer.pad_token_id, attn_implementation=attention,
                                mask_dtype=getattr(model, "dtype", None), select_logits=select_logits)
    logger.info("Batches: %s; output head on %s.",
                "padding-free, attention per document" if attention == VARLEN_ATTENTION else f"{attention} attention",
                "labelled positions only" if select_logits else "every position")
    return _trainer_class()(
        model=model, args=training_args, data_collator=collator, processing_class=tokenizer,
        callbacks=default_callbacks(),
        train_dataset=rows.get("train") if training_args.do_train else None,
        eval_dataset=rows.get("validation") if training_args.do_eval else None,
    )


def run_training(trainer, tokenizer, training_args, chat_template: Optional[str] = None) -> dict[str, Any]:
    """Train (resuming if asked), save the model atomically, then evaluate; returns the metrics."""
    from medllm.training import resolve_resume_checkpoint, save_final

    metrics: dict[str, Any] = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=resolve_resume_checkpoint(training_args))
        train_metrics = dict(result.metrics, train_rows=len(trainer.train_dataset))
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        save_final(trainer, tokenizer, training_args.output_dir, chat_template)
        metrics.update(train_metrics)
    if training_args.do_eval:
        if trainer.eval_dataset is None:
            raise MedLLMError("--do_eval needs evaluation data (--validation_file_dir, or a split of the training "
                              "data).")
        eval_metrics = trainer.evaluate()
        eval_metrics["perplexity"] = perplexity(eval_metrics["eval_loss"])
        eval_metrics["eval_rows"] = len(trainer.eval_dataset)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    return metrics
