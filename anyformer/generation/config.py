"""Generation settings and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass
class GenerationConfig:
    """How to pick new tokens.

    max_new_tokens: tokens to generate per sequence (stops earlier at a stop token/string).
    do_sample: sample from the filtered distribution (else greedy / beam search).
    temperature, top_k, top_p, min_p: sampling filters (temperature 0 means greedy).
    repetition_penalty: > 1 discourages tokens already seen (1 = off).
    no_repeat_ngram_size: forbid repeating any n-gram of this size (0 = off).
    stop_tokens: ids that end a sequence (kept in the output); stop_strings: texts that end it
      (need a `decode` function).
    seed: seeds a torch.Generator for reproducible sampling (None: the global RNG).
    num_beams: > 1 for beam search; length_penalty: beam scores are divided by length ** this.
    pad_token_id: fills the output after a sequence has stopped, and the left padding.
    decoder_start_token_id: first decoder token of an encoder-decoder (default: the one the
      model knows, e.g. from its Hugging Face config; an error when neither says).
    window: when set, a rolling cache of `sink_tokens` first tokens plus the `window` most
      recent ones (StreamingLLM, Xiao et al. 2023) lets generation run past max_seq_len.
    compile: the fast exact decoding path (on by default): on CPU, one-row linear layers of
      each step run as native GEMVs (sibling q/k/v and gate/up fused) and a bf16 model keeps
      its keys/values in an fp32 cache; every step is the model's own modules. Where the
      native kernels are unavailable (no compiler, other CPUs, GPUs) decoding takes the plain
      module path; False forces the plain path.
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop_tokens: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    pad_token_id: int = 0
    decoder_start_token_id: int | None = None
    window: int | None = None
    sink_tokens: int = 4
    compile: bool = True

    def validate(self) -> "GenerationConfig":
        """Raise ValueError naming the bad setting and its valid range; return self."""
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1] (1 = off), got {self.top_p}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1] (0 = off), got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"),
            (self.no_repeat_ngram_size >= 0, f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}"),
            (self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}"),
            (not (self.num_beams > 1 and self.do_sample), "beam search is deterministic here: set do_sample=False or num_beams=1"),
            (not (self.num_beams > 1 and self.window is not None), "beam search does not support a rolling cache (window)"),
            (self.window is None or self.window >= 1, f"window must be >= 1 or None, got {self.window}"),
            (self.sink_tokens >= 0, f"sink_tokens must be >= 0, got {self.sink_tokens}"),
            (all(isinstance(s, str) and s for s in self.stop_strings), "stop_strings must be non-empty strings"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        return self

    @property
    def greedy(self) -> bool:
        """True when the next token is the arg-max (no sampling)."""
        return not self.do_sample or self.temperature == 0

    def with_overrides(self, **overrides: Any) -> "GenerationConfig":
        """A copy with fields replaced; unknown names raise."""
        names = set(self.__dataclass_fields__)
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown generation setting(s) {unknown}; valid: {sorted(names)}")
        return replace(self, **overrides)
