"""Stage 1: continue pretraining a causal LM on domain text, with a LoRA adapter (default) or all parameters.

    torchrun --nproc_per_node 2 pretraining.py --model_name_or_path models/tiny-glm4 \
        --train_file_dir data/pretrain --validation_file_dir data/pretrain --do_train --do_eval \
        --block_size 512 --output_dir outputs-pt-v1

Documents end with EOS and are packed into --block_size rows (--packing, default) in which no token
attends across documents; --packing False pads instead. Evaluation reports eval_loss and perplexity.
run_pt.sh holds the full MedicalGPT-style command.
"""

from __future__ import annotations

from medllm.errors import run_cli


def main(argv: list[str]) -> dict:
    from transformers import set_seed

    from medllm.causal_lm import build_trainer, parse_training_args, prepare_model, run_training, tokenize_pretrain
    from medllm.data import load_pretrain_texts
    from medllm.modeling import load_tokenizer
    from medllm.training import prepare_output_dir

    model_args, data_args, lora_args, run_args, training_args = parse_training_args(argv)
    prepare_output_dir(training_args, run_args)
    set_seed(training_args.seed)

    # Load data
    tokenizer = load_tokenizer(model_args)
    texts = load_pretrain_texts(data_args, seed=training_args.seed, need_eval=training_args.do_eval)
    rows = tokenize_pretrain(texts, tokenizer, data_args, model_args, training_args)

    # Load model
    model = prepare_model(model_args, lora_args, training_args, max_length=data_args.block_size)

    # Train, save, evaluate
    trainer = build_trainer(model, tokenizer, training_args, rows, data_args.padding_free)
    return run_training(trainer, tokenizer, training_args)


if __name__ == "__main__":
    run_cli(main)
