"""Reading and validating the training data of every stage.

Files are found recursively under ``--train_file_dir`` / ``--validation_file_dir`` (``.txt``, ``.json``,
``.jsonl``) or come from a local ``datasets`` folder (``--dataset_name``). Each record is checked; a bad
one stops the run with ``file:line: field 'x': problem`` unless ``--skip_invalid_records``, in which case
it is skipped and counted per file and reason in the log. Nothing is dropped silently.

Internal forms, one per stage:
- pretraining: ``{"text": str}``
- SFT: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` ending on assistant
- DPO: ``{"prompt": [messages ending on user], "chosen": str, "rejected": str}``
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Optional

from medllm.arguments import DataArguments
from medllm.errors import DataError, MedLLMError

logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".txt", ".json", ".jsonl")
NOTE = "__note__"  # a parser may report a repair it made; read_records counts and logs them
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "bot": "assistant", "model": "assistant", "system": "system"}


# --------------------------------------------------------------------------- files

def find_data_files(directory: str) -> list[Path]:
    """All .txt/.json/.jsonl files under ``directory``, sorted; an error if there are none."""
    root = Path(directory)
    if not root.exists():
        raise MedLLMError(f"data folder not found: {directory}")
    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
    if not files:
        raise MedLLMError(f"{directory}: no .txt, .json or .jsonl files in this folder.")
    return files


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raise DataError(str(path), 1, None, "starts with a UTF-8 byte-order mark (BOM); save it as UTF-8 without "
                        "BOM, e.g. `sed -i '1s/^\\xEF\\xBB\\xBF//' FILE`.")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(str(path), line, None, f"not valid UTF-8 at byte {error.start} (GBK? convert it with "
                        f"`iconv -f GBK -t UTF-8`).") from None


def _line_of(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def _json_array_items(text: str, path: Path) -> Iterator[tuple[int, object]]:
    decoder, position = json.JSONDecoder(), text.index("[") + 1

    def skip_space(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    position = skip_space(position)
    while position < len(text) and text[position] != "]":
        try:
            item, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataError(str(path), _line_of(text, error.pos), None, f"invalid JSON ({error.msg}).") from None
        yield _line_of(text, position), item
        position = skip_space(end)
        if position < len(text) and text[position] == ",":
            position = skip_space(position + 1)


def iter_raw_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, record) for each record: a line of .txt, a JSON line, or an item of a JSON array.

    A JSON line that does not parse is yielded as a :class:`DataError` (so the caller can skip it and go
    on); a file that cannot be read at all raises one. Blank lines are passed over.
    """
    text = _read_text(path)
    if not text.strip():
        raise DataError(str(path), None, None, "the file is empty.")
    if path.suffix == ".txt":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                yield number, line
        return
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        yield from _json_array_items(text, path)
        return
    if path.suffix == ".json":
        try:  # one object in the whole file, else JSON lines (common in MedicalGPT's .json files)
            yield 1, json.loads(text)
            return
        except json.JSONDecodeError:
            pass
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            yield number, DataError(str(path), number, None, f"invalid JSON ({error.msg} at column {error.colno}).")


# --------------------------------------------------------------------------- record checks

def _text(record: dict, key: str, path: Path, line: int, required: bool = True,
          field_name: Optional[str] = None) -> Optional[str]:
    name = field_name or key
    if key not in record or record[key] is None:
        if required:
            raise DataError(str(path), line, name, "missing.")
        return None
    value = record[key]
    if not isinstance(value, str):
        raise DataError(str(path), line, name, f"must be a string, not {type(value).__name__}.")
    if not value.strip():
        raise DataError(str(path), line, name, "is empty.")
    return value


def _as_object(record: object, path: Path, line: int) -> dict:
    if not isinstance(record, dict):
        raise DataError(str(path), line, None, f"a record must be a JSON object, not {type(record).__name__}.")
    return record


def parse_text_record(record: object, path: Path, line: int) -> dict:
    """Pretraining: a .txt line, or an object with a non-empty 'text'."""
    if isinstance(record, str):
        return {"text": record}
    return {"text": _text(_as_object(record, path, line), "text", path, line)}


def parse_messages(turns: object, path: Path, line: int, field: str, final_role: str) -> list[dict]:
    """Check and normalise a ShareGPT (from/value) or OpenAI (role/content) turn list.

    Roles must be an optional leading system turn, then user/assistant alternating, ending on ``final_role``.
    """
    if not isinstance(turns, list) or not turns:
        raise DataError(str(path), line, field, "must be a non-empty list of turns.")
    messages = []
    for index, turn in enumerate(turns):
        where = f"{field}[{index}]"
        if not isinstance(turn, dict):
            raise DataError(str(path), line, where, "a turn must be an object.")
        role_key, text_key = ("from", "value") if "from" in turn else ("role", "content")
        role = turn.get(role_key)
        if role not in ROLE_NAMES:
            raise DataError(str(path), line, f"{where}.{role_key}", f"unknown role {role!r} (use human/gpt/system "
                            "or user/assistant/system).")
        if ROLE_NAMES[role] == "user" and messages and isinstance(turn.get(text_key), str):
            content = turn[text_key]  # a later user turn may be empty ("go on"), as in real chat logs
        else:
            content = _text(turn, text_key, path, line, field_name=f"{where}.{text_key}")
        messages.append({"role": ROLE_NAMES[role], "content": content})
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for index, message in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise DataError(str(path), line, field, f"turn {index + 1} is {message['role']}, expected {expected} "
                            "(turns must alternate user/assistant).")
    if not body or body[-1]["role"] != final_role:
        raise DataError(str(path), line, field, f"must end with a{'n' if final_role[0] == 'a' else ''} "
                        f"{final_role} turn.")
    return messages


def parse_conversation_record(record: object, path: Path, line: int) -> dict:
    """SFT: ShareGPT ``conversations``, OpenAI ``messages``, or alpaca ``instruction``/``input``/``output``."""
    record = _as_object(record, path, line)
    for field in ("conversations", "messages"):
        if field not in record:
            continue
        turns = record[field]
        if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and \
                ROLE_NAMES.get(turns[-1].get("from", turns[-1].get("role"))) == "user":
            # A last question nobody answered (common in real ShareGPT dumps): train on the answered turns.
            messages = parse_messages(turns, path, line, field, "user")
            if not any(m["role"] == "assistant" for m in messages):
                return {NOTE: "dropped a conversation with no reply to train on"}
            return {"messages": messages[:-1], NOTE: "dropped a last user turn that has no reply"}
        return {"messages": parse_messages(turns, path, line, field, "assistant")}
    if "instruction" in record:
        question = _text(record, "instruction", path, line)
        extra = _text(record, "input", path, line, required=False) if record.get("input") else None
        question = f"{question}\n{extra}" if extra else question
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": _text(record, "output", path, line)}]}
    raise DataError(str(path), line, "conversations", "missing (expected 'conversations', 'messages' or "
                    "'instruction'/'output').")


def parse_preference_record(record: object, path: Path, line: int) -> dict:
    """DPO: current layout (conversations + chosen/rejected) or legacy (system/history/question/response_*)."""
    record = _as_object(record, path, line)
    if "conversations" in record:
        prompt = parse_messages(record["conversations"], path, line, "conversations", "user")
        chosen, rejected = _text(record, "chosen", path, line), _text(record, "rejected", path, line)
    elif "question" in record:
        prompt = []
        system = _text(record, "system", path, line, required=False) if record.get("system") else None
        if system:
            prompt.append({"role": "system", "content": system})
        history = record.get("history") or []
        if not isinstance(history, list):
            raise DataError(str(path), line, "history", "must be a list of [question, answer] pairs.")
        for index, pair in enumerate(history):
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                    or not all(isinstance(x, str) and x.strip() for x in pair)):
                raise DataError(str(path), line, f"history[{index}]", "must be a [question, answer] pair of "
                                "non-empty strings.")
            prompt += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        prompt.append({"role": "user", "content": _text(record, "question", path, line)})
        chosen = _text(record, "response_chosen", path, line)
        rejected = _text(record, "response_rejected", path, line)
    else:
        raise DataError(str(path), line, "conversations", "missing (expected 'conversations' + 'chosen'/'rejected', "
                        "or legacy 'question' + 'response_chosen'/'response_rejected').")
    if chosen == rejected:
        raise DataError(str(path), line, "rejected", "is identical to chosen.")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# --------------------------------------------------------------------------- loading

def read_records(files: list[Path], parse: Callable[[object, Path, int], dict], skip_invalid: bool) -> list[dict]:
    """Parse every record of ``files``; a bad record raises, or with ``skip_invalid`` is counted and logged."""
    records: list[dict] = []
    for path in files:
        skipped: Counter[str] = Counter()
        repaired: Counter[str] = Counter()
        try:
            for line, raw in iter_raw_records(path):
                try:
                    if isinstance(raw, DataError):
                        raise raw
                    record = parse(raw, path, line)
                    if NOTE in record:
                        repaired[record.pop(NOTE)] += 1
                    if record:
                        records.append(record)
                except DataError as error:
                    if not skip_invalid:
                        raise
                    skipped[f"{error.field or 'record'}: {error.problem}"] += 1
        except DataError as error:  # the whole file is unreadable
            if not skip_invalid or error.path != str(path):
                raise
            skipped[f"whole file: {error.problem}"] += 1
        if repaired:
            logger.warning("%s: repaired or dropped %d record(s): %s", path, sum(repaired.values()),
                           "; ".join(f"{count} x {reason}" for reason, count in repaired.most_common()))
        if skipped:
            logger.warning("%s: skipped %d invalid record(s): %s", path, sum(skipped.values()),
                           "; ".join(f"{count} x {reason}" for reason, count in skipped.most_common()))
    return records


def _load_split(directory: str, parse, skip_invalid: bool):
    from datasets import Dataset

    files = find_data_files(directory)
    records = read_records(files, parse, skip_invalid)
    if not records:
        raise MedLLMError(f"{directory}: no valid records in {len(files)} file(s).")
    logger.info("Read %d records from %d file(s) under %s", len(records), len(files), directory)
    return Dataset.from_list(records)


def load_stage_dataset(data_args: DataArguments, parse, seed: int = 42, need_eval: bool = True):
    """Train and validation datasets (a DatasetDict) for one stage, parsed by ``parse``."""
    from datasets import DatasetDict, load_from_disk

    if data_args.dataset_name:
        if not os.path.isdir(data_args.dataset_name):
            raise MedLLMError(f"--dataset_name {data_args.dataset_name}: not a local folder saved by datasets "
                              "(hub downloads are off).")
        loaded = load_from_disk(data_args.dataset_name)
        splits = loaded if isinstance(loaded, DatasetDict) else DatasetDict(train=loaded)
        splits = DatasetDict({name: split.map(lambda r, i: parse(r, Path(data_args.dataset_name), i + 1),
                                              with_indices=True, remove_columns=split.column_names)
                              for name, split in splits.items()})
        if "validation" not in splits and "test" in splits:
            splits["validation"] = splits.pop("test")
    elif data_args.train_file_dir:
        splits = DatasetDict(train=_load_split(data_args.train_file_dir, parse, data_args.skip_invalid_records))
        if data_args.validation_file_dir:
            splits["validation"] = _load_split(data_args.validation_file_dir, parse, data_args.skip_invalid_records)
    else:
        raise MedLLMError("no data: pass --train_file_dir (a folder of .txt/.json/.jsonl) or --dataset_name.")

    if need_eval and "validation" not in splits:
        percent = data_args.validation_split_percentage
        n_eval = max(1, int(len(splits["train"]) * percent / 100))
        if len(splits["train"]) < 2:
            raise MedLLMError("need at least 2 training records to hold one out for evaluation.")
        split = splits["train"].train_test_split(test_size=n_eval, seed=seed)
        splits = DatasetDict(train=split["train"], validation=split["test"])
        logger.info("Held out %d of the training records for evaluation (%.1f%%, seed %d).", n_eval, percent, seed)
    if data_args.max_train_samples is not None:
        splits["train"] = splits["train"].select(range(min(data_args.max_train_samples, len(splits["train"]))))
    if "validation" in splits and data_args.max_eval_samples is not None:
        splits["validation"] = splits["validation"].select(
            range(min(data_args.max_eval_samples, len(splits["validation"]))))
    return splits


def load_pretrain_texts(data_args: DataArguments, seed: int = 42, need_eval: bool = True):
    """Pretraining texts: DatasetDict with a ``text`` column."""
    return load_stage_dataset(data_args, parse_text_record, seed, need_eval)


def load_conversations(data_args: DataArguments, seed: int = 42, need_eval: bool = True):
    """SFT dialogues: DatasetDict with a ``messages`` column."""
    return load_stage_dataset(data_args, parse_conversation_record, seed, need_eval)


def load_preference_pairs(data_args: DataArguments, seed: int = 42, need_eval: bool = True):
    """DPO pairs: DatasetDict with ``prompt`` (messages), ``chosen`` and ``rejected`` columns."""
    return load_stage_dataset(data_args, parse_preference_record, seed, need_eval)
