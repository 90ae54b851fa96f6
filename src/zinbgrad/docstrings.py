"""Shared docstring fragments (scanpy's ``doc_params`` idea): a parameter documented the same
way in several functions is written once and filled into each docstring by :func:`doc_params`,
so ``help()`` and the rendered API pages show the full text."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TypeVar

__all__ = ["doc_params"]

F = TypeVar("F", bound=Callable)


def doc_params(**fragments: str) -> Callable[[F], F]:
    """Decorator filling the placeholders ``{name}`` of a docstring with ``fragments[name]``.

    The docstring is cleaned (:func:`inspect.cleandoc`: common indentation removed) and each
    fragment, written without indentation, is indented as its placeholder is. Only the named
    placeholders are replaced: other braces in the docstring are left as they are.

    Parameters
    ----------
    **fragments
        Placeholder name -> text (several lines allowed, e.g. a numpydoc parameter entry).

    Returns
    -------
    The decorator; it sets ``__doc__`` and returns the function itself.
    """

    def decorate(obj: F) -> F:
        lines = []
        for line in inspect.cleandoc(obj.__doc__ or "").splitlines():
            name = line.strip()
            if name.startswith("{") and name.endswith("}") and name[1:-1] in fragments:
                indent = line[: len(line) - len(line.lstrip())]
                text = fragments[name[1:-1]].strip("\n")
                lines.extend(indent + t if t else t for t in text.splitlines())
            else:
                lines.append(line)
        obj.__doc__ = "\n".join(lines)
        return obj

    return decorate
