"""Chat with a model or answer a file of questions.

    python inference.py --base_model glm4-dpo-merged --interactive          # chat in the terminal
    python inference.py --base_model glm4-sft-merged --data_file questions.jsonl --output_file replies.json
    python inference.py --base_model glm4-pt-merged --lora_model glm4-sft-v1  # an adapter, unmerged

Without --interactive or --data_file a few example medical questions are answered in the log.
Generation logic lives in medllm/generation.py.
"""

from medllm.errors import run_cli


def main(argv: list[str]) -> None:
    import logging

    from medllm.arguments import DataArguments, InferenceArguments, ModelArguments, parse_args
    from medllm.errors import MedLLMError
    from medllm.generation import (EXAMPLE_QUESTIONS, chat, generate_replies, load_for_inference, read_questions,
                                   resolve_template, write_json_atomic)

    logger = logging.getLogger("medllm.inference")
    args, model_args, data_args = parse_args(argv, InferenceArguments, ModelArguments, DataArguments)
    if args.interactive and args.data_file:
        raise MedLLMError("choose --interactive or --data_file, not both.")

    # Load model (+ adapter) and chat template
    import torch

    torch.manual_seed(args.seed)  # sampling (temperature > 0) repeats from run to run
    model, tokenizer = load_for_inference(args, model_args)
    template = resolve_template(tokenizer, data_args.template_name)
    generation = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                      repetition_penalty=args.repetition_penalty)

    # Interactive chat
    if args.interactive:
        chat(model, tokenizer, template, system_prompt=args.system_prompt, show_prompt=args.show_prompt, **generation)
        return

    # Batch prediction (or the built-in examples)
    if args.data_file:
        questions, conversations = read_questions(args.data_file, args.system_prompt)
    else:
        questions = EXAMPLE_QUESTIONS
        system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        conversations = [system + [{"role": "user", "content": q}] for q in questions]
    replies = generate_replies(model, tokenizer, template, conversations, batch_size=args.batch_size,
                               progress=bool(args.data_file), **generation)
    if args.data_file:
        write_json_atomic(args.output_file, [{"input": q, "output": r} for q, r in zip(questions, replies)])
        logger.info("Wrote %d replies to %s", len(replies), args.output_file)
    else:
        for question, reply in zip(questions, replies):
            logger.info("Question: %s\nAnswer: %s", question, reply)


if __name__ == "__main__":
    run_cli(main)
