"""Merge a LoRA adapter into its base model and save a plain model folder.

    python merge_peft_adapter.py --base_model glm4-pt-merged --lora_model glm4-sft-v1 \
        --output_dir ./glm4-sft-merged [--verify] [--overwrite] [--torch_dtype bfloat16]

The adapter is checked against the base before any weight is loaded (module names and shapes,
vocabulary, the base it records); the output is written beside --output_dir and renamed into place only
when complete. The result loads with plain AutoModelForCausalLM/AutoTokenizer. See medllm/merge.py.
"""

from medllm.errors import run_cli


def main(argv: list[str]) -> None:
    from medllm.merge import merge_adapter, parse_merge_args

    # Parse: --model_type only warns when it disagrees with config.json
    merge_args, model_args = parse_merge_args(argv)
    # Check, load, merge, save (atomically), verify
    merge_adapter(merge_args, model_args)


if __name__ == "__main__":
    run_cli(main)
