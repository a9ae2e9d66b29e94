"""Chat templates: one definition per template serves SFT labels, DPO prompts, inference and evaluation.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}``. A template renders
it as ``prefix + [system] + (user + assistant_header + assistant + separator) * turns``; the ``assistant``
part (the reply and, where the template has one in the text, its closing markup) is what SFT trains on.
Templates whose end of turn is the next turn's header (glm4's ``<|user|>``) name it in ``eot``: it is
trained after each reply and appended after the last one, so the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

from medllm.errors import MedLLMError

Message = dict  # {"role": ..., "content": ...}

GLM4_JINJA = (
    "[gMASK]<sop>{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}"
    "{% elif message['role'] == 'observation' %}<|observation|>\n{{ message['content'] }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

QWEN_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatTemplate:
    """A named prompt format. ``{content}``, ``{bos}`` and ``{eos}`` are filled in when rendering."""

    name: str
    user: str
    assistant_header: str
    assistant: str = "{content}"
    system: str = "{content}"
    default_system: Optional[str] = None
    prefix: str = ""
    separator: str = ""
    eot: Optional[str] = None
    stop: tuple[str, ...] = ()
    jinja: Optional[str] = None  # the official jinja for this format, when there is one
    strip_content: bool = False  # llama3's official template trims message content
    bos: str = field(default="", compare=False)
    eos: str = field(default="", compare=False)

    def bind(self, tokenizer) -> "ChatTemplate":
        """A copy whose {bos}/{eos} are the tokenizer's own tokens."""
        return replace(self, bos=tokenizer.bos_token or "", eos=tokenizer.eos_token or "")

    def _fill(self, fmt: str, content: str = "") -> str:
        if self.strip_content:
            content = content.strip()
        return fmt.replace("{bos}", self.bos).replace("{eos}", self.eos).replace("{content}", content)

    @property
    def stop_strings(self) -> list[str]:
        """Strings that end a generated reply (never shown to the user)."""
        return [s.replace("{eos}", self.eos) for s in self.stop if s.replace("{eos}", self.eos)]

    def reply_text(self, content: str) -> str:
        """A reply as the model must produce it after the generation prompt, end-of-turn included."""
        return self._fill(self.assistant, content) + (self.eot or "")

    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, is_reply) pieces, in order."""
        pieces: list[tuple[str, bool]] = [(self._fill(self.prefix), False)]
        system = [m["content"] for m in messages if m["role"] == "system"]
        system_text = system[0] if system else self.default_system
        if system_text is not None:
            pieces.append((self._fill(self.system, system_text), False))
        for message in messages:
            if message["role"] == "user":
                pieces.append((self._fill(self.user, message["content"]) + self._fill(self.assistant_header), False))
            elif message["role"] == "assistant":
                pieces.append((self._fill(self.assistant, message["content"]), True))
                if self.separator:
                    pieces.append((self._fill(self.separator), False))
        if not add_generation_prompt and pieces and messages and messages[-1]["role"] == "user":
            # Without a generation prompt the header that follows the last user turn is left out.
            text, _ = pieces[-1]
            pieces[-1] = (text[: len(text) - len(self._fill(self.assistant_header))], False)
        return [(text, reply) for text, reply in pieces if text]

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as one string, as the model's official chat template writes it."""
        return "".join(text for text, _ in self.segments(messages, add_generation_prompt))

    def generation_prompt(self, messages: Sequence[Message]) -> str:
        """The prompt that asks the model for the next reply (messages end with a user turn)."""
        return self.render(messages, add_generation_prompt=True)

    def to_jinja(self) -> str:
        """A jinja chat template for ``tokenizer.chat_template``: the official one, else one built from this."""
        if self.jinja:
            return self.jinja

        def literal(fmt: str) -> str:
            # Bind {bos}/{eos} to the tokenizer's tokens, {content} to the message.
            parts = fmt.replace("{bos}", "\x00bos_token\x00").replace("{eos}", "\x00eos_token\x00")
            parts = parts.replace("{content}", "\x00message['content']\x00").split("\x00")
            out = []
            for i, part in enumerate(parts):
                if i % 2:
                    out.append("{{ " + part + " }}")
                elif part:
                    out.append("{{ " + repr(part) + " }}")
            return "".join(out)

        default_system = ""
        if self.default_system is not None:
            system = self.system.replace("{content}", self.default_system)
            default_system = "{% if messages[0]['role'] != 'system' %}" + literal(system) + "{% endif %}"
        return (
            literal(self.prefix) + default_system
            + "{% for message in messages %}"
            + "{% if message['role'] == 'system' %}" + literal(self.system)
            + "{% elif message['role'] == 'user' %}" + literal(self.user)
            + "{% if not loop.last or add_generation_prompt %}" + literal(self.assistant_header) + "{% endif %}"
            + "{% elif message['role'] == 'assistant' %}" + literal(self.assistant) + literal(self.separator)
            + "{% endif %}{% endfor %}"
        )

    def encode(self, tokenizer, messages: Sequence[Message], max_length: Optional[int] = None,
               train_on_inputs: bool = False) -> Optional[dict]:
        """Token ids and labels for SFT: labels are -100 except on replies and their end-of-turn token.

        The whole conversation is tokenized at once (so ids equal ``apply_chat_template``); a conversation
        longer than ``max_length`` keeps whole turns from the start. Returns None when not even the first
        reply fits.
        """
        pieces = self.segments(messages)
        text, reply_spans, position = "", [], 0
        for piece, is_reply in pieces:
            if is_reply:
                reply_spans.append((position, position + len(piece)))
            text += piece
            position += len(piece)
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids, offsets = list(encoding["input_ids"]), encoding["offset_mapping"]
        eot_id = tokenizer.convert_tokens_to_ids(self.eot) if self.eot else None
        labels = list(input_ids) if train_on_inputs else [-100] * len(input_ids)
        turn_ends = []  # token index just past each reply (and its end-of-turn token)
        token = 0
        for start, end in reply_spans:
            while token < len(input_ids) and offsets[token][0] < start:
                token += 1
            while token < len(input_ids) and offsets[token][0] < end:
                labels[token] = input_ids[token]
                token += 1
            if eot_id is not None:
                if token < len(input_ids) and input_ids[token] == eot_id:
                    labels[token] = eot_id
                else:  # after the last reply: append the end-of-turn token
                    input_ids.insert(token, eot_id)
                    labels.insert(token, eot_id)
                token += 1
            turn_ends.append(token)
        if max_length is not None and len(input_ids) > max_length:
            fitting = [end for end in turn_ends if end <= max_length]
            if not fitting:
                return None
            cut = fitting[-1]
            input_ids, labels = input_ids[:cut], labels[:cut]
        return {"input_ids": input_ids, "labels": labels}


class TokenizerChatTemplate:
    """The tokenizer's own ``chat_template`` behind the same interface as :class:`ChatTemplate`.

    Reply spans are found by rendering growing prefixes of the conversation.
    """

    name = "tokenizer"

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise MedLLMError(
                "the tokenizer has no chat_template: pass --template_name (one of: " + ", ".join(TEMPLATES) + ")."
            )
        self.tokenizer = tokenizer
        self.jinja = tokenizer.chat_template
        eos = tokenizer.eos_token
        self.eot = None
        self.stop_strings = [eos] if eos else []

    def bind(self, tokenizer) -> "TokenizerChatTemplate":
        return self

    def to_jinja(self) -> str:
        return self.jinja

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def generation_prompt(self, messages: Sequence[Message]) -> str:
        return self.render(messages, add_generation_prompt=True)

    def reply_text(self, content: str) -> str:
        probe = [{"role": "user", "content": "x"}]
        before = self.render(probe, add_generation_prompt=True)
        after = self.render(probe + [{"role": "assistant", "content": content}])
        reply = after[len(before):] if after.startswith(before) else content
        if self.tokenizer.eos_token and self.tokenizer.eos_token not in reply:
            reply += self.tokenizer.eos_token
        return reply

    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        pieces, done = [], ""
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                before = self.render(messages[:i], add_generation_prompt=True)
                after = self.render(messages[: i + 1])
                if not before.startswith(done) or not after.startswith(before):
                    raise MedLLMError("the tokenizer's chat_template is not incremental; pass --template_name.")
                pieces += [(before[len(done):], False), (after[len(before):], True)]
                done = after
        full = self.render(messages, add_generation_prompt)
        pieces.append((full[len(done):], False))
        return [(t, r) for t, r in pieces if t]

    encode = ChatTemplate.encode


TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in [
        ChatTemplate(
            name="glm4", prefix="[gMASK]<sop>", system="<|system|>\n{content}", user="<|user|>\n{content}",
            assistant_header="<|assistant|>", assistant="\n{content}", eot="<|user|>",
            stop=("<|user|>", "<|observation|>", "<|endoftext|>"), jinja=GLM4_JINJA,
        ),
        ChatTemplate(
            name="chatglm3", prefix="[gMASK]sop", system="<|system|>\n{content}", user="<|user|>\n{content}",
            assistant_header="<|assistant|>", assistant="\n{content}", eot="<|user|>",
            stop=("<|user|>", "<|observation|>", "{eos}"),
        ),
        ChatTemplate(
            name="qwen", system="<|im_start|>system\n{content}<|im_end|>\n",
            default_system="You are a helpful assistant.", user="<|im_start|>user\n{content}<|im_end|>\n",
            assistant_header="<|im_start|>assistant\n", assistant="{content}<|im_end|>", separator="\n",
            stop=("<|im_end|>", "<|endoftext|>"), jinja=QWEN_JINJA,
        ),
        ChatTemplate(
            name="llama3", prefix="{bos}", system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
            user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
            assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant="{content}<|eot_id|>",
            stop=("<|eot_id|>", "<|end_of_text|>"), jinja=LLAMA3_JINJA, strip_content=True,
        ),
        ChatTemplate(
            name="vicuna", system="{content} ",
            default_system="A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions.",
            user="USER: {content} ", assistant_header="ASSISTANT:", assistant=" {content}{eos}",
            stop=("{eos}", "USER:"),
        ),
        ChatTemplate(
            name="alpaca", system="{content}\n\n",
            default_system="Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.",
            user="### Instruction:\n{content}\n\n", assistant_header="### Response:\n", assistant="{content}{eos}",
            separator="\n\n", stop=("{eos}", "### Instruction"),
        ),
        ChatTemplate(name="base", user="{content}", assistant_header="", assistant="{content}{eos}", stop=("{eos}",)),
    ]
}

# The chat template each tiny architecture ships with.
ARCH_TEMPLATE = {"glm": "glm4", "qwen2": "qwen", "llama": "llama3"}


def get_template(name: Optional[str], tokenizer=None):
    """The template called ``name`` (bound to ``tokenizer``), or the tokenizer's own when name is None."""
    if name is None:
        if tokenizer is None:
            raise MedLLMError("no --template_name and no tokenizer to take a chat template from.")
        own = getattr(tokenizer, "chat_template", None)
        known = next((t for t in TEMPLATES.values() if own and own == t.to_jinja()), None)
        return known.bind(tokenizer) if known else TokenizerChatTemplate(tokenizer)
    if name not in TEMPLATES:
        raise MedLLMError(f"--template_name {name!r} does not exist; choose one of: {', '.join(TEMPLATES)}.")
    template = TEMPLATES[name]
    return template.bind(tokenizer) if tokenizer is not None else template
