"""A value kept per model executor (its decode mode's batched decoder, its fusion mode's runner),
weakly: neither a registry entry nor the value itself keeps a model alive."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

from chunkcache.model.executor import LayerExecutor

T = TypeVar("T")


class PerExecutor(Generic[T]):
    """``set`` stores an executor's value; ``get`` returns it, made by ``default`` on first use."""

    def __init__(self, default: Callable[[LayerExecutor], T]) -> None:
        self._values: "weakref.WeakKeyDictionary[LayerExecutor, T]" = weakref.WeakKeyDictionary()
        self._default = default

    def set(self, executor: LayerExecutor, value: T) -> T:
        self._values[executor] = value
        return value

    def get(self, executor: LayerExecutor) -> T:
        if executor not in self._values:
            self._values[executor] = self._default(executor)
        return self._values[executor]


class ExecutorBound:
    """A per-executor value that reaches its executor weakly: the registry maps executors to such
    values, and one that held its executor would keep every model (and its graphs' memory) alive."""

    def __init__(self, executor: LayerExecutor) -> None:
        self._executor = weakref.ref(executor)

    @property
    def executor(self) -> LayerExecutor:
        executor = self._executor()
        if executor is None:
            raise RuntimeError("the model this served is gone")
        return executor
