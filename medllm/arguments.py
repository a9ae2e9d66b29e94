"""Every command-line flag of the toolkit, defined once, and the one parser all scripts use.

Stage scripts compose these dataclasses with ``transformers.TrainingArguments`` (or trl's
``DPOConfig``) through :func:`parse_args`. Flags of the MedicalGPT family are accepted as they
are written there; renamed ones are mapped by :data:`ALIASES`; unknown or misspelt flags are errors
that name the flag (prefix abbreviations are refused too).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from medllm import cli_cache
from medllm.errors import MedLLMError

logger = logging.getLogger(__name__)

# Old or family-specific spellings -> the flag that does the same here.
ALIASES = {
    "--evaluation_strategy": "--eval_strategy",
    "--neft_alpha": "--neftune_noise_alpha",
    "--max_seq_length": "--model_max_length",
    "--lora_r": "--lora_rank",
    # transformers 5 folded warmup_ratio into warmup_steps: a float below 1 is a share of the total steps.
    "--warmup_ratio": "--warmup_steps",
}

MODEL_TYPE_FAMILIES = {
    # --model_type value -> the config.json model_type values it usually means.
    "chatglm": {"chatglm", "glm", "glm4"},
    "glm4": {"chatglm", "glm", "glm4"},
    "llama": {"llama", "mistral"},
    "qwen": {"qwen", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe"},
    "qwen2": {"qwen2", "qwen3"},
    "bloom": {"bloom"},
    "baichuan": {"baichuan"},
    "mistral": {"mistral"},
    "auto": None,  # anything
}


@dataclass
class ModelArguments:
    """Which model to load and how."""

    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Local folder of the base model (config.json + weights). Required."}
    )
    model_type: str = field(
        default="auto",
        metadata={
            "help": "Kept for MedicalGPT-family commands (chatglm, glm4, llama, bloom, qwen, baichuan, auto). "
            "The architecture always comes from config.json; a mismatch only logs a warning."
        },
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer folder; default: --model_name_or_path."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run Python code shipped in the model folder. Off unless asked."}
    )
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype: auto (as saved), float32, float16, bfloat16. Half precision falls back to "
            "float32 on a machine without CUDA.",
            "choices": ["auto", "float32", "float16", "bfloat16"],
        },
    )
    device_map: Optional[str] = field(
        default=None,
        metadata={"help": "Accepted for inference-style placement; ignored with a warning when training with DDP."},
    )
    cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Folder for cached tokenized datasets (default: <output_dir>/../cache)."}
    )
    attn_implementation: Optional[str] = field(
        default=None,
        metadata={"help": "sdpa (default), eager, or flash_attention_2 (default on CUDA when it is installed)."},
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "Load weights in 4 bit (bitsandbytes, CUDA only)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load weights in 8 bit (bitsandbytes, CUDA only)."})
    rope_scaling: Optional[str] = field(
        default=None,
        metadata={
            "help": "Stretch RoPE to --model_max_length: linear or dynamic (factor = max length / trained length).",
            "choices": ["linear", "dynamic"],
        },
    )


@dataclass
class DataArguments:
    """Where the data is and how it becomes model inputs."""

    train_file_dir: Optional[str] = field(
        default=None, metadata={"help": "Folder of training files (.txt, .json, .jsonl), read recursively."}
    )
    validation_file_dir: Optional[str] = field(
        default=None, metadata={"help": "Folder of validation files; without it a seeded split of the training data."}
    )
    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "A local folder saved by datasets' save_to_disk (no hub downloads)."}
    )
    validation_split_percentage: float = field(
        default=1, metadata={"help": "Percent of training records held out for eval when no validation dir is given."}
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Keep at most this many train records."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Keep at most this many eval records."})
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "Processes for tokenization (capped at the CPU count)."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-tokenize even when a cached copy exists."})
    skip_invalid_records: bool = field(
        default=False,
        metadata={"help": "Skip bad records (counted and logged per file) instead of stopping at the first one."},
    )
    template_name: Optional[str] = field(
        default=None,
        metadata={"help": "Chat template: glm4, chatglm3, qwen, llama3, vicuna, alpaca, base; unset: the tokenizer's own."},
    )
    block_size: Optional[int] = field(
        default=1024, metadata={"help": "Pretraining: tokens per training row after packing."}
    )
    model_max_length: int = field(
        default=2048, metadata={"help": "SFT: longest row in tokens; longer dialogues keep whole turns from the start."}
    )
    packing: Optional[bool] = field(
        default=None,
        metadata={"help": "Pack several documents/dialogues per row (no padding, no attention across them). "
                  "Default: on for pretraining; off for SFT, where the batch size then counts dialogues as in "
                  "the MedicalGPT family (packed rows of --model_max_length hold many dialogues each)."},
    )
    padding_free: Optional[bool] = field(
        default=None,
        metadata={"help": "Train on batches without padding: a batch's rows become one sequence in which each "
                  "document attends to itself only (sdpa_varlen). Exact; default: on with sdpa attention."},
    )
    train_on_inputs: bool = field(
        default=False, metadata={"help": "SFT: put loss on prompts and markup too, not only assistant replies."}
    )
    max_source_length: Optional[int] = field(
        default=None, metadata={"help": "DPO: prompt length in tokens (truncated from the left)."}
    )
    max_target_length: Optional[int] = field(
        default=None, metadata={"help": "DPO: reply length in tokens (truncated from the right)."}
    )


@dataclass
class LoraArguments:
    """LoRA / QLoRA settings (peft)."""

    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (True) or all parameters (False)."})
    target_modules: str = field(
        default="all",
        metadata={"help": "Comma-separated module names, or 'all' for every linear layer but the output head."},
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha (update scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    modules_to_save: Optional[str] = field(
        default=None, metadata={"help": "Comma-separated modules trained in full and saved, e.g. embed_tokens,lm_head."}
    )
    peft_path: Optional[str] = field(default=None, metadata={"help": "Continue training this saved adapter."})
    qlora: bool = field(default=False, metadata={"help": "QLoRA: 4-bit base + LoRA (CUDA only)."})


@dataclass
class RunArguments:
    """Flags about the run itself that TrainingArguments lacks in transformers 5."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output_dir that already holds a trained model."}
    )
    group_by_length: bool = field(
        default=False, metadata={"help": "Batch rows of similar length together (padded path)."}
    )


def flag_given(argv: list[str], flag: str) -> bool:
    """Whether ``--flag`` (or ``--flag=value``) is on the command line."""
    return any(arg.split("=", 1)[0] == flag for arg in argv)


def _apply_aliases(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if name in ALIASES:
            arg = ALIASES[name] + eq + value
        out.append(arg)
    return out


def _pop_flag(argv: list[str], flag: str) -> Optional[str]:
    """Remove ``--flag [value]`` from argv; return the value ('True' for a bare flag), or None if absent."""
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name != flag:
            continue
        del argv[i]
        if eq:
            return value
        if i < len(argv) and not argv[i].startswith("--"):
            return argv.pop(i)
        return "True"
    return None


def _is_true(value: Optional[str]) -> bool:
    return value is not None and value.lower() in ("true", "1", "yes", "y", "t")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _set_aside_half_precision(argv: list[str]) -> list[str]:
    """On a machine without CUDA, drop --fp16/--bf16 (and half --torch_dtype) with one warning each."""
    if not (flag_given(argv, "--fp16") or flag_given(argv, "--bf16")) or cuda_available():
        return argv  # (checked in this order so that --help does not import torch)
    argv = list(argv)
    for flag in ("--fp16", "--bf16"):
        if _is_true(_pop_flag(argv, flag)):
            logger.warning("%s set aside: no CUDA device here, training in float32.", flag)
    return argv


def parse_args(argv: Optional[list[str]], *dataclass_types: type) -> tuple[Any, ...]:
    """Parse argv into one instance of each dataclass, in order.

    Aliases are mapped, half precision is set aside without CUDA, and an unknown flag exits with
    code 2 naming it. Fields that two dataclasses share (e.g. ``trust_remote_code`` in DPOConfig)
    become one flag that fills both.
    """
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    argv = _set_aside_half_precision(_apply_aliases(argv))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "--use_cpu" not in argv and not cuda_available():
        # accelerate starts DDP (gloo) on CPUs only with use_cpu; without it each rank trains alone on all data.
        if any(hasattr(cls, "__dataclass_fields__") and "use_cpu" in cls.__dataclass_fields__ for cls in dataclass_types):
            argv += ["--use_cpu", "True"]
    _check_deepspeed(argv)
    user_set_report_to = flag_given(argv, "--report_to")
    parser = HfArgumentParser(dataclass_types, allow_abbrev=False, conflict_handler="resolve")
    _bare_flags_mean_true(parser)
    cli_cache.save(parser)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    values = vars(namespace)
    parsed = [cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.init and f.name in values})
              for cls in dataclass_types]
    for args in parsed:
        if hasattr(args, "report_to") and not user_set_report_to:
            args.report_to = ["tensorboard"]
    _post_process(parsed)
    return tuple(parsed)


def _bare_flags_mean_true(parser) -> None:
    """``--flag`` alone means ``--flag True`` for every boolean flag, those whose default is worked out later
    (``Optional[bool] = None``: ``--bf16`` in trl's configs, ``--padding_free``, DPO's ``--gradient_checkpointing``)
    included, which HfArgumentParser leaves needing a value."""
    from transformers.hf_argparser import string_to_bool

    for action in parser._actions:
        if action.type is string_to_bool and action.nargs is None and action.option_strings:
            action.nargs, action.const = "?", True


def _check_deepspeed(argv: list[str]) -> None:
    """--deepspeed FILE: the file must be JSON, and deepspeed installed (a clear message, not an ImportError)."""
    import importlib.util
    import json

    config = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--deepspeed"), None)
    config = config or next((a.split("=", 1)[1] for a in argv if a.startswith("--deepspeed=")), None)
    if config is None or config.lstrip().startswith("{"):
        return
    try:
        json.loads(open(config, encoding="utf-8").read())
    except (OSError, ValueError) as error:
        raise MedLLMError(f"--deepspeed {config}: cannot read it as JSON ({error}).") from None
    if importlib.util.find_spec("deepspeed") is None:
        raise MedLLMError(f"--deepspeed {config}: the deepspeed package is not installed (pip install deepspeed, "
                          "on a machine with CUDA).")


def _post_process(parsed: tuple[Any, ...]) -> None:
    by_type = {type(a).__name__: a for a in parsed}
    model_args = by_type.get("ModelArguments")
    run_args = by_type.get("RunArguments")
    training_args = next((a for a in parsed if hasattr(a, "train_sampling_strategy")), None)
    if run_args is not None and training_args is not None and run_args.group_by_length:
        training_args.train_sampling_strategy = "group_by_length"
    if model_args is not None:
        if model_args.torch_dtype in ("float16", "bfloat16") and not cuda_available():
            logger.warning("--torch_dtype %s set aside: no CUDA device here, using float32.", model_args.torch_dtype)
            model_args.torch_dtype = "float32"
        if (model_args.load_in_4bit or model_args.load_in_8bit) and not cuda_available():
            raise MedLLMError("--load_in_4bit/--load_in_8bit need a CUDA GPU (bitsandbytes); this machine has none.")
        if model_args.device_map and training_args is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            logger.warning("--device_map %s ignored: it breaks DDP under torchrun.", model_args.device_map)
            model_args.device_map = None


def check_model_type(model_type: str, config_model_type: str) -> None:
    """Warn when --model_type disagrees with config.json; never changes which class is used."""
    family = MODEL_TYPE_FAMILIES.get(model_type.lower()) if model_type else None
    if model_type and model_type.lower() not in MODEL_TYPE_FAMILIES:
        logger.warning("--model_type %s is not a known family; using config.json (%s).", model_type, config_model_type)
    elif family is not None and config_model_type not in family:
        logger.warning(
            "--model_type %s does not match config.json model_type '%s'; loading '%s' as config.json says.",
            model_type, config_model_type, config_model_type,
        )


@dataclass
class AdapterArguments:
    """The model folders of merge and inference, in the spellings of the MedicalGPT family's commands.

    ``--base_model``/``--tokenizer_path`` name what ModelArguments calls ``--model_name_or_path``/
    ``--tokenizer_name_or_path``; the scripts copy them across, so loading stays in one place.
    """

    base_model: Optional[str] = field(
        default=None, metadata={"help": "Local folder of the base (or already merged) model. Required."}
    )
    lora_model: Optional[str] = field(
        default=None, metadata={"help": "Folder of a LoRA adapter (adapter_config.json + adapter_model.*)."}
    )
    tokenizer_path: Optional[str] = field(
        default=None,
        metadata={"help": "Tokenizer folder; default: the adapter folder's tokenizer if it has one, else --base_model."},
    )


@dataclass
class MergeArguments(AdapterArguments):
    """merge_peft_adapter.py: fold a LoRA adapter into its base and save a plain model."""

    output_dir: Optional[str] = field(
        default=None, metadata={"help": "Folder for the merged model (written atomically). Required."}
    )
    resize_emb: bool = field(
        default=False,
        metadata={"help": "Resize the embeddings to the tokenizer's length even when that shrinks them "
                  "(default: grow only when the adapter or tokenizer needs more rows)."},
    )
    max_shard_size: str = field(default="2GB", metadata={"help": "Largest safetensors shard, e.g. 2GB or 500MB."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing non-empty --output_dir."})
    verify: bool = field(
        default=False,
        metadata={"help": "Compare the merged model's logits with base+adapter on a few prompts; fail above a "
                  "tolerance fitting the dtype."},
    )


@dataclass
class InferenceArguments(AdapterArguments):
    """inference.py: interactive chat or batch prediction."""

    system_prompt: Optional[str] = field(default=None, metadata={"help": "System message put before every chat."})
    interactive: bool = field(default=False, metadata={"help": "Chat in the terminal ('clear' resets, 'exit' quits)."})
    data_file: Optional[str] = field(
        default=None,
        metadata={"help": "Questions to answer: .txt (one a line) or .json/.jsonl records with question, "
                  "instruction, input, query, or conversations/messages ending on a user turn."},
    )
    output_file: str = field(
        default="predictions.json", metadata={"help": "Where batch replies go: a JSON list of {input, output}."}
    )
    only_cpu: bool = field(default=False, metadata={"help": "Run on the CPU even when a GPU is present."})
    gpus: Optional[str] = field(
        default=None,
        metadata={"help": "Comma-separated GPU ids, e.g. 0,1; several shard the model (device_map auto). "
                  "Default: every visible GPU."},
    )
    max_new_tokens: int = field(default=512, metadata={"help": "Longest reply in tokens."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature; 0 = greedy (deterministic)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling mass (with temperature > 0)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Penalty on repeated tokens; 1.0 = none."})
    batch_size: int = field(default=8, metadata={"help": "Prompts generated together in batch mode."})
    seed: int = field(default=42, metadata={"help": "Random seed for sampling, so a run can be repeated."})
    show_prompt: bool = field(
        default=False, metadata={"help": "Log each rendered prompt before its reply (to check the chat template)."}
    )
