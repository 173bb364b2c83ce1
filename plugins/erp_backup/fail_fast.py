"""Faults no retry can fix fail the task at once (AirflowFailException): one alert, no retries.

Unfixable: a connection the plan names is missing (ConnectionMissing, or any error caused by
Airflow's "conn_id isn't defined"), the plan is broken (PlanError), the drill's params are
bad (DrillParamError), plus whatever a caller adds. Everything else is raised unchanged and
retried with the DAG's backoff.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


def _unfixable_classes() -> tuple[type[BaseException], ...]:
    from airflow.sdk.exceptions import AirflowNotFoundException

    from erp_backup.drill.params import DrillParamError
    from erp_backup.plan import PlanError
    from erp_backup.services.base import ConnectionMissing

    return ConnectionMissing, PlanError, DrillParamError, AirflowNotFoundException


def unfixable(error: BaseException, also: tuple[type[BaseException], ...] = ()) -> bool:
    """Whether `error`, or an error it was raised from, is one no retry can fix."""
    classes = (*_unfixable_classes(), *also)
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, classes):
            return True
        seen.add(id(current))
        current = current.__cause__
    return False


@contextmanager
def failing_fast(also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn unfixable errors raised in the block into AirflowFailException (the task is not retried)."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        yield
    except AirflowFailException:
        raise
    except Exception as exc:
        if unfixable(exc, also):
            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
        raise


def fail_fast(call: Callable[[], T], also: tuple[type[BaseException], ...] = ()) -> T:
    """Run `call` inside `failing_fast`."""
    with failing_fast(also):
        return call()
