"""The declarative schema (SPEC §2): its data model and its validation. Pure: no I/O.

`parse_schema(doc)` validates every key of the parsed document and returns a frozen `Schema`; a bad
file raises `SchemaError` naming the key path (`collections.tasks.fields.status.values`).
Unknown keys are errors, not ignored: a typo such as `requried: true` must not
quietly make a field optional.

Reading the file (YAML or JSON) is sync_service.schema_file's `load_schema`.
Decoding a mutation's fields against the schema lives in sync_service.rules.decode;
what the policies mean when merging lives in sync_service.rules.merge.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, NoReturn

from fieldsync.values import FieldValue, Json, parse_timestamp

__all__ = [
    "CollectionSpec",
    "FieldSpec",
    "FieldType",
    "Policy",
    "Schema",
    "SchemaError",
    "parse_schema",
]


class FieldType(StrEnum):
    STRING = "string"
    TEXT = "text"
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    TIMESTAMP = "timestamp"
    ENUM = "enum"
    JSON = "json"


class Policy(StrEnum):
    MERGE = "merge"
    LWW = "lww"
    TEXT = "text"


@dataclass(frozen=True)
class FieldSpec:
    name: str
    type: FieldType
    policy: Policy
    required: bool = False
    default: FieldValue = None  # None: the schema gives none
    values: tuple[str, ...] = ()  # for enum
    aliases: tuple[str, ...] = ()
    state: bool = False


@dataclass(frozen=True)
class CollectionSpec:
    name: str
    fields: Mapping[str, FieldSpec]
    policy: Policy = Policy.MERGE
    write_roles: frozenset[str] | None = None  # None: any user of the tenant
    aliases: Mapping[str, str] = field(default_factory=dict)  # old name -> field name

    @property
    def all_lww(self) -> bool:
        """Whether every field takes the last write (then deletes do too)."""
        return bool(self.fields) and all(f.policy is Policy.LWW for f in self.fields.values())

    def can_write(self, roles: frozenset[str]) -> bool:
        return self.write_roles is None or not self.write_roles.isdisjoint(roles)


@dataclass(frozen=True)
class Schema:
    version: int
    collections: Mapping[str, CollectionSpec]
    source_json: str = "{}"  # the schema as JSON, for GetSchema


class SchemaError(ValueError):
    """The schema file is invalid; the message names the bad key.

    `key` is the dotted key path (`collections.tasks.fields.status.values`,
    list items as `aliases[0]`), empty when the file as a whole is bad;
    `problem` is the message without the file and key.
    """

    def __init__(self, message: str, *, key: str = "", problem: str = "") -> None:
        super().__init__(message)
        self.key = key
        self.problem = problem or message


NAME_PATTERN: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
"""Collection, field and alias names (fullmatch). A leading `_` is the server's."""

_MAX_SCHEMA_VERSION: Final = 2**32 - 1  # the wire's schema_version is a uint32
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_TOP_KEYS: Final = ("collections", "version")
_COLLECTION_KEYS: Final = ("fields", "policy", "write_roles")
_FIELD_KEYS: Final = ("aliases", "default", "policy", "required", "state", "type", "values")
_STATE_TYPES: Final = (FieldType.ENUM, FieldType.STRING, FieldType.BOOL, FieldType.INT)


# -- validating the document ---------------------------------------------------


def parse_schema(doc: object, *, source: str) -> Schema:
    """Validate a parsed schema document (what YAML/JSON gives) into a `Schema`.

    `source` names the document in error messages (the file's path).
    """
    return _Parser(source).schema(doc)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> NoReturn:
        where = f"{key}: " if key else ""
        raise SchemaError(f"{self.source}: {where}{problem}", key=key, problem=problem)

    # -- structure

    def mapping(self, value: object, key: str, what: str) -> dict[object, object]:
        if not isinstance(value, dict):
            self.fail(key, f"must be a mapping of {what}, got {_kind(value)}")
        return value

    def check_keys(self, doc: Mapping[object, object], key: str, allowed: tuple[str, ...]) -> None:
        for k in doc:
            if k not in allowed:
                hint = ""
                if isinstance(k, str):
                    close = difflib.get_close_matches(k, allowed, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                self.fail(
                    _join(key, k), f"unknown key (allowed: {', '.join(sorted(allowed))}){hint}"
                )

    def name(self, value: object, key: str, what: str) -> str:
        if not isinstance(value, str):
            self.fail(key, f"{what} must be a string, got {_kind(value)}")
        if not NAME_PATTERN.fullmatch(value):
            reserved = " (a leading underscore is reserved for the server)"
            self.fail(
                key,
                f"{what} {value!r} must match {NAME_PATTERN.pattern}"
                + (reserved if value.startswith("_") else ""),
            )
        return value

    def boolean(self, value: object, key: str) -> bool:
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {_kind(value)}")
        return value

    # -- the document

    def schema(self, doc: object) -> Schema:
        if doc is None:
            self.fail("", "the schema is empty")
        top = self.mapping(doc, "", "`version` and `collections`")
        self.check_keys(top, "", _TOP_KEYS)
        if "version" not in top:
            self.fail("version", "required (the schema's version, a positive integer)")
        version = top["version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            self.fail("version", f"must be a positive integer, got {_kind(version)}")
        if version > _MAX_SCHEMA_VERSION:
            self.fail("version", f"must be at most {_MAX_SCHEMA_VERSION} (a uint32 on the wire)")
        if "collections" not in top:
            self.fail("collections", "required (a mapping of collection name to collection)")
        collections_doc = self.mapping(top["collections"], "collections", "collection names")
        if not collections_doc:
            self.fail("collections", "must name at least one collection")
        collections: dict[str, CollectionSpec] = {}
        for raw_name, cdoc in collections_doc.items():
            name = self.name(raw_name, _join("collections", raw_name), "a collection name")
            collections[name] = self.collection(name, cdoc, f"collections.{name}")
        try:
            source_json = json.dumps(
                doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            )
        except (TypeError, ValueError) as e:  # pragma: no cover - validation rules it out
            self.fail("", f"cannot be rendered as JSON: {e}")
        return Schema(version=version, collections=collections, source_json=source_json)

    def collection(self, name: str, doc: object, key: str) -> CollectionSpec:
        cdoc = self.mapping(doc, key, "`fields`, `policy`, `write_roles`")
        self.check_keys(cdoc, key, _COLLECTION_KEYS)

        write_roles: frozenset[str] | None = None
        if "write_roles" in cdoc:
            write_roles = self.write_roles(cdoc["write_roles"], f"{key}.write_roles")

        policy = Policy.MERGE
        if "policy" in cdoc:
            raw = cdoc["policy"]
            if raw not in (Policy.MERGE.value, Policy.LWW.value):
                self.fail(f"{key}.policy", f"must be merge or lww, got {_show(raw)}")
            policy = Policy(str(raw))

        if "fields" not in cdoc:
            self.fail(f"{key}.fields", "required (a mapping of field name to field)")
        fields_doc = self.mapping(cdoc["fields"], f"{key}.fields", "field names")
        if not fields_doc:
            self.fail(f"{key}.fields", "must name at least one field")
        fields: dict[str, FieldSpec] = {}
        for raw_name, fdoc in fields_doc.items():
            fname = self.name(raw_name, _join(f"{key}.fields", raw_name), "a field name")
            fields[fname] = self.field(fname, fdoc, f"{key}.fields.{fname}", policy)

        # Aliases are checked here because they must not collide across fields:
        # an old name that meant two fields could not be applied to either.
        aliases: dict[str, str] = {}
        for spec in fields.values():
            for i, alias in enumerate(spec.aliases):
                akey = f"{key}.fields.{spec.name}.aliases[{i}]"
                if alias in fields:
                    self.fail(akey, f"{alias!r} is already the name of a field of {name}")
                if alias in aliases:
                    owner = aliases[alias]
                    self.fail(
                        akey,
                        f"{alias!r} is listed twice"
                        if owner == spec.name
                        else f"{alias!r} is already an alias of {owner}",
                    )
                aliases[alias] = spec.name
        return CollectionSpec(
            name=name, fields=fields, policy=policy, write_roles=write_roles, aliases=aliases
        )

    def write_roles(self, value: object, key: str) -> frozenset[str]:
        if not isinstance(value, list):
            self.fail(key, f"must be a list of role names, got {_kind(value)}")
        if not value:
            # Nobody could write; to let anyone write, leave the key out.
            self.fail(key, "must name at least one role (leave the key out to let any user write)")
        for i, role in enumerate(value):
            if not isinstance(role, str) or not role or role != role.strip():
                self.fail(
                    f"{key}[{i}]",
                    f"must be a non-empty role name without surrounding spaces, got {_show(role)}",
                )
        return frozenset(value)

    def field(self, name: str, doc: object, key: str, collection_policy: Policy) -> FieldSpec:
        fdoc = self.mapping(doc, key, "field settings such as `type`")
        self.check_keys(fdoc, key, _FIELD_KEYS)

        if "type" not in fdoc:
            self.fail(f"{key}.type", "required")
        raw_type = fdoc["type"]
        if raw_type not in tuple(FieldType):
            self.fail(
                f"{key}.type",
                f"must be one of {', '.join(t.value for t in FieldType)}, got {_show(raw_type)}",
            )
        ftype = FieldType(str(raw_type))

        values: tuple[str, ...] = ()
        if ftype is FieldType.ENUM:
            if "values" not in fdoc:
                self.fail(f"{key}.values", "required for an enum field")
            values = self.enum_values(fdoc["values"], f"{key}.values")
        elif "values" in fdoc:
            self.fail(f"{key}.values", f"only an enum field has values, this is {_a(ftype)} field")

        # A text field merges character by character unless told otherwise;
        # every other field follows its collection.
        policy = Policy.TEXT if ftype is FieldType.TEXT else collection_policy
        if "policy" in fdoc:
            raw = fdoc["policy"]
            if raw not in tuple(Policy):
                self.fail(f"{key}.policy", f"must be merge, lww or text, got {_show(raw)}")
            policy = Policy(str(raw))
            if policy is Policy.TEXT and ftype is not FieldType.TEXT:
                self.fail(
                    f"{key}.policy", f"text is only for text fields, this is {_a(ftype)} field"
                )

        required = (
            self.boolean(fdoc["required"], f"{key}.required") if "required" in fdoc else False
        )

        state = self.boolean(fdoc["state"], f"{key}.state") if "state" in fdoc else False
        if state and ftype not in _STATE_TYPES:
            self.fail(
                f"{key}.state",
                f"only enum, string, bool and int fields can be state fields, "
                f"this is {_a(ftype)} field",
            )

        default: FieldValue = None
        if "default" in fdoc:
            default = self.default(fdoc["default"], f"{key}.default", ftype, values)

        aliases: tuple[str, ...] = ()
        if "aliases" in fdoc:
            raw_aliases = fdoc["aliases"]
            if not isinstance(raw_aliases, list):
                self.fail(
                    f"{key}.aliases", f"must be a list of old names, got {_kind(raw_aliases)}"
                )
            aliases = tuple(
                self.name(a, f"{key}.aliases[{i}]", "an alias") for i, a in enumerate(raw_aliases)
            )

        return FieldSpec(
            name=name,
            type=ftype,
            policy=policy,
            required=required,
            default=default,
            values=values,
            aliases=aliases,
            state=state,
        )

    def enum_values(self, value: object, key: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            self.fail(key, f"must be a list of strings, got {_kind(value)}")
        if not value:
            self.fail(key, "must list at least one value")
        seen: set[str] = set()
        for i, v in enumerate(value):
            if not isinstance(v, str) or not v:
                self.fail(f"{key}[{i}]", f"must be a non-empty string, got {_show(v)}")
            if v in seen:
                self.fail(f"{key}[{i}]", f"{v!r} is listed twice")
            seen.add(v)
        return tuple(value)

    def default(
        self, raw: object, key: str, ftype: FieldType, values: tuple[str, ...]
    ) -> FieldValue:
        if raw is None:
            # `default:` with nothing after it reads as null: most likely a value
            # was forgotten, and a null default would mean "no default" anyway.
            self.fail(key, "null is not a default; leave the key out for none")
        match ftype:
            case FieldType.STRING | FieldType.TEXT:
                if isinstance(raw, str):
                    return raw
                self.fail(key, f"must be a string for a {ftype} field, got {_show(raw)} (quote it)")
            case FieldType.INT:
                if isinstance(raw, int) and not isinstance(raw, bool):
                    if _INT64_MIN <= raw <= _INT64_MAX:
                        return raw
                    self.fail(key, f"{raw} is outside the int64 range")
                self.fail(key, f"must be an integer for an int field, got {_show(raw)}")
            case FieldType.FLOAT:
                if isinstance(raw, float) and math.isfinite(raw):
                    return raw
                if isinstance(raw, int) and not isinstance(raw, bool) and abs(raw) <= 2**53:
                    return float(raw)
                self.fail(key, f"must be a finite number for a float field, got {_show(raw)}")
            case FieldType.BOOL:
                if isinstance(raw, bool):
                    return raw
                self.fail(key, f"must be true or false for a bool field, got {_show(raw)}")
            case FieldType.ENUM:
                if isinstance(raw, str) and raw in values:
                    return raw
                self.fail(key, f"must be one of {', '.join(values)}, got {_show(raw)}")
            case FieldType.TIMESTAMP:
                ts = parse_timestamp(raw) if isinstance(raw, str) else None
                if ts is None:
                    self.fail(
                        key,
                        "must be an ISO-8601 timestamp with a timezone, "
                        f"such as 2024-05-01T12:00:00Z, got {_show(raw)}",
                    )
                return ts
            case FieldType.JSON:
                self.check_json(raw, key)
                return Json(json.dumps(raw, ensure_ascii=False))

    def check_json(self, value: object, key: str) -> None:
        """Fail unless `value` is plain JSON data (YAML can hold more: sets, bytes, NaN)."""
        if value is None or isinstance(value, (bool, int, str)):
            return
        if isinstance(value, float):
            if not math.isfinite(value):
                self.fail(key, f"{value!r} is not a JSON number")
            return
        if isinstance(value, list):
            for i, item in enumerate(value):
                self.check_json(item, f"{key}[{i}]")
            return
        if isinstance(value, dict):
            for k, item in value.items():
                if not isinstance(k, str):
                    self.fail(_join(key, k), f"a JSON object's keys are strings, got {_kind(k)}")
                self.check_json(item, f"{key}.{k}")
            return
        self.fail(key, f"{_kind(value)} is not JSON data")


def _a(ftype: FieldType) -> str:
    return ("an " if ftype in (FieldType.INT, FieldType.ENUM) else "a ") + ftype


def _join(key: str, child: object) -> str:
    part = child if isinstance(child, str) else repr(child)
    return f"{key}.{part}" if key else part


def _kind(value: object) -> str:
    """What a YAML value is, as the author of the file would call it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a bool ({'true' if value else 'false'})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _show(value: object) -> str:
    """A scalar as written, else its kind."""
    if isinstance(value, str):
        return repr(value)
    return _kind(value)
