"""Stage 2: supervised fine-tuning on dialogues, with a LoRA adapter (default) or all parameters.

    torchrun --nproc_per_node 2 supervised_finetuning.py --model_name_or_path models/tiny-glm4 \
        --train_file_dir data/finetune --validation_file_dir data/finetune --template_name glm4 \
        --do_train --do_eval --model_max_length 4096 --output_dir outputs-sft-v1

The loss covers every assistant reply and its end-of-turn token, nothing else (--train_on_inputs: all).
Dialogues longer than --model_max_length keep their first whole turns. --packing puts several dialogues
in one row (no attention across them); --group_by_length batches similar lengths on the padded path.
The saved tokenizer carries the trained chat template. run_sft.sh holds the full MedicalGPT-style command.
"""

from __future__ import annotations

from medllm.errors import run_cli


def main(argv: list[str]) -> dict:
    from transformers import set_seed

    from medllm.causal_lm import (build_trainer, parse_training_args, prepare_model, run_training,
                                  tokenize_conversations)
    from medllm.data import load_conversations
    from medllm.modeling import load_tokenizer
    from medllm.templates import get_template
    from medllm.training import prepare_output_dir

    model_args, data_args, lora_args, run_args, training_args = parse_training_args(argv)
    prepare_output_dir(training_args, run_args)
    set_seed(training_args.seed)

    # Load data
    tokenizer = load_tokenizer(model_args)
    template = get_template(data_args.template_name, tokenizer)
    dialogues = load_conversations(data_args, seed=training_args.seed, need_eval=training_args.do_eval)
    rows = tokenize_conversations(dialogues, tokenizer, template, data_args, model_args, training_args)

    # Load model
    model = prepare_model(model_args, lora_args, training_args, max_length=data_args.model_max_length)

    # Train, save, evaluate
    trainer = build_trainer(model, tokenizer, training_args, rows, data_args.padding_free)
    return run_training(trainer, tokenizer, training_args, chat_template=template.to_jinja())


if __name__ == "__main__":
    run_cli(main)
