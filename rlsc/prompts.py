"""Questions to prompt text: the tokenizer's chat template, a system instruction, few-shot turns.

Kept apart from data.py (which turns files into Problem records) because prompts depend on the
tokenizer and data loading does not.
"""

from __future__ import annotations

from rlsc.config import PromptConfig


def build_messages(question: str, cfg: PromptConfig) -> list[dict[str, str]]:
    """System instruction, each few-shot example as a user/assistant turn, then the question."""
    messages = [{"role": "system", "content": cfg.instruction}] if cfg.instruction else []
    for example in cfg.few_shot:
        messages.append({"role": "user", "content": example.question})
        messages.append({"role": "assistant", "content": example.answer})
    messages.append({"role": "user", "content": question})
    return messages


def render_prompt(tokenizer, question: str, cfg: PromptConfig) -> str:
    """The prompt text ending where the assistant's answer starts.

    Tokenizers without a chat template (base models) get a plain 'Role: text' transcript.
    """
    messages = build_messages(question, cfg)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"
