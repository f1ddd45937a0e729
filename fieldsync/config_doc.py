"""The configuration reference, read from the configuration dataclasses themselves.

Each service's settings are one frozen dataclass (sync_service.config,
audit_service.config, fieldsync.auth.AuthConfig), every field with a default
and a docstring that starts with the environment variable that sets it:
`FIELDSYNC_NAME: what it means`. This module reads those (the docstrings from
the source, the defaults from the fields) so that `fieldsync-sync --help`,
`fieldsync-audit --help` and docs/configuration.md (scripts/gen_config_doc.py)
always list every variable with its default: a field added to a dataclass
appears in all three. A field whose type is itself a dataclass (like `auth`)
is listed through its own fields; a field with no variable is listed as set
in code only. Nothing here reads the environment.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Setting", "help_epilog", "settings_of", "show_default"]

_VARIABLE = re.compile(r"^(FIELDSYNC_[A-Z0-9_]+)(?:\s*:\s*|\s+)(.*)$", re.S)
_REPO = Path(__file__).resolve().parent.parent
_MIB = 1024 * 1024


@dataclass(frozen=True)
class Setting:
    """One field of a configuration dataclass, as a reader needs it."""

    owner: str
    """The dataclass, e.g. SyncConfig."""
    field: str
    """The field's name (a dotted path through nested dataclasses)."""
    variable: str | None
    """The environment variable that sets it; None when only code sets it."""
    default: str
    """The default, as text: `—` for unset."""
    meaning: str
    """The docstring after the variable's name, on one line."""


def _docstrings(cls: type) -> dict[str, str]:
    """The attribute docstrings of a class body: the string right after each field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for stmt, after in zip(body.body, body.body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def show_default(value: Any) -> str:
    """A default as a reader types it in the environment."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int) and value >= _MIB and value % _MIB == 0:
        return f"{value} ({value // _MIB} MiB)"
    if isinstance(value, str) and value.startswith("/"):
        # A packaged file (the default schema): shown where it is in a checkout.
        path = Path(value)
        if path.is_relative_to(_REPO):
            return str(path.relative_to(_REPO))
    if isinstance(value, tuple | list | frozenset | set):
        return ",".join(str(v) for v in value) or "—"
    return str(value)


def _nested_dataclass(hint: Any) -> type | None:
    """The dataclass a field holds (`AuthConfig | None` -> AuthConfig), if any."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if isinstance(arg, type) and dataclasses.is_dataclass(arg):
                return arg
    return None


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def settings_of(cls: type, *, prefix: str = "") -> Iterator[Setting]:
    """Every setting of a configuration dataclass, nested dataclasses expanded, in order."""
    hints = typing.get_type_hints(cls)
    docs = _docstrings(cls)
    for f in dataclasses.fields(cls):
        nested = _nested_dataclass(hints.get(f.name))
        if nested is not None:
            yield from settings_of(nested, prefix=f"{prefix}{f.name}.")
            continue
        doc = " ".join(docs.get(f.name, "").split())
        found = _VARIABLE.match(doc)
        yield Setting(
            owner=cls.__name__,
            field=prefix + f.name,
            variable=found.group(1) if found else None,
            default=show_default(_default_of(f)),
            meaning=found.group(2) if found else doc,
        )


def help_epilog(*classes: type, width: int = 79) -> str:
    """The environment part of a command's --help: each variable, its default, its meaning."""
    entries: dict[str, tuple[str, list[str]]] = {}
    for cls in classes:
        for s in settings_of(cls):
            if s.variable is not None:
                # One variable read by two fields (the secret verifies and mints): both say
                # so, the general meaning (a nested dataclass's, like AuthConfig's) first.
                meanings = entries.setdefault(s.variable, (s.default, []))[1]
                meanings.insert(0 if "." in s.field else len(meanings), s.meaning)
    lines = ["environment (an empty variable counts as unset):"]
    for variable, (default, meanings) in entries.items():
        lines.append(f"  {variable} (default {default})")
        lines.extend(
            textwrap.wrap(
                " ".join(meanings),
                width=width,
                initial_indent="      ",
                subsequent_indent="      ",
                break_on_hyphens=False,
            )
        )
    return "\n".join(lines)
