"""Configuration: nested dataclasses, YAML in and out, strict dotted overrides.

Every field of every config is typed; loading checks keys and types and says exactly which
key was wrong and which keys are valid. Variant-specific settings live in an ``options``
mapping that the variant itself validates against its own small options dataclass.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, wrong type, inconsistent sizes."""


# --------------------------------------------------------------------------- strict dataclasses

# (config class, field) -> the registry whose names the field must hold; bound once every
# registry is filled (anyformer/__init__.py), so a config built in Python is checked like one
# read from YAML and then built
_NAMED_FIELDS: dict[tuple[type, str], Any] = {}


def bind_names(cls: type, field_name: str, registry: Any) -> None:
    """Make `cls(...)` check that `field_name` holds a name of `registry` (anything with
    `__contains__`, `names()` and `family`)."""
    _NAMED_FIELDS[(cls, field_name)] = registry


# (config class, kind field) -> (options field, registry): the registry knows each name's options
# dataclass (Registry.register(name, options=...)); bound like _NAMED_FIELDS
_KIND_OPTIONS: dict[tuple[type, str], tuple[str, Any]] = {}
# config class -> functions that rewrite a mapping written by an older version before it is read
_MIGRATIONS: dict[type, list[Any]] = {}
# config class -> its dotted section ("model.attention"), for messages
_SECTIONS: dict[type, str] = {}


def bind_options(cls: type, kind_field: str, options_field: str, registry: Any) -> None:
    """Make `kind_options(cfg, kind_field)` parse `cfg.<options_field>` with the options
    dataclass that `registry` holds for the name in `cfg.<kind_field>`."""
    _KIND_OPTIONS[(cls, kind_field)] = (options_field, registry)


def kind_options(cfg: Any, kind_field: str) -> Any:
    """The options of the variant named by `cfg.<kind_field>`, parsed and checked against the
    dataclass it registered; None for a variant with no options (whose mapping must be empty)."""
    options_field, registry = _KIND_OPTIONS[(type(cfg), kind_field)]
    name, given = getattr(cfg, kind_field), getattr(cfg, options_field)
    where = f"{_SECTIONS.get(type(cfg), '')}.{options_field}".lstrip(".")
    cls = registry.options_of(name)
    if cls is None:
        if given:
            raise ConfigError(f"{where}: {registry.family} {name!r} takes no options; got {', '.join(sorted(given))}")
        return None
    return from_dict(cls, given or {}, f"{where} ({name})")


def register_migration(cls: type, migrate: Any) -> None:
    """Run `migrate(data)` (in place) on every mapping read into `cls`, before its keys are
    checked: how a variant moves a setting that old configs and run folders hold elsewhere."""
    _MIGRATIONS.setdefault(cls, []).append(migrate)


def config_dataclass(section: str):  # type: ignore[no-untyped-def]
    """`@dataclass` for configs built in Python: unknown keyword arguments, wrong types and
    unknown registry names raise ConfigError naming `section.key` (and the valid keys or names),
    and nested sections given as mappings are converted, as loading a YAML file does."""

    def wrap(cls: type[C]) -> type[C]:
        cls = dataclass(cls)
        _SECTIONS[cls] = section
        init = cls.__init__
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        prefix = f"{section}." if section else ""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            unknown = [k for k in kwargs if k not in names]
            if unknown:
                raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; valid keys here: {', '.join(names)}")
            if len(args) > len(names):
                raise ConfigError(f"{cls.__name__} takes at most {len(names)} values ({', '.join(names)}), got {len(args)}")
            init(self, *args, **kwargs)
            hints = typing.get_type_hints(cls)
            for name in names:
                where = f"{prefix}{name}"
                value = _coerce(getattr(self, name), hints[name], where)
                registry = _NAMED_FIELDS.get((cls, name))
                if registry is not None and value not in registry:
                    raise ConfigError(f"{where}: unknown {registry.family} {value!r}; valid names: {', '.join(registry.names())}")
                object.__setattr__(self, name, value)

        __init__.__doc__ = init.__doc__
        __init__.__signature__ = inspect.signature(init)  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[method-assign]
        return cls

    return wrap


# --------------------------------------------------------------------------- model configs


@config_dataclass("model.attention")
class AttentionConfig:
    """Attention: which module kind, which exact kernel, heads and projections."""

    kind: str = "mha"
    kernel: str = "sdpa"
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    bias: bool = False
    out_bias: bool | None = None
    qk_norm: Literal["none", "layernorm", "rmsnorm"] = "none"
    scale: float | None = None
    dropout: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)


@config_dataclass("model.positional")
class PositionalConfig:
    """Positional encoding: its registered kind and that kind's own options."""

    kind: str = "rope"
    options: dict[str, Any] = field(default_factory=dict)


@config_dataclass("model.norm")
class NormConfig:
    """Normalisation layers and where they sit around each sublayer."""

    kind: str = "rmsnorm"
    eps: float = 1e-5
    bias: bool | None = None  # None: the kind's own default (layernorm has a bias, rmsnorm has none)
    placement: Literal["pre", "post", "sandwich"] = "pre"


@config_dataclass("model.ffn")
class FeedForwardConfig:
    """Position-wise feed-forward: kind, activation, hidden size."""

    kind: str = "swiglu"
    activation: Literal["gelu", "gelu_tanh", "relu", "silu"] | None = None
    hidden_mult: float = 4.0
    hidden_dim: int | None = None
    multiple_of: int = 1
    bias: bool = False
    dropout: float = 0.0


@config_dataclass("model.block")
class BlockConfig:
    """Block kind (a registered name: 'sequential' attention then feed-forward, 'parallel'
    attention and feed-forward side by side, ...) and that kind's own options."""

    kind: str = "sequential"
    options: dict[str, Any] = field(default_factory=dict)


@config_dataclass("model.depth")
class DepthConfig:
    """Depth wiring: how block outputs combine across layers (a registered name: 'plain'
    residual stream, ...) and its own options."""

    kind: str = "plain"
    options: dict[str, Any] = field(default_factory=dict)


@config_dataclass("model.memory")
class MemoryConfig:
    """Segment recurrence around the whole model (a registered name: 'none', or e.g. 'rmt'
    memory tokens) and its own options; such a model reads inputs of any length in segments."""

    kind: str = "none"
    options: dict[str, Any] = field(default_factory=dict)


@config_dataclass("model.head")
class HeadConfig:
    """Output head of an encoder model (a registered name: none, mlm,
    sequence_classification, token_classification, embedding, ...)."""

    kind: str = "none"
    num_labels: int = 2
    pooling: Literal["cls", "mean"] = "cls"
    normalize: bool = True
    pooler: bool = False


@config_dataclass("model")
class ModelConfig:
    """A whole Transformer: architecture, sizes and the variant of every part.

    `arch` names a registered architecture (decoder, encoder, encoder_decoder, vit, ...);
    `options` holds that architecture's own settings, checked against the options dataclass it
    registered (`arch_options`). What every architecture shares lives in the other fields.
    """

    arch: str = "decoder"
    options: dict[str, Any] = field(default_factory=dict)
    vocab_size: int = 256
    dim: int = 256
    num_layers: int = 4
    num_decoder_layers: int | None = None
    max_seq_len: int = 256
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    positional: PositionalConfig = field(default_factory=PositionalConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    ffn: FeedForwardConfig = field(default_factory=FeedForwardConfig)
    block: BlockConfig = field(default_factory=BlockConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    tie_embeddings: bool = True
    share_embeddings: bool = True
    final_norm: bool = True
    embed_norm: bool = False
    embed_scale: float = 1.0
    logit_scale: float = 1.0
    num_token_types: int = 0
    dropout: float = 0.0
    pad_token_id: int | None = None
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        """Per-head width: `attention.head_dim`, or `dim // num_heads`."""
        return self.attention.head_dim or self.dim // self.attention.num_heads

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads: `attention.num_kv_heads`, or `num_heads` (plain multi-head)."""
        return self.attention.num_kv_heads or self.attention.num_heads

    @property
    def arch_options(self) -> Any:
        """`options` parsed into the architecture's own options dataclass (None when the
        architecture registered none; then `options` must be empty)."""
        return kind_options(self, "arch")

    def validate(self) -> "ModelConfig":
        """Check that sizes fit together; raise ConfigError saying what to change."""
        a = self.attention
        if self.dim <= 0 or self.num_layers <= 0 or self.vocab_size <= 0 or self.max_seq_len <= 0:
            raise ConfigError(
                "model.dim, model.num_layers, model.vocab_size and model.max_seq_len must be "
                f"positive (got dim={self.dim}, num_layers={self.num_layers}, "
                f"vocab_size={self.vocab_size}, max_seq_len={self.max_seq_len})"
            )
        if a.num_heads <= 0:
            raise ConfigError(f"model.attention.num_heads must be positive, got {a.num_heads}")
        if a.head_dim is None and self.dim % a.num_heads != 0:
            raise ConfigError(
                f"model.dim={self.dim} is not divisible by model.attention.num_heads={a.num_heads}; "
                "choose a head count that divides dim, or set model.attention.head_dim"
            )
        if a.num_kv_heads is not None and (a.num_kv_heads <= 0 or a.num_heads % a.num_kv_heads):
            raise ConfigError(
                f"model.attention.num_heads={a.num_heads} is not divisible by "
                f"model.attention.num_kv_heads={a.num_kv_heads}; grouped-query attention needs "
                "each key/value head to serve the same number of query heads"
            )
        opts = self.arch_options
        if hasattr(opts, "validate"):
            opts.validate(self)
        if not 0.0 <= a.dropout < 1.0 or not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout probabilities must be in [0, 1)")
        return self


# --------------------------------------------------------------------------- dict <-> dataclass


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against type `tp` (converting ints to floats and dicts to dataclasses)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}")
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[C], data: dict[str, Any], where: str = "") -> C:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    if cls in _MIGRATIONS:
        data = dict(data)
        for migrate in _MIGRATIONS[cls]:
            migrate(data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        valid = f"valid keys here: {', '.join(names)}" if names else "it takes no keys (leave it empty)"
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; {valid}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as plain dicts and lists, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def parse_override(text: str) -> tuple[str, Any]:
    """Split `--a.b.c=value` (or `a.b.c=value`) into ("a.b.c", parsed YAML value)."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override {text!r} must look like --section.key=value")
    key, raw = body.split("=", 1)
    return key, yaml.safe_load(raw) if raw != "" else ""


# the keys that name a section's variant, whose `options` belong to that variant
_KIND_KEYS = ("kind", "arch")


def _drop_stale_options(node: dict[str, Any], new_kind: Any, where: str, key: str = "kind") -> None:
    """A section switched to kind `new_kind` without new options: the previous kind's options
    do not apply to it; drop them, saying so."""
    if node.get(key) != new_kind and node.get("options"):
        warnings.warn(
            f"{where}.{key} changed from {node.get(key)!r} to {new_kind!r}: dropping the options of "
            f"{node.get(key)!r} ({', '.join(sorted(node['options']))}); give {where}.options to set the new {key}'s",
            stacklevel=3,
        )
        node["options"] = {}


def merge_sections(base: dict[str, Any], overrides: dict[str, Any], where: str = "") -> dict[str, Any]:
    """`base` (nested plain dicts) with `overrides` merged in: a section given as a mapping
    updates only the keys it names (free-form `options` mappings are replaced whole); a
    section that switches `kind` without giving `options` loses the previous kind's options."""
    out = dict(base)
    for key, value in overrides.items():
        here = f"{where}.{key}" if where else key
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and key != "options":
            merged = dict(old)
            for kind in _KIND_KEYS:
                if kind in value and "options" not in value and "options" in merged:
                    _drop_stale_options(merged, value[kind], here, kind)
            out[key] = merge_sections(merged, value, here)
        else:
            if key in _KIND_KEYS and "options" not in overrides and out.get("options"):
                _drop_stale_options(out, value, where, key)
            out[key] = value
    return out


def apply_overrides(cfg: C, overrides: list[str] | dict[str, Any]) -> C:
    """A copy of `cfg` with dotted overrides applied; every key must already exist. An
    override of a section's `kind` without one of its `options` drops the old kind's options."""
    data = to_dict(cfg)
    items = list(overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides))
    given = {dotted for dotted, _ in items}
    for dotted, value in items:
        node: Any = data
        parts = dotted.split(".")
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parts[:depth]) or "the top level"
                valid = ", ".join(node) if isinstance(node, dict) else "none"
                raise ConfigError(f"unknown config key '{dotted}': no '{part}' in {where} (valid: {valid})")
            if node[part] is None:
                node[part] = {}
            node = node[part]
        last = parts[-1]
        # keys inside free-form `options` mappings are checked later by the variant itself
        if not isinstance(node, dict) or (last not in node and parts[-2:-1] != ["options"]):
            where = ".".join(parts[:-1]) or "the top level"
            valid = ", ".join(node) if isinstance(node, dict) else "none"
            raise ConfigError(f"unknown config key '{dotted}': no '{last}' in {where} (valid: {valid})")
        section = ".".join(parts[:-1])
        if last in _KIND_KEYS and "options" in node:  # the old variant's options go, but for those given here
            prefix = f"{section}.options" if section else "options"
            if prefix in given:
                pass  # the whole mapping is given
            elif node[last] != value and node.get("options"):
                kept = {k: v for k, v in node["options"].items() if f"{prefix}.{k}" in given}
                node["options"] = {k: v for k, v in node["options"].items() if k not in kept}
                _drop_stale_options(node, value, section, last)
                node["options"] = kept
        node[last] = value
    return from_dict(type(cfg), data)


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def read_yaml(path: str | Path) -> Any:
    """A YAML file's contents (None when empty); not UTF-8 or not YAML: a ConfigError naming it."""
    p = Path(path)
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:  # one line: what is wrong and where
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e).splitlines()[0]
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{p} is not valid YAML: {problem}{where}") from None


def load_yaml(cls: type[C], path: str | Path) -> C:
    """Read a YAML file into config dataclass `cls`, strictly."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    data = read_yaml(p) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping at the top level, got {type(data).__name__}")
    try:
        return from_dict(cls, data)
    except ConfigError as e:  # the file is named once
        raise e if str(p) in str(e) else type(e)(f"{p}: {e}") from None


def parse_options(cls: type[C], options: dict[str, Any], where: str) -> C:
    """Validate a variant's free-form `options` mapping against its options dataclass."""
    return from_dict(cls, options or {}, where)
