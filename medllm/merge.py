"""Folding a LoRA adapter into its base model: checked before any weight is loaded, written atomically.

The steps of :func:`merge_adapter`: read the adapter (``adapter_model.safetensors`` or the older
``adapter_model.bin``, loaded with ``weights_only=True``); check it against the base (module names and
shapes on a weightless copy of the model, vocabulary, the base it records); check the free disk space;
load the base, resize its embeddings when training extended the vocabulary; merge with peft; save weights
(sharded safetensors), tokenizer, chat template and a generation config that stops at the template's end
tokens into ``.<name>.tmp-<pid>-*`` beside ``--output_dir``; optionally verify logits; rename into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from medllm.errors import MedLLMError

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
PEFT_PREFIX = "base_model.model."
WRAPPER_INFIXES = (".modules_to_save", ".original_module", ".base_layer", ".token_adapter")
# Largest |merged - (base + adapter)| logit difference accepted by --verify, per unit of the largest logit:
# a few roundings of the dtype's mantissa (float32 2^-23, float16 2^-10, bfloat16 2^-7).
VERIFY_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
VERIFY_PROMPTS = ["小孩发烧怎么办？", "高血压患者平时饮食要注意什么？", "What should I do about a persistent cough?"]
TEST_PAUSE_ENV = "MEDLLM_MERGE_TEST_PAUSE_S"  # tests only: sleep this long before the rename, to kill the process


@dataclass
class Adapter:
    """A saved LoRA adapter: its folder, adapter_config.json, and the shape of each saved weight."""

    path: str
    config: dict
    weights_file: str
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # key without "base_model.model."

    @property
    def recorded_base(self) -> Optional[str]:
        return self.config.get("base_model_name_or_path")


def read_adapter(path: Optional[str]) -> Adapter:
    """Read adapter_config.json and the weights' shapes (no tensors are kept); MedLLMError if unusable."""
    if not path:
        raise MedLLMError("no adapter given: pass --lora_model (a folder with adapter_config.json).")
    if not os.path.isdir(path):
        raise MedLLMError(f"adapter folder not found: {path}")
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_path):
        hint = " It looks like a full model: use it as --base_model." if os.path.isfile(
            os.path.join(path, "config.json")) else ""
        raise MedLLMError(f"{path}: no adapter_config.json, so this is not a peft adapter.{hint}")
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except json.JSONDecodeError as error:
        raise MedLLMError(f"{config_path}:{error.lineno}: invalid JSON ({error.msg}).") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise MedLLMError(f"{config_path}: peft_type {config.get('peft_type')!r}; only LoRA adapters can be merged.")
    weights = next((os.path.join(path, n) for n in ADAPTER_WEIGHTS if os.path.isfile(os.path.join(path, n))), None)
    if weights is None:
        raise MedLLMError(f"{path}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}).")
    adapter = Adapter(path=path, config=config, weights_file=weights)
    for key, shape in _weight_shapes(weights).items():
        adapter.shapes[key.removeprefix(PEFT_PREFIX)] = shape
    return adapter


def _weight_shapes(weights_file: str) -> dict[str, tuple[int, ...]]:
    if weights_file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(weights_file, framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    import torch

    try:
        state = torch.load(weights_file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # pickle with code in it, or a damaged file
        raise MedLLMError(f"{weights_file}: cannot be read safely ({str(error).splitlines()[0]}).") from error
    return {key: tuple(value.shape) for key, value in state.items()}


# --------------------------------------------------------------------------- checks


def _module_and_kind(key: str) -> tuple[str, str]:
    """'model.layers.0.q_proj.lora_A.weight' -> ('model.layers.0.q_proj', 'lora_A.weight');
    'model.embed_tokens.modules_to_save.weight' -> ('model.embed_tokens', 'weight')."""
    if ".lora_" in key:
        module, _, kind = key.partition(".lora_")
        return module, "lora_" + kind
    for infix in WRAPPER_INFIXES:
        key = key.replace(infix, "")
    module, _, kind = key.rpartition(".")
    return module, kind


def check_adapter_fits(adapter: Adapter, model, base_path: str) -> Optional[int]:
    """Check every adapter weight against the module it changes in ``model`` (real or on the meta device).

    Returns the number of vocabulary rows the adapter's embedding / output-head weights have (when it has
    any), so the caller can resize; raises MedLLMError naming the mismatches otherwise.
    """
    modules = dict(model.named_modules())
    input_embeddings, output_embeddings = model.get_input_embeddings(), model.get_output_embeddings()
    problems, vocab_rows = [], {}
    for key, shape in sorted(adapter.shapes.items()):
        name, kind = _module_and_kind(key)
        module = modules.get(name)
        if module is None:
            problems.append(f"{key}: the base has no module '{name}'")
            continue
        vocab_sized = module is input_embeddings or module is output_embeddings
        expected = _expected_shape(module, kind, shape)
        if vocab_sized and expected is not None:
            vocab_axis = 1 if kind == "lora_embedding_A" else 0
            if kind not in ("lora_A.weight", "lora_embedding_B"):  # these do not depend on the vocabulary
                vocab_rows[key] = shape[vocab_axis]
                expected = tuple(shape[vocab_axis] if i == vocab_axis else n for i, n in enumerate(expected))
        if expected is not None and tuple(shape) != tuple(expected):
            problems.append(f"{key} is {list(shape)} but the base's {name} needs {list(expected)}")
    if problems:
        recorded = f" The adapter records base '{adapter.recorded_base}'." if adapter.recorded_base else ""
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise MedLLMError(f"adapter {adapter.path} does not fit base model {base_path}: {len(problems)} weight(s) "
                          f"differ: {'; '.join(problems[:3])}{more}.{recorded} Pass the base it was trained on.")
    if len(set(vocab_rows.values())) > 1:
        raise MedLLMError(f"adapter {adapter.path}: its embedding weights disagree on the vocabulary size: "
                          f"{vocab_rows}")
    return next(iter(vocab_rows.values()), None)


def _expected_shape(module, kind: str, shape: tuple[int, ...]) -> Optional[tuple[int, ...]]:
    """The shape ``kind`` must have on ``module`` (the LoRA rank taken from ``shape``); None: not checked."""
    import torch

    rank = shape[0] if kind in ("lora_A.weight", "lora_embedding_A") else shape[-1]
    if isinstance(module, torch.nn.Linear):
        return {"lora_A.weight": (rank, module.in_features), "lora_B.weight": (module.out_features, rank),
                "lora_B.bias": (module.out_features,), "lora_magnitude_vector": (module.out_features,),
                "weight": tuple(module.weight.shape), "bias": tuple(module.bias.shape) if module.bias is not None
                else None}.get(kind)
    if isinstance(module, torch.nn.Embedding):
        return {"lora_embedding_A": (rank, module.num_embeddings), "lora_embedding_B": (module.embedding_dim, rank),
                "weight": tuple(module.weight.shape)}.get(kind)
    parameter = getattr(module, kind, None) if "." not in kind else None
    return tuple(parameter.shape) if isinstance(parameter, torch.Tensor) else None


def check_recorded_base(adapter: Adapter, base_path: str) -> None:
    """Refuse an adapter whose recorded base is another local folder with different weights."""
    recorded = adapter.recorded_base
    if not recorded:
        logger.warning("%s records no base model; only shapes can be checked.", adapter.path)
        return
    if not os.path.isdir(recorded):
        if Path(recorded).name != Path(base_path).name:
            logger.warning("Adapter %s was trained on '%s' (not found here); merging into %s. Shapes fit, but "
                           "make sure it is the same model.", adapter.path, recorded, base_path)
        return
    if os.path.realpath(recorded) == os.path.realpath(base_path):
        return
    ours, theirs = _weights_fingerprint(base_path), _weights_fingerprint(recorded)
    if ours and theirs and ours != theirs:
        raise MedLLMError(f"adapter {adapter.path} was trained on {recorded}, whose weights differ from --base_model "
                          f"{base_path}. Pass --base_model {recorded} (or, if you really mean to move the adapter, "
                          f"set base_model_name_or_path in {adapter.path}/adapter_config.json).")
    logger.info("Adapter recorded base %s; %s holds the same weights.", recorded, base_path)


def _weights_fingerprint(folder: str) -> Optional[str]:
    """A hash of every tensor's name, shape and first rows (safetensors only; None for .bin models)."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in sorted(handle.keys()):
                part = handle.get_slice(key)
                shape = part.get_shape()
                digest.update(f"{key}{shape}".encode())
                sample = part[:2] if shape else handle.get_tensor(key)
                digest.update(sample.float().numpy().tobytes())
    return digest.hexdigest()


def target_vocab_size(base_rows: int, adapter_rows: Optional[int], tokenizer_size: int, resize_emb: bool,
                      adapter_path: str) -> int:
    """Rows the merged embeddings need: the adapter's (when it saved embeddings), else enough for the tokenizer."""
    if adapter_rows is not None:
        if tokenizer_size > adapter_rows:
            raise MedLLMError(f"the tokenizer has {tokenizer_size} tokens but the embeddings saved in {adapter_path} "
                              f"have {adapter_rows} rows: pass the tokenizer the adapter was trained with "
                              "(--tokenizer_path).")
        return adapter_rows
    if resize_emb:
        return tokenizer_size
    if tokenizer_size > base_rows:
        logger.warning("The tokenizer has %d tokens but the base only %d embedding rows: adding %d rows that no "
                       "training has touched (the adapter saved no embeddings).", tokenizer_size, base_rows,
                       tokenizer_size - base_rows)
    return max(base_rows, tokenizer_size)


def resize_embeddings(model, rows: int, trained: bool) -> None:
    """Resize input/output embeddings to ``rows`` (ties are kept by transformers)."""
    current = model.get_input_embeddings().weight.shape[0]
    if rows == current:
        return
    # Rows that the adapter overwrites need no careful initialisation; untrained ones start at the mean.
    model.resize_token_embeddings(rows, mean_resizing=not trained and rows > current)
    logger.info("Resized the vocabulary from %d to %d rows%s.", current, rows,
                " (as the adapter was trained)" if trained else "")


def check_free_space(folder: Path, needed: int) -> None:
    """MedLLMError when the disk holding ``folder`` has less than ``needed`` bytes (plus 5%) free."""
    while not folder.exists():  # the nearest folder that exists is on the same disk
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed * 1.05:
        raise MedLLMError(f"not enough disk space in {folder}: the merged model needs about {needed / 2**30:.2f} GiB, "
                          f"{free / 2**30:.2f} GiB are free.")


# --------------------------------------------------------------------------- atomic output


def check_output_dir(output_dir: Optional[str], overwrite: bool, inputs: list[str]) -> Path:
    """Refuse a missing, occupied (without --overwrite) or input-clobbering --output_dir."""
    if not output_dir:
        raise MedLLMError("no --output_dir given: where should the merged model go?")
    output = Path(output_dir)
    if any(os.path.realpath(output) == os.path.realpath(p) for p in inputs if p):
        raise MedLLMError(f"--output_dir {output} is one of the input folders; choose a new folder.")
    if output.exists() and not output.is_dir():
        raise MedLLMError(f"--output_dir {output} exists and is a file.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise MedLLMError(f"--output_dir {output} exists and is not empty; pass --overwrite to replace it.")
    return output


def _remove_stale_staging(output: Path) -> None:
    """Delete ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>`` folders left by a process that no longer runs."""
    for path in output.parent.glob(f".{output.name}.*-*"):
        kind, _, rest = path.name[len(output.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        logger.info("Removed %s, left by an interrupted run.", path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_output_dir(output: Path) -> Iterator[Path]:
    """Yield a staging folder beside ``output``; on success it replaces ``output``, on any error it is removed.

    SIGTERM is turned into KeyboardInterrupt meanwhile so that ``kill`` cleans up as Ctrl-C does; a
    SIGKILL leaves the staging folder, which the next run removes.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-{os.getpid()}-", dir=output.parent))
    staging.chmod(0o755)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt) if _in_main_thread() else None
    try:
        yield staging
        if output.exists():
            old = output.parent / f".{output.name}.old-{os.getpid()}"
            os.replace(output, old)
            os.replace(staging, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, output)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(staging, ignore_errors=True)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# --------------------------------------------------------------------------- merge


def reconcile_model_paths(args, model_args) -> None:
    """Let --model_name_or_path / --tokenizer_name_or_path stand for --base_model / --tokenizer_path.

    ``args`` is a MergeArguments or InferenceArguments; MedLLMError when both spellings are given and differ.
    """
    for ours, theirs in (("base_model", "model_name_or_path"), ("tokenizer_path", "tokenizer_name_or_path")):
        mine, other = getattr(args, ours), getattr(model_args, theirs)
        if mine and other and os.path.realpath(mine) != os.path.realpath(other):
            raise MedLLMError(f"--{ours} {mine} and --{theirs} {other} disagree; pass one of them.")
        setattr(args, ours, mine or other)


def tokenizer_source(tokenizer_path: Optional[str], lora_model: Optional[str], base_model: str) -> str:
    """--tokenizer_path if given, else the adapter folder when it holds a tokenizer, else the base."""
    if tokenizer_path:
        return tokenizer_path
    if lora_model and any(os.path.isfile(os.path.join(lora_model, n)) for n in TOKENIZER_FILES):
        return lora_model
    return base_model


def base_dtype_name(config) -> str:
    """The dtype the model was saved in (config.json), as float32/float16/bfloat16."""
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    name = str(dtype).removeprefix("torch.")
    return name if name in VERIFY_TOLERANCE else "float32"


def meta_model(config, trust_remote_code: bool):
    """The model of ``config`` on the meta device: module names and shapes, no memory, no weights read."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def merge_adapter(args, model_args) -> str:
    """Merge ``args.lora_model`` into ``args.base_model`` and write ``args.output_dir``; returns the output path.

    ``args`` is a MergeArguments, ``model_args`` a ModelArguments (model_type, trust_remote_code, torch_dtype).
    """
    import torch

    from medllm.arguments import check_model_type
    from medllm.generation import resolve_template
    from medllm.modeling import check_model_folder, load_model, load_tokenizer, make_portable, read_config

    # Check everything before loading any weight
    reconcile_model_paths(args, model_args)
    if not args.base_model:
        raise MedLLMError("no base model given: pass --base_model (a local model folder).")
    base = check_model_folder(args.base_model, "base model")
    adapter = read_adapter(args.lora_model)
    output = check_output_dir(args.output_dir, args.overwrite, [base, adapter.path])
    config = read_config(base, model_args.trust_remote_code)
    check_model_type(model_args.model_type, config.model_type)
    meta = meta_model(config, model_args.trust_remote_code)
    adapter_rows = check_adapter_fits(adapter, meta, base)
    check_recorded_base(adapter, base)
    model_args.model_name_or_path, model_args.model_type = base, "auto"  # warned once above
    model_args.tokenizer_name_or_path = tokenizer_source(args.tokenizer_path, adapter.path, base)
    tokenizer = load_tokenizer(model_args)
    use_trained_chat_template(tokenizer, adapter.path)
    base_rows = meta.get_input_embeddings().weight.shape[0]
    rows = target_vocab_size(base_rows, adapter_rows, len(tokenizer), args.resize_emb, adapter.path)
    dtype_name = base_dtype_name(config) if model_args.torch_dtype == "auto" else model_args.torch_dtype
    dtype = getattr(torch, dtype_name)
    n_params = sum(p.numel() for p in meta.parameters())
    n_params += (rows - base_rows) * meta.get_input_embeddings().weight.shape[1] * (
        1 if config.tie_word_embeddings else 2)
    check_free_space(output.absolute().parent, n_params * dtype.itemsize)
    del meta
    logger.info("Merging %s into %s (%s, %.2fM parameters) with the tokenizer of %s", adapter.path, base,
                dtype_name, n_params / 1e6, model_args.tokenizer_name_or_path)

    # Load base + adapter
    from peft import PeftModel

    model_args.torch_dtype = dtype_name
    model = load_model(model_args, for_training=False)
    resize_embeddings(model, rows, trained=adapter_rows is not None)
    model = PeftModel.from_pretrained(model, adapter.path, is_trainable=False)
    model.eval()
    template = resolve_template(tokenizer, None)
    reference = _verify_logits(model, tokenizer, template) if args.verify else None

    # Merge and save
    model = model.merge_and_unload()
    _untie_if_diverged(model)
    model.generation_config = merged_generation_config(base, model, tokenizer, template)
    with atomic_output_dir(output) as staging:
        model.save_pretrained(staging, max_shard_size=args.max_shard_size)
        tokenizer.save_pretrained(staging)
        make_portable(staging)
        _test_pause()
        if reference is not None:
            del model
            verify_merged(staging, tokenizer, template, reference, dtype_name, model_args.trust_remote_code)
    logger.info("Saved the merged model to %s", output)
    return str(output)


def _untie_if_diverged(model) -> None:
    """A tied model whose adapter trained input and output embeddings apart must be saved untied."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    import torch

    inputs, outputs = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if inputs is not outputs and not torch.equal(inputs, outputs):
        model.config.tie_word_embeddings = False
        logger.info("Input and output embeddings were trained apart; saving them untied.")


def merged_generation_config(base: str, model, tokenizer, template):
    """The base's generation config, stopping at every single-token stop of the chat template too."""
    from transformers import GenerationConfig

    from medllm.generation import stop_token_ids

    try:
        config = GenerationConfig.from_pretrained(base)
    except OSError:
        config = GenerationConfig.from_model_config(model.config)
    eos = config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    config.eos_token_id = list(dict.fromkeys(eos + stop_token_ids(tokenizer, template)))
    if tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    return config


def use_trained_chat_template(tokenizer, adapter_path: str) -> None:
    """Give ``tokenizer`` the chat template saved with the adapter (the one training used), when there is one."""
    folder = Path(adapter_path)
    trained = None
    if (folder / "chat_template.jinja").is_file():
        trained = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif (folder / "tokenizer_config.json").is_file():
        trained = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    if isinstance(trained, str) and trained and trained != getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = trained
        logger.info("Using the chat template saved with the adapter in %s.", adapter_path)


def _test_pause() -> None:
    seconds = float(os.environ.get(TEST_PAUSE_ENV, "0") or 0)
    if seconds > 0:
        logger.warning("%s=%s: pausing before the rename (tests only).", TEST_PAUSE_ENV, seconds)
        time.sleep(seconds)


# --------------------------------------------------------------------------- verify


def _prompt_ids(tokenizer, template) -> list[list[int]]:
    return [tokenizer(template.generation_prompt([{"role": "user", "content": q}]), add_special_tokens=False)
            ["input_ids"] for q in VERIFY_PROMPTS]


def _verify_logits(peft_model, tokenizer, template) -> dict:
    """Logits of base + adapter (unmerged) and of the base alone, on each verify prompt, in float32."""
    import torch

    device = peft_model.get_input_embeddings().weight.device
    merged, base = [], []
    with torch.no_grad():
        for ids in _prompt_ids(tokenizer, template):
            batch = torch.tensor([ids], device=device)
            merged.append(peft_model(input_ids=batch).logits.float().cpu())
            with peft_model.disable_adapter():
                base.append(peft_model(input_ids=batch).logits.float().cpu())
    return {"adapter": merged, "base": base}


def verify_merged(folder: Path, tokenizer, template, reference: dict, dtype_name: str,
                  trust_remote_code: bool = False) -> float:
    """Reload the saved model and compare its logits with base + adapter; MedLLMError above the tolerance."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype_name),
                                                 trust_remote_code=trust_remote_code)
    model.eval()
    worst, effect, scale = 0.0, 0.0, 1.0
    with torch.no_grad():
        for ids, expected, base in zip(_prompt_ids(tokenizer, template), reference["adapter"], reference["base"]):
            logits = model(input_ids=torch.tensor([ids])).logits.float()
            worst = max(worst, (logits - expected).abs().max().item())
            effect = max(effect, (expected - base).abs().max().item())
            scale = max(scale, expected.abs().max().item())
    tolerance = VERIFY_TOLERANCE[dtype_name] * scale
    logger.info("Verify: largest |merged - (base + adapter)| logit difference %.3g (tolerance %.3g for %s); the "
                "adapter moves logits by up to %.3g.", worst, tolerance, dtype_name, effect)
    if not worst <= tolerance:
        raise MedLLMError(f"verify failed: the merged model's logits differ from base + adapter by {worst:.3g} "
                          f"(tolerance {tolerance:.3g} for {dtype_name}); nothing was written.")
    return worst


def parse_merge_args(argv: list[str]):
    """(MergeArguments, ModelArguments) from argv.

    ``--torch_dtype`` is taken as given: merging on a machine without CUDA keeps half precision (the
    common parser would set it aside to float32, which suits running a model, not storing one).
    """
    from dataclasses import fields

    from medllm.arguments import MergeArguments, ModelArguments, _pop_flag, parse_args

    argv = list(argv)
    dtype = _pop_flag(argv, "--torch_dtype")
    merge_args, model_args = parse_args(argv, MergeArguments, ModelArguments)
    if dtype is not None:
        choices = next(f.metadata["choices"] for f in fields(ModelArguments) if f.name == "torch_dtype")
        if dtype not in choices:
            raise MedLLMError(f"--torch_dtype {dtype}: choose one of {', '.join(choices)}.")
        model_args.torch_dtype = dtype
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise MedLLMError("--load_in_4bit/--load_in_8bit: a merge needs the full-precision base weights.")
    return merge_args, model_args
