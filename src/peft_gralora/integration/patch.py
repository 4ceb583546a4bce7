"""The patch record: one attribute of peft / transformers / diffusers that :func:`~peft_gralora.integration.install`
replaces, with the reason next to it. Each module of this package defines its own rows; the table users read is
rendered from them (:func:`render_markdown`, exposed as ``peft_gralora.integration.patch_table_markdown()``)."""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

__all__ = ["Patch", "owner_name", "render_markdown"]


class Patch(NamedTuple):
    """One patch row.

    Attributes:
        owner: the class or module whose attribute is replaced.
        attribute: the attribute's name.
        replacement: ``make_replacement(original)``: builds the new attribute from the original one (``None`` for
            an attribute the owner does not have, see ``_targets.adds``).
        why: one or two sentences for users: what the replacement does differently, and why it must.
    """

    owner: Any
    attribute: str
    replacement: Callable[[Any], Any]
    why: str


def owner_name(owner: Any) -> str:
    """``module.Class`` or ``module`` of a patch owner, as users import it."""
    if isinstance(owner, types.ModuleType):
        return owner.__name__
    return f"{owner.__module__}.{owner.__qualname__}"


def render_markdown(rows: Iterable[Patch]) -> str:
    """A two-column markdown table ``patch point | why``; consecutive rows with the same reason share one line."""
    lines = ["| patch point | why |", "| --- | --- |"]
    groups: list[tuple[list[str], str]] = []
    for row in rows:
        point = f"`{owner_name(row.owner)}.{row.attribute}`"
        if groups and groups[-1][1] == row.why:
            groups[-1][0].append(point)
        else:
            groups.append(([point], row.why))
    for points, why in groups:
        lines.append(f"| {', '.join(points)} | {why.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
