"""Wrapping calibration documents in a tokenizer's chat template (`--chat-template`).

An instruct model routes chat-formatted text differently from raw text, so its experts are best judged on text in
its own format. A document becomes a two-turn conversation, user then assistant: the user turn is the document's
first paragraph when that ends in the first half (a math problem's question, a module docstring), otherwise the
text up to the line break, else the sentence end, else the space nearest the middle; the assistant turn is the
rest. The assistant turn is where most tokens and the model's own style are, which is what the statistics of an
instruct model should see.
"""

from __future__ import annotations

from collections.abc import Callable

from ream_lite.calib.text import one_line
from ream_lite.errors import ReamLiteError


def split_turns(text: str) -> tuple[str, str]:
    """(user, assistant) parts of one document, as described in the module docstring."""
    text = text.strip()
    half = len(text) // 2
    para = text.find("\n\n")
    if 0 < para <= half:
        return text[:para].strip(), text[para:].strip()
    for sep in ("\n", ". ", " "):
        left, right = text.rfind(sep, 0, half + 1), text.find(sep, half)
        cands = [i for i in (left, right) if i > 0]
        if cands:
            cut = min(cands, key=lambda i: abs(i - half)) + 1  # after the newline, the full stop, the space
            return text[:cut].strip(), text[cut:].strip()
    return "", text


def chat_wrapper(tokenizer) -> Callable[[str], str]:
    """A function turning a document into the tokenizer's chat-template text (special tokens as text, which the
    tokenizer maps back to their ids); a ReamLiteError when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ReamLiteError("--chat-template: the tokenizer has no chat template (a base model's usually has none); "
                            "leave out --chat-template, or pass --tokenizer with an instruct model's tokenizer")

    def wrap(text: str) -> str:
        user, assistant = split_turns(text)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as e:  # a template may reject the conversation (jinja raises its own errors)
            raise ReamLiteError(f"--chat-template: the tokenizer's chat template fails on a user/assistant "
                                f"conversation ({one_line(e)})") from None

    return wrap
