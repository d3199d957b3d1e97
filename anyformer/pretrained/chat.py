"""Prompts for a pretrained checkpoint (GGUF file or HF directory): a plain prompt, or a chat
turn through the checkpoint's chat template, as token ids; the tokens that end a reply."""

from __future__ import annotations


from .tokenizer import PretrainedTokenizer


def prompt_ids(tokenizer: PretrainedTokenizer, prompt: str, *, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids of a plain prompt, or of a one-turn conversation rendered by the chat template."""
    if not chat:
        if system is not None:
            raise ValueError("--system needs --chat (a system message is part of a chat conversation)")
        return tokenizer.encode(prompt)
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert isinstance(ids, list)
    return ids


def stop_tokens(tokenizer: PretrainedTokenizer) -> list[int]:
    """Ids that end a reply: the eos token and, for chat templates, the end-of-turn token."""
    ids = {tokenizer.eos_id, tokenizer.token_id("<|im_end|>"), tokenizer.token_id("<|eot_id|>")}
    return sorted(i for i in ids if i is not None)
