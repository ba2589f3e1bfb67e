"""Name -> implementation tables (advantage estimators, loss aggregations, engines, tasks): a new method is
one function and one decorator; an unknown name fails naming the config field and the known names."""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")


class Registry(dict):
    def __init__(self, field: str):
        super().__init__()
        self.field = field

    def register(self, name: str) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            self[name] = obj
            return obj
        return wrap

    def lookup(self, name: str):
        if name not in self:
            raise ValueError(f"{self.field}={name!r}: unknown (registered: {sorted(self)})")
        return self[name]
