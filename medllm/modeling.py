"""Loading models and tokenizers from local folders, the same way in every stage."""

from __future__ import annotations

import glob
import logging
import math
import os
import pickle
from typing import Any, Optional

from medllm.arguments import ModelArguments, check_model_type
from medllm.errors import MedLLMError

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


def check_model_folder(path: Optional[str], what: str = "model") -> str:
    """Return ``path`` if it is a local model folder with config.json and weights, else raise MedLLMError."""
    if not path:
        raise MedLLMError(f"no {what} given: pass --model_name_or_path (a local folder, e.g. models/tiny-glm4).")
    if not os.path.isdir(path):
        raise MedLLMError(f"{what} folder not found: {path} (build the default with `python -m medllm.tiny`).")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MedLLMError(f"{path}: no config.json, so this is not a model folder.")
    if not any(glob.glob(os.path.join(path, pattern)) for pattern in WEIGHT_PATTERNS):
        raise MedLLMError(f"{path}: no weights (*.safetensors or pytorch_model*.bin) in the model folder.")
    return path


def read_config(path: str, trust_remote_code: bool):
    """The model's config; MedLLMError (with the --trust_remote_code hint) when it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        hint = "" if trust_remote_code else (
            "; if this model ships its own code, review it and pass --trust_remote_code True")
        raise MedLLMError(f"{path}: cannot read config.json ({str(error).splitlines()[0]}){hint}") from error


def make_portable(folder) -> None:
    """Rewrite what transformers 5 saved so that transformers 4.x (e.g. in other tools) loads it the same.

    - tokenizer_config.json: 'TokenizersBackend' -> 'PreTrainedTokenizerFast'; model_input_names without
      token_type_ids; the special-token list under 'additional_special_tokens' (4.x takes the 5.x
      'extra_special_tokens' list for a dict and fails).
    - config.json: rope_parameters repeated as the top-level keys 4.x reads (rope_theta, rope_scaling);
      4.x otherwise silently uses its default theta. 5.x reads them back as the same rope_parameters.
    """
    import json
    from pathlib import Path

    def rewrite(path: Path, change) -> None:
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            change(data)
            path.write_text(json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def tokenizer_config(config: dict) -> None:
        if config.get("tokenizer_class") in (None, "TokenizersBackend"):
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config["model_input_names"] = ["input_ids", "attention_mask"]
        if isinstance(config.get("extra_special_tokens"), list):
            config["additional_special_tokens"] = config.pop("extra_special_tokens")

    def model_config(config: dict) -> None:
        rope = config.get("rope_parameters")
        if not isinstance(rope, dict):
            return
        config.update({key: value for key, value in rope.items() if key != "rope_type"})
        if rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        else:
            config.pop("rope_scaling", None)

    folder = Path(folder)
    rewrite(folder / "tokenizer_config.json", tokenizer_config)
    rewrite(folder / "config.json", model_config)
    umask = os.umask(0)  # transformers writes weights 0600 via a temporary file: give them plain permissions
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def resolve_dtype(name: str) -> Any:
    """'auto' stays 'auto' (as saved); otherwise the torch dtype of that name."""
    import torch

    if name in (None, "auto"):
        return "auto"
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def default_attn_implementation() -> str:
    """flash_attention_2 on CUDA when installed, else sdpa."""
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(model_args: ModelArguments):
    """Load the tokenizer; give it a pad token if it has none (unk if there is one, else eos).

    Padding is masked out of the loss by the attention mask and the label spans, never by comparing
    ids with the pad id, so a pad that equals EOS does not make EOS unlearnable.
    """
    from transformers import AutoTokenizer

    path = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    if not path or not os.path.isdir(path):
        raise MedLLMError(f"tokenizer folder not found: {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise MedLLMError(f"{path}: cannot load a tokenizer ({str(error).splitlines()[0]})") from error
    if tokenizer.pad_token is None:
        fallback = tokenizer.unk_token or tokenizer.eos_token
        if fallback is None:
            raise MedLLMError(f"{path}: the tokenizer has neither a pad, unk nor eos token to pad with.")
        tokenizer.pad_token = fallback
        logger.info("Tokenizer had no pad token; padding with %r (masked out of the loss).", fallback)
    return tokenizer


def load_model(model_args: ModelArguments, model_max_length: Optional[int] = None, for_training: bool = True):
    """Load a causal LM from ``model_args.model_name_or_path`` with the requested dtype and attention.

    The class always comes from config.json (``--model_type`` only warns on a mismatch). Weights are read
    from safetensors, or from ``.bin`` with ``weights_only=True`` (transformers' default).
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = check_model_folder(model_args.model_name_or_path)
    config = read_config(path, model_args.trust_remote_code)
    check_model_type(model_args.model_type, config.model_type)
    if model_args.rope_scaling and model_max_length:
        _apply_rope_scaling(config, model_args.rope_scaling, model_max_length)

    kwargs: dict[str, Any] = dict(
        config=config,
        dtype=resolve_dtype(model_args.torch_dtype),
        trust_remote_code=model_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation or default_attn_implementation(),
    )
    if model_args.load_in_4bit or model_args.load_in_8bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=model_args.load_in_4bit,
            load_in_8bit=model_args.load_in_8bit,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    elif model_args.device_map and not for_training:
        kwargs["device_map"] = model_args.device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, pickle.UnpicklingError) as error:
        raise MedLLMError(f"{path}: cannot load the model ({str(error).splitlines()[0]})") from error
    if for_training:
        model.config.use_cache = False
    return model


def _apply_rope_scaling(config, kind: str, model_max_length: int) -> None:
    trained_length = getattr(config, "max_position_embeddings", None)
    if not trained_length or model_max_length <= trained_length:
        logger.warning("--rope_scaling %s ignored: %s tokens fit the trained %s.", kind, model_max_length, trained_length)
        return
    factor = float(math.ceil(model_max_length / trained_length))
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope.update(rope_type=kind, factor=factor)
    config.rope_parameters = rope
    logger.info("RoPE scaling %s, factor %.1f (%d -> %d tokens).", kind, factor, trained_length, model_max_length)


def lora_target_modules(model, target_modules: str) -> list[str] | str:
    """'all' -> names of every linear layer but the output head; otherwise the comma-separated list."""
    import torch

    if target_modules.strip().lower() != "all":
        return [name.strip() for name in target_modules.split(",") if name.strip()]
    output_head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if module is output_head:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.split(".")[-1])
    return sorted(names)


def unwrap_peft(model):
    """The transformers model inside a peft model, or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def compile_decoder_layers(models, training_args) -> int:
    """``--torch_compile``: compile each decoder layer of ``models`` in place, with dynamic shapes; returns how many.

    The Trainer would compile the whole model, which is traced again at every batch here (rows change length, and
    the padding-free attention plan is worked out in Python between the layers): 10 s a ``tiny`` DPO step on a CPU.
    Compiled layers share their graphs (a few: training and reference passes, before and after the attention, which
    stays eager), made in a run's first steps. The Trainer's own compile is then switched off. Models without
    ``_no_split_modules`` are left to the Trainer.
    """
    if not training_args.torch_compile:
        return 0
    compiled = 0
    for core in (unwrap_peft(model) for model in models if model is not None):
        layer_classes = set(getattr(core, "_no_split_modules", None) or ())
        for module in core.modules():
            if type(module).__name__ in layer_classes:
                module.compile(backend=training_args.torch_compile_backend, mode=training_args.torch_compile_mode,
                               dynamic=True)
                compiled += 1
    if compiled:
        logger.info("--torch_compile: %d decoder layers compiled (%s backend), each in place with dynamic shapes; "
                    "the first steps compile them.", compiled, training_args.torch_compile_backend)
        training_args.torch_compile = False
        training_args.torch_compile_backend = training_args.torch_compile_mode = None
    return compiled


def build_peft_model(model, lora_args, training_args=None):
    """Wrap ``model`` with a new LoRA adapter (or continue ``--peft_path``); returns the peft model."""
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training

    from medllm.dropout import use_cpu_dropout

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        gradient_checkpointing = bool(training_args and training_args.gradient_checkpointing)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if lora_args.peft_path:
        if not os.path.isfile(os.path.join(lora_args.peft_path, "adapter_config.json")):
            raise MedLLMError(f"--peft_path {lora_args.peft_path}: no adapter_config.json there.")
        logger.info("Continuing the adapter in %s", lora_args.peft_path)
        model = PeftModel.from_pretrained(model, lora_args.peft_path, is_trainable=True)
    else:
        modules_to_save = ([m.strip() for m in lora_args.modules_to_save.split(",")] if lora_args.modules_to_save
                           else None)
        config = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=lora_args.lora_rank,
            lora_alpha=lora_args.lora_alpha,
            lora_dropout=lora_args.lora_dropout,
            target_modules=lora_target_modules(model, lora_args.target_modules),
            modules_to_save=modules_to_save,
        )
        model = get_peft_model(model, config)
        trainable, total = model.get_nb_trainable_parameters()
        logger.info("LoRA on %s: %d trainable of %d parameters (%.2f%%).", config.target_modules, trainable, total,
                    100 * trainable / total)
    use_cpu_dropout(model)  # the same dropout, drawn faster where the model trains on a CPU
    return model
