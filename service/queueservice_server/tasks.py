"""Task registration: the `@task` decorator and loading tasks by module name.

A task is a plain function taking the job's payload (a dict). The decorator
only attaches the name and policy; `load_tasks` collects decorated functions
from the modules named in `QUEUE_TASK_MODULES`, so importing a module never
touches Redis or Huey.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from queueservice_server.settings import Settings, SettingsError

TASK_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
DIAG_MODULE = "queueservice_server.diag"

TaskFunc = Callable[[dict[str, Any]], Any]
F = TypeVar("F", bound=TaskFunc)


class TaskModuleError(SettingsError):
    """A module named in QUEUE_TASK_MODULES cannot be imported, or registers a name twice."""


@dataclass(frozen=True)
class TaskPolicy:
    """Per-task overrides; None falls back to the service settings."""

    timeout: float | None = None
    max_attempts: int | None = None
    retry_delay: float | None = None
    retry_backoff: float = 2.0

    def resolve(self, settings: Settings, *, max_attempts: int | None = None, timeout: float | None = None) -> Policy:
        """One job's effective policy: the request's overrides, else this task's, else the settings'."""
        return Policy(
            max_attempts=max_attempts or self.max_attempts or settings.default_max_attempts,
            timeout=timeout or self.timeout or settings.default_timeout,
            retry_delay=self.retry_delay if self.retry_delay is not None else settings.retry_delay,
            retry_backoff=self.retry_backoff,
        )


@dataclass(frozen=True)
class Policy:
    """A job's effective retry and timeout policy."""

    max_attempts: int
    timeout: float
    retry_delay: float
    retry_backoff: float


@dataclass(frozen=True)
class TaskDef:
    name: str
    func: TaskFunc
    policy: TaskPolicy


_ATTR = "__queue_task__"


def task(
    name: str,
    *,
    timeout: float | None = None,
    max_attempts: int | None = None,
    retry_delay: float | None = None,
    retry_backoff: float = 2.0,
) -> Callable[[F], F]:
    """Register `func` under `name` with its retry and timeout policy."""
    if not TASK_NAME_RE.match(name):
        raise ValueError(f"invalid task name {name!r}: use dotted identifiers such as 'billing.send_invoice'")
    if max_attempts is not None and max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    policy = TaskPolicy(
        timeout=timeout, max_attempts=max_attempts, retry_delay=retry_delay, retry_backoff=retry_backoff
    )

    def decorate(func: F) -> F:
        setattr(func, _ATTR, TaskDef(name=name, func=func, policy=policy))
        return func

    return decorate


def load_tasks(modules: Iterable[str], *, diag: bool = True) -> dict[str, TaskDef]:
    """Import `modules` (plus the diagnostic tasks if `diag`) and collect their tasks by name."""
    names = [DIAG_MODULE, *modules] if diag else list(modules)
    found: dict[str, TaskDef] = {}
    for module_name in names:
        module = _import(module_name)
        for value in vars(module).values():
            definition = getattr(value, _ATTR, None)
            if not isinstance(definition, TaskDef):
                continue
            other = found.get(definition.name)
            if other is not None and other.func is not definition.func:
                raise TaskModuleError(
                    f"QUEUE_TASK_MODULES: task name {definition.name!r} is registered twice ({module_name})"
                )
            found[definition.name] = definition
    return found


def _import(module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except Exception as exc:
        # One line for the operator: the module, and what importing it raised (its first line).
        first = (str(exc).strip().splitlines() or [""])[0]
        raise TaskModuleError(
            f"QUEUE_TASK_MODULES: cannot import {module_name!r}: {type(exc).__name__}: {first}"
        ) from exc
