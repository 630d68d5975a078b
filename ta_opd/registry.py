"""A name registry: unique names, and unknown names answered with the list of valid ones."""

from __future__ import annotations

from typing import Generic, TypeVar

from ta_opd.errors import TAConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind  # "selector", "loss": used in error messages
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> None:
        if name in self._items:
            raise TAConfigError(f"{self.kind} {name!r} is already registered; {self.kind} names must be unique")
        self._items[name] = item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise TAConfigError(f"{self.kind}={name!r} is unknown; valid {self.kind_plural}: "
                                f"{', '.join(self._items)}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    @property
    def kind_plural(self) -> str:
        return "losses" if self.kind == "loss" else f"{self.kind}s"
