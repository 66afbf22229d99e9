"""The thread-count knob of the routing pool."""

from __future__ import annotations

import numbers
import os

from . import _core
from ._core import ConfigError

#: Largest thread count accepted (a pool of threads is created eagerly).
MAX_THREADS: int = _core.MAX_THREADS


def set_num_threads(n: int) -> None:
    """Route with ``n`` threads from now on (0: one thread per core).

    The same knob as the environment variable ``MOE_ROUTER_NUM_THREADS`` (read at
    first use). Results are bit-for-bit identical for any thread count.

    Parameters
    ----------
    n : int
        Threads, ``0 <= n <= 1024``.

    Raises
    ------
    ConfigError
        ``n`` is not an integer in that range.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 0 <= int(n) <= MAX_THREADS:
        raise ConfigError(f"invalid num_threads: got {n!r}; must be an integer in [0, {MAX_THREADS}] "
                          f"(0 = one thread per core)")
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    """Threads the next routing call will use."""
    return _core.get_num_threads()


def check_environment() -> None:
    """Warn about an unusable ``MOE_ROUTER_NUM_THREADS`` (one thread per core is used instead)."""
    import warnings

    value = os.environ.get("MOE_ROUTER_NUM_THREADS")
    if value is not None and not (value.strip().isdigit() and int(value) <= MAX_THREADS):
        warnings.warn(f"MOE_ROUTER_NUM_THREADS={value!r} is not an integer in [0, {MAX_THREADS}]; "
                      f"using one thread per core", RuntimeWarning, stacklevel=3)
