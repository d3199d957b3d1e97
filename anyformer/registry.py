"""A small name -> object registry, one per family of variants (attention, norms, ...)."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown or duplicate name in a registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to classes or factories.

    Args:
        family: what the registry holds, used in error messages ("attention kernel").
    """

    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, T] = {}
        self._options: dict[str, type | None] = {}

    def register(self, name: str, *, options: type | None = None) -> Callable[[T], T]:
        """Decorator that adds an entry under `name`; a name can be registered once.
        `options`: the entry's own options dataclass, where the family keeps options beside
        the name (e.g. `model.arch` + `model.options`); None for an entry that takes none."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise RegistryError(f"{self.family} '{name}' is already registered")
            self._entries[name] = obj
            self._options[name] = options
            return obj

        return add

    def options_of(self, name: str) -> type | None:
        """The options dataclass registered with `name` (None: it takes no options)."""
        self.get(name)  # an unknown name raises with the valid ones
        return self._options[name]

    def get(self, name: str) -> T:
        """The entry called `name`; an unknown name raises and lists the valid ones."""
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.family} '{name}'; valid names: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


def discover(package: str, path: "list[str] | Iterator[str]", *, skip: tuple[str, ...] = ()) -> list[str]:
    """Import every module of a package so that its variant files register themselves.

    Call it at the end of a package's `__init__` as `discover(__name__, __path__)`: a new
    variant file dropped into the package is registered without editing any import list.
    Modules whose name starts with an underscore, and those in `skip`, are left alone.
    Returns the names imported, in sorted order.
    """
    import importlib
    import pkgutil

    names = sorted(info.name for info in pkgutil.iter_modules(list(path)) if not info.name.startswith("_") and info.name not in skip)
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names
