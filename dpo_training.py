"""Stage 3: direct preference optimisation (DPO) on chosen/rejected pairs, with LoRA or all parameters.

    python dpo_training.py --model_name_or_path ./glm4-sft-merged --template_name glm4 \
        --train_file_dir ./data/reward --validation_file_dir ./data/reward --do_train --do_eval \
        --max_source_length 1024 --max_target_length 512 --output_dir glm4-dpo-v1 [--use_peft False] [...]

Pairs in either layout (``conversations``/``chosen``/``rejected``, or legacy ``system``/``history``/``question``/
``response_chosen``/``response_rejected``) are rendered through ``--template_name``; how they are tokenized and cut
is described in medllm/preference.py. Logs loss and rewards/{chosen,rejected,accuracies,margins} to the console and
TensorBoard; saves the adapter (or full weights) and the tokenizer into --output_dir.
"""

from medllm.errors import run_cli


def main(argv: list[str]) -> dict:
    """Train and/or evaluate; returns the train and eval metrics."""
    import logging

    from transformers import set_seed

    from medllm.arguments import DataArguments, LoraArguments, ModelArguments, RunArguments, parse_args
    from medllm.data import load_preference_pairs
    from medllm.modeling import build_peft_model, load_model, load_tokenizer
    from medllm.preference import (DPOArguments, apply_dpo_defaults, build_dpo_trainer, load_reference_model,
                                   log_peak_memory, tokenize_preference_pairs)
    from medllm.templates import get_template
    from medllm.training import default_cache_dir, prepare_output_dir, resolve_resume_checkpoint, save_final

    logger = logging.getLogger("dpo_training")
    model_args, data_args, lora_args, run_args, training_args = parse_args(
        argv, ModelArguments, DataArguments, LoraArguments, RunArguments, DPOArguments)
    apply_dpo_defaults(argv, training_args, data_args, lora_args, model_args)
    prepare_output_dir(training_args, run_args)
    resume_from = resolve_resume_checkpoint(training_args)
    set_seed(training_args.seed)  # before the LoRA weights are drawn

    # Load data
    tokenizer = load_tokenizer(model_args)
    template = get_template(data_args.template_name, tokenizer)
    pairs = load_preference_pairs(data_args, seed=training_args.seed, need_eval=training_args.do_eval)
    datasets = tokenize_preference_pairs(pairs, tokenizer, template, data_args, training_args,
                                         default_cache_dir(model_args, training_args))

    # Load model: with LoRA the reference is the same weights with the adapter off; full runs keep a frozen copy
    model = load_model(model_args, model_max_length=training_args.max_length)
    ref_model = load_reference_model(model_args, lora_args, training_args, training_args.max_length)
    if lora_args.use_peft:
        model = build_peft_model(model, lora_args, training_args)
    trainer = build_dpo_trainer(model, ref_model, tokenizer, training_args, datasets,
                                fresh_adapter=lora_args.use_peft and not lora_args.peft_path,
                                padding_free=data_args.padding_free)

    # Train
    metrics: dict = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=resume_from)
        train_metrics = {**result.metrics, **trainer.token_stats(result.metrics.get("train_runtime", 0.0)),
                         **log_peak_memory()}
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)

    # Evaluate
    if training_args.do_eval and "validation" in datasets:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)

    # Save: adapter (or full weights) + tokenizer carrying the chat template that was trained
    if training_args.do_train:
        save_final(trainer, tokenizer, training_args.output_dir, template.to_jinja())
    else:
        logger.info("No --do_train: nothing saved.")
    return metrics


if __name__ == "__main__":
    run_cli(main)
