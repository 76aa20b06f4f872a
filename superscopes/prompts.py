"""Target templates and token-position lookup (BOS-aware: positions count special tokens)."""

from __future__ import annotations

from dataclasses import dataclass

ENTITY_DESCRIPTION = (
    "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South Korean "
    "multinational major appliance and consumer electronics corporation, x"
)
IDENTITY = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"


@dataclass(frozen=True)
class Template:
    text: str
    placeholder: str


TEMPLATES: dict[str, Template] = {
    "entity": Template(ENTITY_DESCRIPTION, "x"),
    "identity": Template(IDENTITY, "?"),
}


class TokenNotFoundError(ValueError):
    pass


def tokens(tokenizer, text: str) -> list[str]:
    """The prompt's tokens as text, special tokens included, as the model sees them."""
    ids = tokenizer(text)["input_ids"]
    return [tokenizer.decode([i]) for i in ids]


def find_token(tokenizer, text: str, substring: str, last_occurrence: bool = False) -> int:
    """Index of the last token overlapping the first (or last) occurrence of ``substring``.

    The last token is the one whose representation has read the whole substring
    ("Wales" in "Diana, Princess of Wales", "ppers" in "Red Hot Chili Peppers")."""
    start = text.rfind(substring) if last_occurrence else text.find(substring)
    if not substring or start < 0:
        raise TokenNotFoundError(
            f"token {substring!r} is not in the prompt {text!r}; its tokens are {tokens(tokenizer, text)}"
        )
    end = start + len(substring)
    encoding = tokenizer(text, return_offsets_mapping=True)
    overlapping = [
        i for i, (s, e) in enumerate(encoding["offset_mapping"]) if e > s and s < end and e > start
    ]
    return overlapping[-1]


def num_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])
