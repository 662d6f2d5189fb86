"""Prompt template and tokenisation with image placeholders (§5.2, §5.3)."""

from __future__ import annotations

from .errors import InputError
from .model.medmoe import IMAGE_TOKEN_INDEX
from .tokenizer import Tokenizer

# `phi` / `stablelm` conversation templates are identical (moellava/conversation.py L312-335).
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_PLACEHOLDER = "<image>"
MAX_QUESTION_CHARS = 4000


def build_prompt(question: str) -> str:
    """The single-turn generation prompt: `"{system} USER: <image>\\n{question} ASSISTANT:"`.

    As the official eval (§5.2), any `<image>` in the question is removed and the
    question stripped. No trailing space after `ASSISTANT:`.

    Raises:
        InputError: empty or absurdly long question.
    """
    q = question.replace(IMAGE_PLACEHOLDER, "").strip()
    if not q:
        raise InputError("the question is empty: ask a question about the image")
    if len(q) > MAX_QUESTION_CHARS:
        raise InputError(f"the question has {len(q)} characters; the limit is {MAX_QUESTION_CHARS}: shorten it")
    return f"{SYSTEM} USER: {IMAGE_PLACEHOLDER}\n{q} ASSISTANT:"


def tokenize_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Tokenise the chunks around each `<image>` separately and join them with IMAGE_TOKEN_INDEX.

    Tokenising separately matters: the first chunk ends with the token(s) of `"USER: "`
    including its trailing space (§5.3, `tokenizer_image_token`). No BOS is added.
    """
    ids: list[int] = []
    for i, chunk in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(tokenizer.encode(chunk))
    return ids
