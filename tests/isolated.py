"""Run a function in a fresh interpreter.

Activating the TPM provider changes OpenSSL's default properties for the
whole process (see device_agent/tls.py); tests that do it run in a spawned
child so the rest of the test session keeps a plain OpenSSL.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

_T = TypeVar("_T")


def _set_env(env: dict[str, str]) -> None:
    os.environ.update(env)


def run_isolated(fn: Callable[..., _T], *args: Any, env: dict[str, str] | None = None,
                 timeout: float = 120) -> _T:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=_set_env,
                             initargs=(env or {},)) as pool:
        return pool.submit(fn, *args).result(timeout)
