"""Estimates for a Reserve, before the real count is known (Commit reconciles to it).

DESIGN §1's figures: a word is about 1.33 message tokens, an upload costs about 1.5
knowledge tokens a word (10,000 words ≈ 15,000), and a conversation turn about 2,000
tokens in all. Words are counted as runs of non-space characters.
"""

from __future__ import annotations

import math

#: a typical conversation turn (prompt + response), when nothing better is known
CONVERSATION_TOKENS = 2_000
TOKENS_PER_WORD = 1.33
UPLOAD_TOKENS_PER_WORD = 1.5


def words(text: str) -> int:
    return len(text.split())


def message_tokens(prompt: str, max_response_tokens: int = 0) -> int:
    """Message tokens to reserve for `prompt` and a response of at most
    `max_response_tokens` (at least 1)."""
    if max_response_tokens < 0:
        raise ValueError("max_response_tokens must not be negative")
    return max(1, math.ceil(words(prompt) * TOKENS_PER_WORD) + max_response_tokens)


def upload_tokens(text_or_words: str | int) -> int:
    """Knowledge tokens of an upload: its text, or its number of words (at least 1)."""
    n = words(text_or_words) if isinstance(text_or_words, str) else text_or_words
    if n < 0:
        raise ValueError("the number of words must not be negative")
    return max(1, math.ceil(n * UPLOAD_TOKENS_PER_WORD))
