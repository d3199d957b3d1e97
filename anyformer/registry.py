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

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that adds an entry under `name`; a name can be registered once."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise RegistryError(f"{self.family} '{name}' is already registered")
            self._entries[name] = obj
            return obj

        return add

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
