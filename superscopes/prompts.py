"""Target templates and token-position lookup (BOS-aware: positions count special tokens)."""

from __future__ import annotations

import re
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


def _word_around(text: str, start: int, end: int) -> str:
    """The whole word(s) that a span of ``text`` lies in."""
    while start > 0 and _is_word(text[start - 1]):
        start -= 1
    while end < len(text) and _is_word(text[end]):
        end += 1
    return text[start:end]


def _is_word(char: str) -> bool:
    return char.isalnum() or char == "_"


def _ends_word(text: str, end: int) -> bool:
    """No word goes on past ``end`` ("Wales|" yes, "Wales|a" no; "x|," yes)."""
    return end == len(text) or not (_is_word(text[end]) and _is_word(text[end - 1]))


def find_token(tokenizer, text: str, substring: str, last_occurrence: bool = False) -> int:
    """Index of the last token of the first (or last) whole-token occurrence of ``substring``.

    An occurrence counts when it starts where a token starts (its leading space aside) and
    ends where a word ends: "Wales" in "Diana, Princess of Wales", the piece "ppers" in "Red
    Hot Chili Peppers", the "x" of "x is a complex idea. Explain" but not the one in
    "Explain". A sub-piece of a longer word ("Wales" in "Walesa") is an error naming the
    word. The last token is the one whose representation has read the whole substring."""
    encoding = tokenizer(text, return_offsets_mapping=True)
    spans = [(i, s, e) for i, (s, e) in enumerate(encoding["offset_mapping"]) if e > s]
    # A token " Wales" spans the space: the word inside it starts after the whitespace.
    starts = {s + len(text[s:e]) - len(text[s:e].lstrip()) for _, s, e in spans} | {s for _, s, e in spans}
    found = [m.start() for m in re.finditer(re.escape(substring), text)] if substring else []
    whole = [s for s in found if s in starts and _ends_word(text, s + len(substring))]
    if not whole:
        near = sorted({_word_around(text, s, s + len(substring)) for s in found})
        where = f"is only part of {', '.join(map(repr, near))} in" if near else "is not in"
        advice = "give a whole word or token; " if near else ""
        raise TokenNotFoundError(
            f"token {substring!r} {where} the prompt {text!r}; {advice}its tokens are {tokens(tokenizer, text)}"
        )
    start = whole[-1] if last_occurrence else whole[0]
    end = start + len(substring)
    return [i for i, s, e in spans if s < end and e > start][-1]


def num_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])
