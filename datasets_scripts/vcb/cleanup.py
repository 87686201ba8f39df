"""Clean-up of LLM/VLM outputs for Visual Caption Boost (paper Sec. 2, App. A.1).

Chat models wrap the caption the prompt asks for in chatter: "Sure! Here is the caption:",
"Caption:", quotes, markdown, role tags ("[INST]", "Assistant:") and, when they ramble, a
note, an explanation or a second caption after the first. :func:`clean_caption` keeps the
first caption only; :func:`caption_flags` marks (never drops) outputs that are empty, too
short, repetitive, refusals or cut by the token limit, so that a run reports their count and
the exported dataset carries the flags.
"""

from __future__ import annotations

import re
from collections import Counter

__all__ = ["FLAGS", "clean_caption", "caption_flags"]

#: Every flag a record can carry. "error" and "input_flagged" are set by the pipeline.
FLAGS = ("empty", "too_short", "repetitive", "refusal", "truncated", "error", "input_flagged")

# Special tokens / role tags a chat template may leave in decoded text.
_SPECIAL = r"(?:<\|[^|<>\s]{1,40}\|>|</?s>|<unk>|<pad>|\[/?INST\]|<</?SYS>>)"
# Leading role prefixes ("Assistant:", "[/INST]", "<|im_start|>assistant", "### Response:").
_LEAD_ROLE = re.compile(
    rf"^\s*(?:{_SPECIAL}\s*(?:assistant|model|gpt)?\s*|(?:#+\s*)?(?:assistant|model|response|gpt|ai|bot)\s*:\s*)",
    re.IGNORECASE)
# A new turn after the caption: the model goes on with the conversation.
_TURN = re.compile(
    rf"{_SPECIAL}|(?:^|\n)\s*(?:#+\s*)?(?:user|human|assistant|system|instruction|question)\s*:"
    r"|(?:^|\s)(?:reference caption \d+|new noisy caption|new caption)\s*:", re.IGNORECASE)
_INTERJECTION = r"(?:sure|certainly|of course|okay|ok|absolutely|alright|all right|great|yes)"
_PREAMBLES = [
    # "Sure!", "Certainly.", "Okay,"
    re.compile(rf"^{_INTERJECTION}\s*[!.,:]+\s*", re.IGNORECASE),
    # "I'd be happy to help!", "I can help with that."
    re.compile(r"^i(?:'d| would| can| will)? (?:be (?:happy|glad) to help|help)[^.!\n]{0,40}[.!]\s*", re.IGNORECASE),
    # "Here is the caption:", "Sure here's a holistic caption that combines ...:", "Below is ...\n"
    re.compile(rf"^(?:{_INTERJECTION}\s+)?(?:here(?:'s| is| are)|below is|this is)\b[^\n:.!?]{{0,100}}(?::|\n)\s*",
               re.IGNORECASE),
    # "Caption:", "Holistic caption:", "Improved Caption 1:", "Answer:", "Output -", "Improved caption\n"
    re.compile(r"^(?:the\s+|my\s+)?(?:(?:final|improved|updated|new|blended|holistic|combined|generated|correct|"
               r"revised|enhanced|expanded|short|brief|detailed|image|visual)\s+)*"
               r"(?:caption|description|answer|output|response|result|summary)(?:\s*\d+)?(?:\s*[:=-]|[ \t]*\n)\s*",
               re.IGNORECASE),
]
# Rambling after the caption: notes, explanations, sign-offs.
_RAMBLE = re.compile(
    r"(?:(?<=[.!?\"”')])\s+|\s*\n|^)\s*(?:\(\s*note\b|note\s*:|note that\b|n\.b\.|explanation\s*:|"
    r"i hope (?:this|that|it)\b|hope this helps|let me know\b|please let me know|feel free\b|"
    r"this (?:caption|description)\s+(?:combines|incorporates|includes|captures|describes|merges|blends|"
    r"keeps|preserves|uses|avoids|is)|in this caption\b|the (?:above|generated|new|improved|holistic|blended)"
    r" caption\b|i (?:have|'ve) (?:combined|incorporated|included|merged|blended|kept|removed))",
    re.IGNORECASE)
_QUOTES = {'"': '"', "“": "”", "'": "'", "‘": "’", "«": "»", "`": "`"}
_REFUSAL = re.compile(
    r"^(?:i'?m sorry|i am sorry|sorry,|i apologi[sz]e|i cannot\b|i can ?not\b|i can't\b|i'?m (?:not able|unable)|"
    r"i am (?:not able|unable)|as an ai\b|as a language model|unfortunately,? (?:i|there is no image)|"
    r"i do(?: not|n't) (?:have|see)|there is no image|no image (?:is|was) (?:provided|attached))",
    re.IGNORECASE)
_WORD = re.compile(r"[\w'’-]+")


def _strip_markdown(text: str) -> str:
    text = re.sub(r"(\*\*|__)(.+?)\1", r"\2", text, flags=re.DOTALL)   # **bold**, __bold__
    text = re.sub(r"(?<!\w)\*(?!\s)(.+?)(?<!\s)\*(?!\w)", r"\1", text)  # *italic*
    text = text.replace("**", "").replace("`", "")
    # headings, block quotes, bullets and numbering at line starts
    return re.sub(r"(?m)^\s*(?:#{1,6}\s+|>\s*|[-*•]\s+|\d{1,2}[.)]\s+)", "", text)


def _strip_quotes(text: str) -> str:
    while len(text) >= 2 and text[0] in _QUOTES:
        close = _QUOTES[text[0]]
        body = text[1:]
        # "caption." or "caption". -> caption.
        m = re.fullmatch(rf"(.*?)\s*{re.escape(close)}([.!]?)", body, flags=re.DOTALL)
        # an inner closing quote (not an apostrophe inside a word) means it is not one quoted span
        if not m or re.search(rf"(?<!\w){re.escape(close)}|{re.escape(close)}(?!\w)", m.group(1)):
            break
        text = (m.group(1) + m.group(2)).strip()
    return text


def _strip_preambles(text: str) -> str:
    changed = True
    while changed:
        changed = False
        for rx in [_LEAD_ROLE, *_PREAMBLES]:
            new = rx.sub("", text, count=1).lstrip()
            if new != text:
                text, changed = new, True
        new = _strip_quotes(text)
        if new != text:
            text, changed = new, True
    return text


def clean_caption(text: str | None) -> str:
    """The first caption of a model's answer, without chatter (see module docstring).

    Steps: normalise newlines; drop markdown emphasis/bullets; strip leading role tags and
    preambles ("Sure! Here is the caption:", "Caption:"); cut at a new conversation turn;
    keep the first non-empty paragraph; cut notes/explanations/sign-offs; strip wrapping
    quotes; collapse whitespace.
    """
    if not text:
        return ""
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    text = _strip_markdown(text)
    text = _strip_preambles(text)
    # cut at the start of a new turn (role tags, "User:", the prompt's own labels)
    m = _TURN.search(text)
    if m:
        text = text[: m.start()]
    # first non-empty paragraph whose remains are not only a preamble
    for para in re.split(r"\n\s*\n", text):
        para = _strip_preambles(para.strip())
        if para:
            text = para
            break
    else:
        return ""
    m = _RAMBLE.search(text)
    if m:
        text = text[: m.start()]
    text = _strip_quotes(re.sub(r"\s+", " ", text).strip())
    return re.sub(r"\s+", " ", text).strip()


def _repetitive(words: list[str]) -> bool:
    """True when an n-gram repeats back to back (4x for words, 3x for 2..4-grams) or a 4-gram
    occurs 3 times or more anywhere (generation loops)."""
    for n in range(1, 5):
        need = 4 if n == 1 else 3
        for i in range(len(words) - n * need + 1):
            gram = words[i:i + n]
            if all(words[i + k * n:i + (k + 1) * n] == gram for k in range(1, need)):
                return True
    grams = Counter(tuple(words[i:i + 4]) for i in range(len(words) - 3))
    return bool(grams) and max(grams.values()) >= 3


def caption_flags(caption: str, finish_reason: str | None = None, min_words: int = 3) -> list[str]:
    """Quality flags of a cleaned caption (subset of :data:`FLAGS`, in that order).

    Args:
        caption: output of :func:`clean_caption`.
        finish_reason: the backend's finish reason; "length" adds "truncated".
        min_words: fewer words than this is "too_short".
    """
    flags: list[str] = []
    words = [w.lower().strip("'’-") for w in _WORD.findall(caption)]
    words = [w for w in words if w]
    if not words:
        flags.append("empty")
    elif len(words) < min_words:
        flags.append("too_short")
    if _repetitive(words):
        flags.append("repetitive")
    if _REFUSAL.match(caption.strip()):
        flags.append("refusal")
    if finish_reason == "length":
        flags.append("truncated")
    return flags
