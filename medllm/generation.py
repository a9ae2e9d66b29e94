"""Generating replies with a chat template: model loading for inference, batched generation, streaming, chat.

One path for inference.py, the pipeline and evaluation. Prompts are rendered by the chat template and
generated in left-padded batches (sorted by length, returned in input order); generation stops at the
template's stop strings (single-token ones as eos ids, the others by string match) and they never show in
a reply. With greedy decoding a prompt gets the same reply alone or inside a padded batch.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

from medllm.errors import DataError, MedLLMError

logger = logging.getLogger(__name__)

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}
QUESTION_KEYS = ("question", "instruction", "input", "query", "prompt")
EXAMPLE_QUESTIONS = ["小孩发烧怎么办？", "一岁宝宝发烧能吃啥药？", "高血压患者平时饮食要注意什么？", "失眠多梦怎么调理？"]
SHOW_PROMPT_ENV = "MEDLLM_SHOW_PROMPT"  # =1: log each rendered prompt, as --show_prompt does


# --------------------------------------------------------------------------- templates and stops


def resolve_template(tokenizer, name: Optional[str] = None):
    """The template ``name``; unset: the tokenizer's own chat template, or vicuna when it has none."""
    from medllm.templates import get_template

    if name is None and not getattr(tokenizer, "chat_template", None):
        logger.info("The tokenizer has no chat template; using the vicuna template (set --template_name).")
        name = "vicuna"
    return get_template(name, tokenizer)


def _single_token_id(tokenizer, text: str) -> Optional[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def stop_token_ids(tokenizer, template) -> list[int]:
    """Token ids that end a reply: the tokenizer's eos and every stop string that is one token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids += [_single_token_id(tokenizer, stop) for stop in template.stop_strings]
    return list(dict.fromkeys(i for i in ids if i is not None))


def multi_token_stops(tokenizer, template) -> list[str]:
    """Stop strings that take several tokens (matched as text during and after generation)."""
    return [stop for stop in template.stop_strings if _single_token_id(tokenizer, stop) is None]


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    return (text[: min(positions)], True) if positions else (text, False)


# --------------------------------------------------------------------------- loading


def gpu_ids(gpus: Optional[str]) -> Optional[list[int]]:
    """'0,1' -> [0, 1]; None stays None; MedLLMError for anything that is not a list of device ids."""
    if gpus is None or not str(gpus).strip():
        return None
    try:
        ids = [int(part) for part in str(gpus).split(",") if part.strip()]
    except ValueError:
        raise MedLLMError(f"--gpus {gpus!r}: expected comma-separated GPU ids such as 0,1.") from None
    import torch

    count = torch.cuda.device_count()
    bad = [i for i in ids if not 0 <= i < count]
    if bad:
        raise MedLLMError(f"--gpus {gpus}: no GPU {bad[0]} here ({count} visible).")
    return ids


def place_model(args, model_args) -> str:
    """Set ``model_args.device_map`` from --only_cpu/--gpus; returns 'cpu' or 'cuda'."""
    import importlib.util

    import torch

    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    if args.only_cpu or not torch.cuda.is_available():
        if quantized:
            raise MedLLMError("--load_in_4bit/--load_in_8bit need a CUDA GPU (bitsandbytes); drop --only_cpu.")
        if args.gpus and not args.only_cpu:
            logger.warning("--gpus %s ignored: no CUDA GPU here; running on the CPU.", args.gpus)
        model_args.device_map = None
        return "cpu"
    ids = gpu_ids(args.gpus) or list(range(torch.cuda.device_count()))
    if quantized and importlib.util.find_spec("bitsandbytes") is None:
        raise MedLLMError("--load_in_4bit/--load_in_8bit need the bitsandbytes package: pip install bitsandbytes.")
    if quantized and ids != [0]:
        logger.warning("A quantized model is loaded on GPU 0 only; --gpus %s set aside.", args.gpus)
    if len(ids) == 1:
        model_args.device_map = {"": ids[0]}
    elif len(ids) == torch.cuda.device_count():
        model_args.device_map = "auto"
    else:
        model_args.device_map = _balanced_device_map(model_args, ids)
    return "cuda"


def _balanced_device_map(model_args, ids: list[int]) -> dict:
    """device_map 'auto' restricted to the GPUs in ``ids`` (accelerate's balanced placement)."""
    import torch
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    from medllm.merge import base_dtype_name, meta_model
    from medllm.modeling import read_config

    config = read_config(model_args.model_name_or_path, model_args.trust_remote_code)
    meta = meta_model(config, model_args.trust_remote_code)
    dtype_name = base_dtype_name(config) if model_args.torch_dtype == "auto" else model_args.torch_dtype
    no_split = getattr(meta, "_no_split_modules", None) or []
    memory = get_balanced_memory(meta, max_memory={i: torch.cuda.mem_get_info(i)[0] for i in ids},
                                 no_split_module_classes=no_split, dtype=getattr(torch, dtype_name))
    return infer_auto_device_map(meta, max_memory=memory, no_split_module_classes=no_split,
                                 dtype=getattr(torch, dtype_name))


def load_for_inference(args, model_args):
    """Load tokenizer and model (plus ``args.lora_model`` unmerged, via peft) ready to generate.

    ``args`` is an InferenceArguments, ``model_args`` a ModelArguments. Returns (model, tokenizer); the
    tokenizer pads on the left.
    """
    from medllm.modeling import read_config
    from medllm.merge import (check_adapter_fits, check_recorded_base, meta_model, read_adapter,
                              reconcile_model_paths, resize_embeddings, target_vocab_size, tokenizer_source,
                              use_trained_chat_template)
    from medllm.modeling import check_model_folder, load_model, load_tokenizer

    reconcile_model_paths(args, model_args)
    if not args.base_model:
        raise MedLLMError("no model given: pass --base_model (a local model folder, e.g. models/tiny-glm4).")
    model_args.model_name_or_path = check_model_folder(args.base_model, "base model")
    model_args.tokenizer_name_or_path = tokenizer_source(args.tokenizer_path, args.lora_model, args.base_model)
    adapter, adapter_rows = None, None
    if args.lora_model:  # checked on a weightless copy of the base, before loading anything
        adapter = read_adapter(args.lora_model)
        config = read_config(args.base_model, model_args.trust_remote_code)
        meta = meta_model(config, model_args.trust_remote_code)
        adapter_rows = check_adapter_fits(adapter, meta, args.base_model)
        check_recorded_base(adapter, args.base_model)
    place_model(args, model_args)
    tokenizer = load_tokenizer(model_args)
    tokenizer.padding_side = "left"
    model = load_model(model_args, for_training=False)
    if adapter is not None:
        from peft import PeftModel

        use_trained_chat_template(tokenizer, adapter.path)
        base_rows = model.get_input_embeddings().weight.shape[0]
        rows = target_vocab_size(base_rows, adapter_rows, len(tokenizer), False, adapter.path)
        resize_embeddings(model, rows, trained=adapter_rows is not None)
        model = PeftModel.from_pretrained(model, adapter.path, is_trainable=False)
        logger.info("Applied the adapter %s (not merged).", adapter.path)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- generation


def _generation_config(model, tokenizer, template, max_new_tokens: int, temperature: float, top_p: float,
                       repetition_penalty: float):
    import copy

    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    sampling = temperature > 0
    config.update(max_new_tokens=max_new_tokens, max_length=None, do_sample=sampling,
                  temperature=temperature if sampling else None, top_p=top_p if sampling else None,
                  top_k=None, repetition_penalty=repetition_penalty, eos_token_id=stop_token_ids(tokenizer, template),
                  pad_token_id=tokenizer.pad_token_id, stop_strings=multi_token_stops(tokenizer, template) or None)
    return config


def _decode_reply(tokens: list[int], tokenizer, stop_ids: set[int], stops: Sequence[str]) -> str:
    cut = next((i for i, token in enumerate(tokens) if token in stop_ids), len(tokens))
    text = tokenizer.decode(tokens[:cut], skip_special_tokens=True)
    return cut_at_stop(text, stops)[0].strip()


def generate_replies(model, tokenizer, template, conversations: Sequence[Sequence[Message]], *,
                     max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
                     repetition_penalty: float = 1.0, batch_size: int = 8, streamer=None,
                     progress: bool = False) -> list[str]:
    """One reply per conversation (each ends with a user turn), in input order.

    Prompts are sorted by length and generated ``batch_size`` at a time, left-padded with an attention
    mask (transformers derives the position ids from it). ``streamer`` (batch_size 1 only) receives tokens
    as they come. ``temperature`` 0 means greedy.
    """
    import torch
    from tqdm.auto import tqdm

    prompts = [template.generation_prompt(messages) for messages in conversations]
    encoded = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    config = _generation_config(model, tokenizer, template, max_new_tokens, temperature, top_p, repetition_penalty)
    stop_ids, stops = set(config.eos_token_id), template.stop_strings
    device = model.get_input_embeddings().weight.device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # longest first: memory trouble shows early
    replies: list[Optional[str]] = [None] * len(encoded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with tqdm(total=len(encoded), desc="Generating", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start: start + batch_size]
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.tensor([[pad_id] * (width - len(encoded[i])) + encoded[i] for i in batch], device=device)
            attention_mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in batch],
                                          device=device)
            with torch.no_grad():
                output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                        streamer=streamer, tokenizer=tokenizer if config.stop_strings else None)
            for row, index in enumerate(batch):
                replies[index] = _decode_reply(output[row, width:].tolist(), tokenizer, stop_ids, stops)
            bar.update(len(batch))
    return replies  # type: ignore[return-value]


class ReplyStreamer:
    """A ``generate()`` streamer that writes the reply as it grows and never shows a stop string.

    Text that could be the start of a stop string (or half of a multi-byte character, or trailing space) is
    held back until the next token decides; the prompt (the first ``put``) is skipped; what is shown is
    exactly the reply :func:`generate_replies` returns.
    """

    def __init__(self, tokenizer, stop_ids: set[int], stops: Sequence[str], write: Callable[[str], None]):
        self.tokenizer, self.stop_ids, self.stops, self.write = tokenizer, stop_ids, list(stops), write
        self.tokens: list[int] = []
        self.shown = 0
        self.prompt_seen = self.stopped = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.flatten().tolist():
            if self.stopped or token in self.stop_ids:
                self.stopped = True
                break
            self.tokens.append(token)
        self._flush(final=self.stopped)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()
        text, found = cut_at_stop(text, self.stops)
        if found:
            self.stopped = final = True
        if not final:
            text = text.rstrip("\ufffd")
            held = max((n for stop in self.stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
            text = text[: len(text) - held]
        text = text.rstrip()  # trailing space shows once something follows it (the reply is stripped too)
        if len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)


# --------------------------------------------------------------------------- batch files


def _question(record: object, path: Path, line: int, system_prompt: Optional[str]) -> tuple[str, list[Message]]:
    """(question, conversation ending with it) from a .txt line or a JSON record."""
    from medllm.data import ROLE_NAMES, parse_messages

    if isinstance(record, str):
        question, messages = record.strip(), [{"role": "user", "content": record.strip()}]
    elif isinstance(record, dict):
        turns_key = next((k for k in ("conversations", "messages") if k in record), None)
        if turns_key is not None:
            turns = record[turns_key] if isinstance(record[turns_key], list) else []
            roles = [ROLE_NAMES.get(t.get("from", t.get("role"))) if isinstance(t, dict) else None for t in turns]
            if "user" not in roles:
                raise DataError(str(path), line, turns_key, "has no human/user turn to answer.")
            last = len(roles) - 1 - roles[::-1].index("user")
            messages = parse_messages(turns[: last + 1], path, line, turns_key, "user")
            question = messages[-1]["content"]
        else:
            key = next((k for k in QUESTION_KEYS if isinstance(record.get(k), str) and record[k].strip()), None)
            if key is None:
                raise DataError(str(path), line, None, f"no question: expected one of {', '.join(QUESTION_KEYS)} "
                                "or conversations/messages with a user turn.")
            question = record[key].strip()
            if key == "instruction" and isinstance(record.get("input"), str) and record["input"].strip():
                question = f"{question}\n{record['input'].strip()}"  # alpaca: the input completes the instruction
            messages = [{"role": "user", "content": question}]
    else:
        raise DataError(str(path), line, None, f"a record must be a JSON object or a line of text, not "
                        f"{type(record).__name__}.")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return question, messages


def read_questions(data_file: str, system_prompt: Optional[str] = None) -> tuple[list[str], list[list[Message]]]:
    """Questions and their conversations from .txt (one a line) or .json/.jsonl; DataError names file and line."""
    from medllm.data import iter_raw_records

    path = Path(data_file)
    if not path.is_file():
        raise MedLLMError(f"--data_file not found: {data_file}")
    if path.suffix not in (".txt", ".json", ".jsonl"):
        raise MedLLMError(f"--data_file {data_file}: expected a .txt, .json or .jsonl file.")
    questions, conversations = [], []
    for line, record in iter_raw_records(path):
        if isinstance(record, DataError):
            raise record
        question, messages = _question(record, path, line, system_prompt)
        questions.append(question)
        conversations.append(messages)
    logger.info("Read %d questions from %s", len(questions), data_file)
    return questions, conversations


def write_json_atomic(path: str, value) -> None:
    """Write ``value`` as JSON to a temporary file beside ``path``, then rename it into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(value, out, ensure_ascii=False, indent=2)
            out.write("\n")
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


# --------------------------------------------------------------------------- interactive chat


def _context_length(model) -> Optional[int]:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def chat(model, tokenizer, template, *, system_prompt: Optional[str] = None, show_prompt: bool = False,
         read: Callable[[str], str] = input, **generation) -> None:
    """Chat in the terminal: replies stream as they are generated, each turn keeps its own answer.

    'clear' empties the history; 'exit', Ctrl-D or Ctrl-C end the chat. ``generation`` goes to
    :func:`generate_replies` (max_new_tokens, temperature, ...).
    """
    show_prompt = show_prompt or os.environ.get(SHOW_PROMPT_ENV) == "1"
    stop_ids, stops = set(stop_token_ids(tokenizer, template)), template.stop_strings
    limit = _context_length(model)
    history: list[Message] = []
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    print("Chat with the model. 'clear' forgets the conversation; 'exit' or Ctrl-D ends it.", flush=True)
    while True:
        try:
            query = read("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print(flush=True)
            return
        if not query:
            continue
        if query == "exit":
            return
        if query == "clear":
            history = []
            print("History cleared.", flush=True)
            continue
        messages = _fit_history(system, history, query, template, tokenizer, limit, generation.get("max_new_tokens"))
        if show_prompt:
            logger.info("Prompt: %s", json.dumps(template.generation_prompt(messages), ensure_ascii=False))
        print("Assistant: ", end="", flush=True)
        streamer = ReplyStreamer(tokenizer, stop_ids, stops, lambda text: print(text, end="", flush=True))
        try:
            reply = generate_replies(model, tokenizer, template, [messages], streamer=streamer, batch_size=1,
                                     **generation)[0]
        except KeyboardInterrupt:
            print(flush=True)
            return
        print(flush=True)
        history = [m for m in messages if m["role"] != "system"] + [{"role": "assistant", "content": reply}]


def _fit_history(system: list[Message], history: list[Message], query: str, template, tokenizer,
                 limit: Optional[int], max_new_tokens: Optional[int]) -> list[Message]:
    """system + history + the new question, dropping the oldest turns when the prompt would not fit."""
    question = [{"role": "user", "content": query}]
    kept = list(history)
    while kept and limit:
        prompt = template.generation_prompt(system + kept + question)
        if len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + (max_new_tokens or 0) <= limit:
            break
        kept = kept[2:]  # one user + assistant pair
    if len(kept) < len(history):
        logger.warning("Dropped the %d oldest turn(s) so the prompt fits the %d-token context.",
                       (len(history) - len(kept)) // 2, limit)
    return system + kept + question
