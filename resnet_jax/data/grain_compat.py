"""Where this project depends on more of grain than its public API: the one place.

grain's `close()` of a multi-worker iterator can meet grain's own race: a worker's prefetch
thread that another grain thread has created but not yet started ("cannot join thread before
it is started", seen with 8 workers closed after two steps). The close then stops half-way,
leaving the other workers' processes running. grain offers no public way to reach the
iterators below the one that raised, so `close` walks grain's private links to them
(`_parents`, an interleave's `_iterators_in_use` and `_prefetch_ds_iter`) and closes each
once its thread has started. Those names are grain 0.2.18's: this module refuses another
grain at import (`TESTED`), and tests/test_input.py checks on a real two-worker pipeline
that the walk reaches every worker's iterator, so a grain that renames them fails there
before it leaves processes behind.
"""

from __future__ import annotations

import importlib.metadata
import time

TESTED = ("0.2.18",)  # grain versions whose private links `close` walks

_VERSION = importlib.metadata.version("grain")
if _VERSION not in TESTED:
    raise ImportError(
        f"grain {_VERSION} is installed; resnet_jax's worker pipeline closes grain's "
        f"iterators through internals of grain {', '.join(TESTED)} "
        "(resnet_jax/data/grain_compat.py): install grain==0.2.18 (requirements-core.txt) "
        "or check that module's walk against the new grain and add its version to TESTED")

_NOT_STARTED = "cannot join thread before it is started"
# grain's private links from an iterator to those below it
_LINKS = ("_parents", "_iterators_in_use", "_prefetch_ds_iter")


def below(node) -> list:
    """The iterators directly below grain iterator `node` (through grain's private links)."""
    found = []
    for name in _LINKS:
        value = getattr(node, name, None)
        if isinstance(value, (list, tuple)):
            found += [v for v in value if v is not None]
        elif value is not None:
            found.append(value)
    return found


def close(iterator) -> None:
    """grain's close of `iterator` and everything below it, also where grain's close meets
    its thread race: then the rest is closed once the racing thread has started."""
    try:
        iterator.close()
    except RuntimeError as err:
        if _NOT_STARTED not in str(err):
            raise
        _close_tree(iterator, set())


def _close_tree(node, seen: set) -> None:
    if id(node) in seen:
        return
    seen.add(id(node))
    for _ in range(200):  # the racing thread starts within microseconds
        try:
            node.close()
            break
        except RuntimeError as err:
            if _NOT_STARTED not in str(err):
                raise
            time.sleep(0.01)
    for child in below(node):
        _close_tree(child, seen)
