"""The ``>>>`` examples in palfast's docstrings run, as a user would paste them.

Every module of the installed package is imported and its docstrings' examples run
with :mod:`doctest` (the same as ``pytest --doctest-modules``, but on the installed
package: the checkout's ``palfast/`` has no compiled extension unless built in place).
"""

import doctest
import importlib
import pkgutil

import pytest

import palfast

MODULES = sorted(m.name for m in pkgutil.walk_packages(palfast.__path__, prefix="palfast."))


def test_every_module_is_listed():
    """walk_packages found the package's layers (a broken walk would test nothing)."""
    assert {"palfast.graph", "palfast.metrics", "palfast.active.store"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True, verbose=False
    )
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} doctest examples failed"
