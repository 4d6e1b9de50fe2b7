"""Estimates for a Reserve, before the real count is known (Commit reconciles to it).

DESIGN §1's figures: a word is about 1.33 message tokens, an upload costs about 1.5
knowledge tokens a word (10,000 words ≈ 15,000), and a conversation turn about 2,000
tokens in all. Words are counted as runs of non-space characters, except where that
would count a whole sentence as one word: each character of a script written without
spaces between words (Chinese, Japanese, Korean syllables, Thai, Lao, Khmer, Myanmar,
CJK punctuation and full-width forms) and each emoji or pictograph is a word of its own,
and a run of more than 20 characters (a URL, code, an id, base64: no word is that long)
is one word per 4 characters.
"""

from __future__ import annotations

import math
import re

#: a typical conversation turn (prompt + response), when nothing better is known
CONVERSATION_TOKENS = 2_000
TOKENS_PER_WORD = 1.33
UPLOAD_TOKENS_PER_WORD = 1.5
#: a run of non-space characters longer than this is not a word: it counts
#: one word per LONG_RUN_CHARS_PER_WORD characters
LONG_RUN = 20
LONG_RUN_CHARS_PER_WORD = 4

# characters that are a word each (see the module's docstring)
_EACH = ("\u0e00-\u0eff"            # Thai, Lao
         "\u1000-\u109f"            # Myanmar
         "\u1780-\u17ff"            # Khmer
         "\u2600-\u27bf"            # miscellaneous symbols, dingbats
         "\u3001-\u30ff"            # CJK punctuation (not U+3000, a space), kana
         "\u31f0-\u31ff"            # Katakana extensions
         "\u3400-\u4dbf"            # CJK extension A
         "\u4e00-\u9fff"            # CJK unified ideographs
         "\uac00-\ud7af"            # Hangul syllables
         "\uf900-\ufaff"            # CJK compatibility ideographs
         "\uff00-\uffef"            # full-width and half-width forms
         "\U0001f000-\U0001faff"    # emoji, pictographs
         "\U00020000-\U0003ffff")   # CJK extensions B and later
_PIECES = re.compile(f"[{_EACH}]|[^\\s{_EACH}]+")


def words(text: str) -> int:
    n = 0
    for m in _PIECES.finditer(text):
        size = m.end() - m.start()
        n += -(-size // LONG_RUN_CHARS_PER_WORD) if size > LONG_RUN else 1
    return n


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
