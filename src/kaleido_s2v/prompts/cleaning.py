"""A chat model's answer -> one caption paragraph, kept within what the video model's text encoder reads.

Chat models wrap the caption they were asked for: reasoning blocks (`<think>…</think>`, also with the opening tag
left in the prompt by Qwen3 / DeepSeek-R1 templates), a preamble ("Here is the rewritten prompt:"), a label
("Caption:", "**Enhanced prompt:**"), markdown headings, list markers, bold, quotes. `clean_answer` removes them
and joins the lines into one paragraph, the caption style the model was trained on. `fit_length` then keeps the
caption within the text encoder's tokens (umT5: 512): the encoder would silently cut it mid-sentence, so it is
shortened at the last sentence end that fits (with a warning), or refused when not even one sentence fits.
"""

from __future__ import annotations

import logging
import math
import re
import unicodedata
from collections.abc import Callable

from ..errors import UserInputError

logger = logging.getLogger(__name__)

_THINK_BLOCK = re.compile(r"<(think|thinking|reasoning)>.*?</\1>", re.S | re.I)
_THINK_CLOSE = re.compile(r"</(?:think|thinking|reasoning)>", re.I)
_THINK_UNCLOSED = re.compile(r"^\s*<(?:think|thinking|reasoning)>.*\Z", re.S | re.I)
_LABEL = re.compile(
    r"^(?:(?:the\s+)?(?:(?:enhanced|rewritten|improved|refined|final|expanded|optimi[sz]ed|detailed|new|video)\s+)*"
    r"(?:caption|prompt|description|answer|output)\s*[:：]\s*)", re.I)
_PREAMBLE = re.compile(r"^(?:here(?:'s| is| are)|sure|certainly|okay|ok)\b", re.I)
_NOTE = re.compile(r"^\(?(?:word count|words|note)\b", re.I)
_LIST_MARKER = re.compile(r"^(?:[-*+•]|\d{1,2}[.)])\s+")
_SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?。！？])|(?<=[.!?][\"'”’)]))\s+")
_QUOTES = {'"': '"', "'": "'", "`": "`", "“": "”", "‘": "’", "«": "»", "„": "“", "「": "」"}

WORDS_TO_TOKENS = 1.5  # without the video model's tokenizer: umT5 cuts English into ~1.3 tokens a word; err long


def clean_answer(raw: str) -> str:
    """The caption in a chat model's raw answer, as one paragraph ("" when there is none)."""
    text = "".join(c for c in raw.replace("\r\n", "\n") if c in "\n\t" or unicodedata.category(c) != "Cc")
    text = _THINK_BLOCK.sub("", text)
    text = _THINK_CLOSE.split(text)[-1]  # an opening tag that was part of the prompt: reasoning up to the last close
    text = _THINK_UNCLOSED.sub("", text)  # the model never finished reasoning: no caption
    text = re.sub(r"```[\w-]*", "", text)
    lines = []
    for line in text.split("\n"):
        line = line.strip().lstrip(">").strip()
        if not line or re.fullmatch(r"[-*_=]{3,}", line):
            continue
        heading = re.match(r"#{1,6}\s+", line)
        line = _LIST_MARKER.sub("", line[heading.end():] if heading else line)
        lines.append((line, bool(heading)))
    if len(lines) > 1:  # headings, a preamble line ending in ':' and notes after the caption go; the caption stays
        body = [ln for ln, heading in lines if not heading] or [ln for ln, _ in lines]
        if len(body) > 1 and body[0].rstrip("*_ ").endswith((":", "：")) and (
                _PREAMBLE.match(body[0]) or len(body[0].split()) <= 6):
            body = body[1:]
        body = [ln for ln in body if not _NOTE.match(ln)] or body
    else:
        body = [ln for ln, _ in lines]
    text = " ".join(body)
    text = re.sub(r"(\*\*|__)(.+?)\1", r"\2", text).replace("**", "")
    text = re.sub(r"\s+", " ", text).strip()
    while True:  # labels and quotes nest: **Caption:** "A fox ..."
        stripped = _strip_quotes(_LABEL.sub("", text).strip())
        if stripped == text:
            return text
        text = stripped


def _strip_quotes(text: str) -> str:
    if len(text) < 2 or text[0] not in _QUOTES or text[-1] != _QUOTES[text[0]]:
        return text
    inner = text[1:-1]
    if text[0] == '"' and '"' in inner:  # "Run," she said, "now" is not one quotation
        return text
    return inner.strip()


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_BREAK.split(text) if s]


def drop_unfinished(text: str) -> str:
    """An answer cut at the model's token limit, without its unfinished last sentence (if another one precedes it)."""
    parts = sentences(text)
    if len(parts) > 1 and not re.search(r"[.!?。！？][\"'”’)]?$", parts[-1]):
        return " ".join(parts[:-1])
    return text


def estimate_tokens(text: str) -> int:
    """A text encoder's token count when its tokenizer is not at hand (`WORDS_TO_TOKENS` a word)."""
    return math.ceil(WORDS_TO_TOKENS * len(text.split()))


def fit_length(text: str, count: Callable[[str], int], limit: int, where: str) -> str:
    """`text` if `count(text) <= limit`, else its longest run of whole sentences that fits (a warning says so);
    `UserInputError` when not even the first sentence fits."""
    n = count(text)
    if n <= limit:
        return text
    kept = ""
    for part in sentences(text):
        candidate = f"{kept} {part}".strip()
        if count(candidate) > limit:
            break
        kept = candidate
    if not kept:
        raise UserInputError(f"{where}: the enhanced prompt has {n} text-encoder tokens, more than the {limit} the "
                             "video model reads, and its first sentence alone does not fit: raise "
                             "--max-sequence-length, or ask for a shorter caption (--enhancer-system FILE)")
    logger.warning(f"{where}: the enhanced prompt had {n} text-encoder tokens, more than the {limit} the video model "
                   f"reads: kept its first {len(sentences(kept))} sentences ({count(kept)} tokens)")
    return kept
