"""A lazily computed attribute for result objects: computed on first read, then kept on the instance."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class computed_once(Generic[T]):  # noqa: N801 (used as a decorator, like functools.cached_property)
    """``functools.cached_property`` without its lock, which ``torch.compile`` cannot trace (Python 3.11).

    A non-data descriptor: the first read stores the value in the instance's ``__dict__``, which later reads find
    first; assigning the attribute replaces the value.
    """

    def __init__(self, compute: Callable[[Any], T]) -> None:
        self.compute = compute
        self.name = compute.__name__
        self.__doc__ = compute.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> T:
        if instance is None:
            return self  # type: ignore[return-value]
        value = self.compute(instance)
        instance.__dict__[self.name] = value
        return value
