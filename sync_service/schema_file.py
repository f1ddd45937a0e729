"""Reading the schema file (SPEC §2): YAML or JSON text into a validated `Schema`.

`load_schema(path)` reads the file strictly (duplicate keys are errors, only
true/false are booleans, timestamps stay text) and hands the document to
sync_service.rules.schema's `parse_schema`, which validates every key.
`DEFAULT_SCHEMA_PATH` is the schema shipped with the service
(sync_service/data/schema.yaml). The rules themselves read no file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Final, NoReturn

import yaml
from yaml.nodes import MappingNode

from sync_service.rules.schema import Schema, SchemaError, parse_schema

__all__ = ["DEFAULT_SCHEMA_PATH", "load_schema"]

DEFAULT_SCHEMA_PATH = Path(__file__).parent / "data" / "schema.yaml"


def load_schema(path: str | Path) -> Schema:
    """Read, parse and validate the schema file at `path` (YAML or JSON)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise SchemaError(f"{source}: cannot read the schema file: {e}") from e
    return parse_schema(_parse_text(text, source), source=source)


def _parse_text(text: str, source: str) -> object:
    try:
        # JSON is YAML, except that YAML forbids tabs as indentation, which JSON
        # files often have; so a document that looks like JSON is read as JSON
        # first, and as (flow-style) YAML only if it is not JSON.
        if text.lstrip().startswith("{"):
            try:
                return json.loads(
                    text, object_pairs_hook=_json_object, parse_constant=_json_constant
                )
            except json.JSONDecodeError as e:
                if source.lower().endswith(".json"):
                    raise SchemaError(f"{source}: not valid JSON: {e}", problem=str(e)) from e
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: builds plain data only
    except yaml.YAMLError as e:
        raise SchemaError(f"{source}: not valid YAML: {e}", problem=str(e)) from e
    except _TextError as e:
        raise SchemaError(f"{source}: {e}", problem=str(e)) from e


class _TextError(Exception):
    """A problem found while reading the text (no key path yet): a duplicate key."""


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _TextError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _json_constant(name: str) -> NoReturn:
    raise _TextError(f"{name} is not JSON")


_YAML_BOOL: Final = "tag:yaml.org,2002:bool"
_YAML_TIMESTAMP: Final = "tag:yaml.org,2002:timestamp"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader, minus the YAML 1.1 habits that silently change what was written.

    - A duplicate key is an error (PyYAML keeps the last one).
    - Only true/false are booleans, as in YAML 1.2: in YAML 1.1 `values: [yes, no]`
      or a country code `NO` would become booleans.
    - Timestamps stay text and are parsed by the same code that parses them on
      the wire (PyYAML would drop digits past microseconds and accept local times).
    """

    # PyYAML keeps resolvers in this class-level dict (its stubs call it an
    # instance variable); a copy of our own leaves SafeLoader untouched.
    yaml_implicit_resolvers: dict[Any, Any] = {  # noqa: RUF012
        first: [(tag, rx) for tag, rx in resolvers if tag not in (_YAML_BOOL, _YAML_TIMESTAMP)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` entries may be overridden by explicit keys
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable):
                if key in seen:
                    mark = key_node.start_mark
                    where = f"line {mark.line + 1}: " if mark is not None else ""
                    raise _TextError(f"{where}duplicate key {key!r}")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    _YAML_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
