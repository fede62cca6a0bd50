"""Fine-tuning data: JSON lines, in the three shapes people train on, and one small set that ships.

Each line of a `.jsonl` file is one example:
- `{"text": ...}`: a plain text, every token learned;
- `{"prompt": ..., "completion": ...}`: only the completion's tokens are learned;
- `{"messages": [{"role": ..., "content": ...}, ...]}`: a chat, rendered with the model's own chat
  template; only the last assistant message's tokens are learned.

`zen` names the set edgequant ships: the 19 aphorisms of the Zen of Python (in every Python, module
`this`), each as a chat where the user gives an aphorism's opening words and the assistant completes
it. A model that learned it completes "Explicit is" with "Explicit is better than implicit." where
the default model rambles, and its loss on the held-out aphorisms drops too, because it learned
the pattern ("X is better than Y.") and the register, not only the lines it saw.
"""

from __future__ import annotations

import ast
import codecs
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from edgequant.errors import EdgequantError

BUILTIN = "zen"
ZEN_REQUEST = "Complete this line of the Zen of Python: {opening}"


@dataclass(frozen=True)
class Example:
    ids: list[int]
    learned_from: int  # tokens before this index are context, not learned


def read_records(data: str | Path) -> list[dict]:
    """The examples of a .jsonl file, or of the built-in set `zen`."""
    if str(data) == BUILTIN:
        return zen_records()
    path = Path(data).expanduser()
    if not path.is_file():
        raise EdgequantError(f"no data file at {path}", f"pass a .jsonl file of examples, or `{BUILTIN}` for the built-in set")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise EdgequantError(f"{path}:{number} is not valid JSON", "write one JSON object per line") from None
        if not isinstance(record, dict) or not ({"text"} <= record.keys() or {"prompt", "completion"} <= record.keys()
                                                or "messages" in record):
            raise EdgequantError(f"{path}:{number} has none of the keys edgequant trains on",
                                 'each line needs "text", or "prompt" and "completion", or "messages"')
        records.append(record)
    if len(records) < 2:
        raise EdgequantError(f"{path} holds {len(records)} example(s)", "give at least 2: one is held out to measure the fine-tune")
    return records


def zen_records() -> list[dict]:
    """The Zen of Python as chats: the opening words asked, the whole aphorism answered."""
    records = []
    for line in zen_lines():
        words = line.split()
        opening = " ".join(words[:max(2, len(words) // 3)])
        records.append({"messages": [{"role": "user", "content": ZEN_REQUEST.format(opening=opening)},
                                     {"role": "assistant", "content": line}]})
    return records


def zen_lines() -> list[str]:
    """The aphorisms, read from the standard library's `this` module without importing it (importing prints them)."""
    origin = importlib.util.find_spec("this").origin
    tree = ast.parse(Path(origin).read_text())
    encoded = next(node.value.value for node in tree.body if isinstance(node, ast.Assign) and node.targets[0].id == "s")
    text = codecs.decode(encoded, "rot13")
    return [line.strip() for line in text.splitlines()[2:] if line.strip()]  # the title line and a blank come first


def split(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """Train and held-out examples: every 5th example held out (at least one), in file order."""
    held = [r for i, r in enumerate(records) if i % 5 == 4] or records[-1:]
    train = [r for i, r in enumerate(records) if i % 5 != 4] if len(records) >= 5 else records[:-1]
    return train, held


def tokenize(records: list[dict], tokenizer, max_tokens: int) -> list[Example]:
    return [_example(record, tokenizer, max_tokens) for record in records]


def _example(record: dict, tokenizer, max_tokens: int) -> Example:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "messages" in record:
        messages = record["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            raise EdgequantError("a chat example must end with an assistant message", "end each messages list with the answer to learn")
        if not tokenizer.chat_template:
            raise EdgequantError("the model has no chat template, so chat examples cannot be rendered",
                                 'write the examples as "prompt" and "completion" instead')
        context = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
        whole = tokenizer.apply_chat_template(messages, tokenize=True)
        learned_from = len(context) if whole[:len(context)] == context else 0  # the template may re-tokenize the seam
        ids = list(whole)
    elif "prompt" in record:
        context = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
        ids = context + tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + eos
        learned_from = len(context)
    else:
        ids, learned_from = tokenizer(record["text"], add_special_tokens=True)["input_ids"] + eos, 0
    if learned_from >= min(len(ids), max_tokens):
        raise EdgequantError(f"an example's context fills its {max_tokens} tokens, leaving nothing to learn",
                             "shorten the prompt or raise --max-tokens")
    return Example(list(ids[:max_tokens]), learned_from)
