"""Tokenizers of pretrained checkpoints: from a Hugging Face `tokenizer.json` or from GGUF metadata.

The encoding itself is done by the `tokenizers` package; this module builds it from what a
checkpoint ships (a tokenizer.json, or a GGUF file's byte-level BPE tokens and merges), knows the
special tokens, pads batches and renders chat templates (Jinja, as Hugging Face does).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..config import ConfigError

# llama.cpp GGUF token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre` name (how text is split before the merges).
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# name -> (split digits one by one first, regex)
GGUF_PRE_TOKENIZERS: dict[str, tuple[bool, str]] = {
    "default": (False, _GPT2_SPLIT),
    "gpt2": (False, _GPT2_SPLIT),
    "smollm": (True, _GPT2_SPLIT),
    "starcoder": (True, _GPT2_SPLIT),
    "llama-bpe": (False, _LLAMA3_SPLIT),
    "llama3": (False, _LLAMA3_SPLIT),
    "qwen2": (False, _QWEN2_SPLIT),
}


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class PretrainedTokenizer:
    """A checkpoint's tokenizer: encode/decode, special tokens, padding and the chat template.

    Args:
        backend: a `tokenizers.Tokenizer` that does the encoding (padding/truncation switched off).
        bos_token, eos_token, pad_token, unk_token: special token strings (None if absent).
        add_bos: prepend bos_token when encoding with special tokens (GGUF's add_bos_token);
            tokenizers with a post-processor (BERT's [CLS] ... [SEP]) add theirs themselves.
        chat_template: a Jinja chat template, or None.
        max_len: the model's maximum length in tokens (for truncation), or None.
    """

    def __init__(
        self,
        backend: Any,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        max_len: int | None = None,
    ) -> None:
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.max_len = max_len
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = getattr(self, name)
            if token is not None and backend.token_to_id(token) is None:
                raise ConfigError(f"the tokenizer's {name} {token!r} is not in its vocabulary")

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_dir(cls, path: str | Path) -> "PretrainedTokenizer":
        """Load from a Hugging Face model directory (tokenizer.json, optional tokenizer_config.json)."""
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {str(path)!r}; a Hugging Face model directory has one")
        backend = Tokenizer.from_file(str(file))
        conf: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            if (path / name).is_file():
                conf.update(json.loads((path / name).read_text()))
        template = conf.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: use the default one
            template = {t["name"]: t["template"] for t in template}.get("default")
        max_len = conf.get("model_max_length")
        return cls(
            backend,
            bos_token=_token_text(conf.get("bos_token")),
            eos_token=_token_text(conf.get("eos_token")),
            pad_token=_token_text(conf.get("pad_token")),
            unk_token=_token_text(conf.get("unk_token")),
            add_bos=bool(conf.get("add_bos_token", False)) and backend.post_processor is None,
            chat_template=template,
            max_len=int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e9 else None,
        )

    @classmethod
    def from_gguf(cls, path: str | Path, metadata: dict[str, Any] | None = None) -> "PretrainedTokenizer":
        """Build from a GGUF file's metadata (byte-level BPE: `tokenizer.ggml.model` = gpt2).

        metadata: the file's metadata with the full token, merge and token-type arrays, when
        already read (see anyformer.pretrained.gguf.gguf_metadata); read from `path` otherwise.
        """
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

        if metadata is None or not isinstance(metadata.get("tokenizer.ggml.tokens"), list):
            from .gguf import gguf_metadata

            metadata = gguf_metadata(path, ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"))
        kind = metadata.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ConfigError(
                f"GGUF tokenizer model {kind!r} is not supported; supported: gpt2 (byte-level BPE)"
            )
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise ConfigError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(GGUF_PRE_TOKENIZERS)}")
        tokens: list[str] = metadata["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
        backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
        digits, regex = GGUF_PRE_TOKENIZERS[pre]
        steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
        steps += [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
        backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
        backend.decoder = decoders.ByteLevel()
        types = metadata.get("tokenizer.ggml.token_type") or [0] * len(tokens)
        backend.add_special_tokens(
            [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == _CONTROL]
        )
        backend.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])

        def special(key: str) -> str | None:
            i = metadata.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        arch = metadata.get("general.architecture", "")
        return cls(
            backend,
            bos_token=special("bos"),
            eos_token=special("eos"),
            pad_token=special("padding"),
            unk_token=special("unknown"),
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=metadata.get("tokenizer.chat_template"),
            max_len=metadata.get(f"{arch}.context_length"),
        )

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json into directory `path` (transformers'
        AutoTokenizer loads them); returns the directory."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(root / "tokenizer.json"))
        conf: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if getattr(self, name) is not None:
                conf[name] = getattr(self, name)
        if self.max_len is not None:
            conf["model_max_length"] = self.max_len
        if self.chat_template is not None:
            conf["chat_template"] = self.chat_template
        (root / "tokenizer_config.json").write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")
        return root

    # ----------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        """The id of a token string (None for None or an unknown token)."""
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or None."""
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-sequence token, or None."""
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        """Id used for padding: the pad token, else the eos token, else 0."""
        for token in (self.pad_token, self.eos_token):
            if token is not None:
                return self.backend.token_to_id(token)
        return 0

    # ----------------------------------------------------------------- encode / decode

    def encode(
        self, text: str, *, add_special_tokens: bool = True, truncate: bool = False, max_len: int | None = None
    ) -> list[int]:
        """Token ids of `text`; special tokens written in the text are kept whole.

        add_special_tokens: add the checkpoint's own ([CLS] ... [SEP] for BERT, bos when add_bos).
        truncate: cut the text so the result has at most `max_len` (default: the tokenizer's) tokens.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}; use encode_batch for a list")
        enc = self.backend.encode(text, add_special_tokens=False)
        bos = add_special_tokens and self.add_bos and self.bos_id is not None and enc.ids[:1] != [self.bos_id]
        limit = max_len or self.max_len
        if truncate and limit is not None:  # cut the text, keep the special tokens
            post = self.backend.post_processor
            extra = int(bos) + (post.num_special_tokens_to_add(False) if add_special_tokens and post is not None else 0)
            enc.truncate(max(limit - extra, 0))
        ids = self.backend.post_process(enc, None, add_special_tokens).ids
        return [self.bos_id, *ids] if bos else ids

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        add_special_tokens: bool = True,
        truncate: bool = True,
        max_len: int | None = None,
        device: Any = None,
    ) -> tuple[Tensor, Tensor]:
        """Right-padded token ids (b, n) and attention mask (b, n) (1 = real token) for `texts`."""
        if isinstance(texts, str) or not texts:
            raise ValueError("encode_batch expects a non-empty list of strings")
        rows = [self.encode(t, add_special_tokens=add_special_tokens, truncate=truncate, max_len=max_len) for t in texts]
        n = max(max(len(r) for r in rows), 1)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids.to(device), mask.to(device)

    def decode(self, ids: Sequence[int] | Tensor, *, skip_special_tokens: bool = False) -> str:
        """Text of token ids (a list or a 1-d tensor)."""
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-d sequence of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **variables: Any,
    ) -> str | list[int]:
        """Render a conversation with the checkpoint's chat template (Jinja, sandboxed).

        messages: [{"role": "user", "content": "..."}, ...]. add_generation_prompt: end with the
        opening of an assistant turn. tokenize: return token ids (no extra special tokens added).
        Extra keyword arguments become template variables.
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template; format the prompt yourself, or use a chat checkpoint")
        text = render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            unk_token=self.unk_token or "",
            **variables,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


def render_chat_template(template: str, messages: list[dict[str, str]], **variables: Any) -> str:
    """Render a Jinja chat template as Hugging Face does (sandboxed, trim_blocks, lstrip_blocks)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template error: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=messages, **variables)
    except jinja2.TemplateError as e:
        raise ValueError(f"cannot render the chat template: {e}") from e


def load_tokenizer(path: str | Path) -> PretrainedTokenizer:
    """The tokenizer of a checkpoint: a Hugging Face model directory or a .gguf file."""
    path = Path(path)
    if path.is_dir():
        return PretrainedTokenizer.from_dir(path)
    from .gguf import check_gguf_file

    return PretrainedTokenizer.from_gguf(check_gguf_file(path))
