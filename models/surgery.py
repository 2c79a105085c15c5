"""Module surgery: find and replace submodules by dotted name or predicate.

Concept whitening replaces BatchNorms with these, the soft autoencoder swaps ReLUs for soft
thresholds, and users can do the same to any ``nn.Module``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

from torch import nn

from interpzoo.utils import did_you_mean

Predicate = Callable[[str, nn.Module], bool]


def get_submodule(net: nn.Module, name: str) -> nn.Module:
    """``net.get_submodule(name)`` with a did-you-mean error for unknown names."""
    try:
        return net.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in net.named_modules() if n]
        raise KeyError(f"{type(net).__name__} has no submodule {name!r}{did_you_mean(name, names)}") from None


def set_submodule(net: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Replace the submodule at dotted ``name`` by ``module``; returns the old one."""
    old = get_submodule(net, name)
    parent_name, _, attr = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    if isinstance(parent, nn.Sequential | nn.ModuleList) and attr.isdigit():
        parent[int(attr)] = module
    else:
        setattr(parent, attr, module)
    return old


def find_modules(
    net: nn.Module,
    where: str | type[nn.Module] | tuple[type[nn.Module], ...] | Predicate | Iterable[str],
) -> list[str]:
    """Dotted names of submodules matching ``where``.

    ``where`` is a glob pattern on names (``"layer3.*.bn1"``), a module class (or tuple of classes),
    a predicate ``(name, module) -> bool``, or an explicit list of names (each must exist).
    """
    named = [(n, m) for n, m in net.named_modules() if n]
    if isinstance(where, str):
        return [n for n, _ in named if fnmatch.fnmatchcase(n, where)]
    if isinstance(where, type) or (isinstance(where, tuple) and all(isinstance(t, type) for t in where)):
        return [n for n, m in named if isinstance(m, where)]
    if callable(where):
        return [n for n, m in named if where(n, m)]
    names = list(where)
    for n in names:
        get_submodule(net, n)
    return names


def replace_modules(
    net: nn.Module,
    where: str | type[nn.Module] | tuple[type[nn.Module], ...] | Predicate | Iterable[str],
    factory: Callable[[str, nn.Module], nn.Module],
) -> list[str]:
    """Replace every submodule matched by ``where`` with ``factory(name, old_module)``.

    Returns the replaced names. Raises ``KeyError`` when nothing matches, so a typo never passes
    silently.
    """
    names = find_modules(net, where)
    if not names:
        raise KeyError(f"no submodule of {type(net).__name__} matches {where!r}")
    # Replace deepest first so a parent and child can both match without invalidating names.
    for name in sorted(names, key=lambda n: n.count("."), reverse=True):
        set_submodule(net, name, factory(name, get_submodule(net, name)))
    return names
