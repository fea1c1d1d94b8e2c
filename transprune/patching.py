"""Instance-level overrides that stay with the one model they were attached to.

`patch(module, name, fn)` sets ``module.<name> = fn`` on the instance (never the class) and returns what
`unpatch` needs. A deep copy of the model does not inherit the override: the copy gets the attribute's
previous value (its class's method, or a copy of an earlier instance override), so a copied model carries no
pruning and never runs the original's weights through a closure.
"""

from __future__ import annotations

import copy
import functools
import types


class _Override:
    def __init__(self, fn, module, name: str, previous):
        functools.update_wrapper(self, fn)
        self.fn, self.module, self.name, self.previous = fn, module, name, previous

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        twin = memo.get(id(self.module))  # the module's copy, registered before its __dict__ is copied
        if self.previous is not None:
            return copy.deepcopy(self.previous, memo)
        return types.MethodType(getattr(type(twin), self.name), twin)


def patch(module, name: str, fn) -> tuple:
    """Override ``module.<name>`` on this instance; returns (module, name, previous instance value or None)."""
    previous = module.__dict__.get(name)
    setattr(module, name, _Override(fn, module, name, previous))
    return module, name, previous


def unpatch(module, name: str, previous) -> None:
    delattr(module, name)
    if previous is not None:
        setattr(module, name, previous)
