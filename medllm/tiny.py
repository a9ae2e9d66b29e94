"""Build the embedded default model offline: a byte-level BPE tokenizer trained on ``data/`` and a
random-init causal LM (GLM-4 architecture by default), deterministic from ``--seed``.

    python -m medllm.tiny --output_dir models/tiny-glm4 [--arch glm|qwen2|llama] [--size tiny|small|base]

The folder loads with plain ``AutoTokenizer``/``AutoModelForCausalLM`` (transformers 4.x and 5.x) and
carries the architecture's chat template and a ``generation_config.json`` that stops at its end tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from medllm.templates import ARCH_TEMPLATE, TEMPLATES

logger = logging.getLogger(__name__)

REPO_DATA_DIR = Path(__file__).resolve().parent.parent / "data"

# Layer shapes. tiny: the quick start and tests (~2M parameters); small: CPU benchmarks (~10M);
# base: the layer shapes of a ~0.5B model (Qwen2-0.5B's) for GPU benchmarks; micro: unit tests only.
SIZES = {
    "micro": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=1024),
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=384, vocab_size=4096),
    "small": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=704, vocab_size=8192),
    "base": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=8192),
}

# Per architecture: special tokens (in id order), tokenizer roles, and the ids generation stops at.
ARCHS = {
    "glm": dict(
        specials=["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"],
        roles=dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>"),
        stop=["<|endoftext|>", "<|user|>", "<|observation|>"],
    ),
    "qwen2": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        roles=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        stop=["<|im_end|>", "<|endoftext|>"],
    ),
    "llama": dict(
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        roles=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>"),
        stop=["<|eot_id|>", "<|end_of_text|>"],
    ),
}

FALLBACK_TEXT = "小孩发烧怎么办？发热时多喝水，体温超过38.5℃可以服用退烧药。高血压患者应低盐饮食并规律服药。"


def corpus_texts(data_dir: Path) -> Iterator[str]:
    """Every string in the training files under ``data_dir`` (sorted, so the tokenizer is deterministic)."""

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)

    yield FALLBACK_TEXT
    held_out = {"cmb", "inference"}  # evaluation questions stay out of everything trained, the tokenizer too
    paths = (p for p in data_dir.rglob("*") if p.suffix in (".txt", ".json", ".jsonl")
             and not held_out & set(p.relative_to(data_dir).parts))
    for path in sorted(paths):
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".txt":
            yield from (line for line in text.splitlines() if line.strip())
        elif path.suffix == ".json":
            yield from strings(json.loads(text))
        else:
            for line in text.splitlines():
                if line.strip():
                    yield from strings(json.loads(line))


def read_terms(path: str | Path) -> list[str]:
    """Domain terms, one a line (blank lines and ``#`` comments skipped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")]


def build_tokenizer(arch: str, vocab_size: int, data_dir: Path, terms: list[str] | None = None):
    """Train a byte-level BPE on the corpus and wrap it as a transformers fast tokenizer.

    ``terms`` (a domain vocabulary, e.g. disease and drug names) are cut out of the text before BPE, so each
    one is tokenized the same way wherever it stands, not merged with its neighbours into context-dependent
    pieces ("痔疮的首选检查是" / "肛门" "镜检查"); whitespace is cut off as well, so a term after a space (an
    option "A. 肛门镜检查") gets the same tokens as in running text.
    """
    import re

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = ARCHS[arch]
    bpe = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if terms:
        alternatives = "|".join(re.escape(t) for t in sorted(set(terms), key=lambda t: (-len(t), t)))
        bpe.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(alternatives), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"),
            byte_level,
        ])
    else:
        bpe.pre_tokenizer = byte_level
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=spec["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(corpus_texts(data_dir), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, model_max_length=4096, clean_up_tokenization_spaces=False,
        additional_special_tokens=[t for t in spec["specials"] if t not in spec["roles"].values()],
        **spec["roles"],
    )
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    tokenizer.chat_template = TEMPLATES[ARCH_TEMPLATE[arch]].to_jinja()
    return tokenizer


def build_config(arch: str, size: str, tokenizer):
    """The model config for ``arch`` at ``size``, with the tokenizer's vocabulary and special ids."""
    from transformers import GlmConfig, LlamaConfig, Qwen2Config

    shape = dict(SIZES[size])
    shape["vocab_size"] = len(tokenizer)
    shape["head_dim"] = shape["hidden_size"] // shape["num_attention_heads"]
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in ARCHS[arch]["stop"]]
    common = dict(max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids,
                  bos_token_id=tokenizer.bos_token_id, **shape)
    if arch == "glm":
        return GlmConfig(attention_bias=True, tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **common)
    return LlamaConfig(tie_word_embeddings=False, **common)


def build(output_dir: str, arch: str = "glm", size: str = "tiny", seed: int = 42,
          data_dir: Path = REPO_DATA_DIR, vocab_size: int | None = None, terms: list[str] | None = None) -> str:
    """Build tokenizer + random model into ``output_dir`` (written to a temporary folder, then renamed)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from medllm.modeling import make_portable

    tokenizer = build_tokenizer(arch, vocab_size or SIZES[size]["vocab_size"], Path(data_dir), terms)
    config = build_config(arch, size, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
        do_sample=False, max_new_tokens=256,
    )
    output = Path(output_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    staging.chmod(0o755)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        make_portable(staging)
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("Built %s-%s (%.2fM parameters, vocab %d) in %s", arch, size, n_params / 1e6, len(tokenizer), output)
    return str(output)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--output_dir", default="models/tiny-glm4", help="Where to write the model folder.")
    parser.add_argument("--arch", default="glm", choices=sorted(ARCHS), help="Architecture (glm = GLM-4).")
    parser.add_argument("--size", default="tiny", choices=list(SIZES), help="Layer shapes (see SIZES).")
    parser.add_argument("--seed", type=int, default=42, help="Seed for the random weights.")
    parser.add_argument("--vocab_size", type=int, default=None, help="Tokenizer vocabulary (default: by size).")
    parser.add_argument("--data_dir", default=str(REPO_DATA_DIR), help="Text the tokenizer is trained on.")
    parser.add_argument("--terms_file", default=None,
                        help="Domain terms, one a line, that the tokenizer keeps whole (see build_tokenizer).")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    terms = read_terms(args.terms_file) if args.terms_file else None
    build(args.output_dir, args.arch, args.size, args.seed, Path(args.data_dir), args.vocab_size, terms)


if __name__ == "__main__":
    main()
