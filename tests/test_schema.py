"""The schema file: the shipped default, every validation rule, YAML and JSON input.

Each rule's test checks the key path the error names, since that is what
tells an operator which line of the file to fix.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from fieldsync.values import Json, Timestamp
from sync_service.rules.schema import (
    CollectionSpec,
    FieldSpec,
    FieldType,
    Policy,
    Schema,
    SchemaError,
    parse_schema,
)
from sync_service.schema_file import DEFAULT_SCHEMA_PATH, load_schema

SOURCE = "test.yaml"


def minimal() -> dict[str, Any]:
    return {
        "version": 3,
        "collections": {
            "tasks": {
                "fields": {
                    "title": {"type": "string"},
                    "status": {"type": "enum", "values": ["todo", "done"]},
                },
            },
        },
    }


def with_field(**settings: Any) -> dict[str, Any]:
    """The minimal document with one more field, `f`, of these settings."""
    doc = minimal()
    doc["collections"]["tasks"]["fields"]["f"] = settings
    return doc


def with_collection(**settings: Any) -> dict[str, Any]:
    doc = minimal()
    doc["collections"]["tasks"].update(settings)
    return doc


def schema_error(doc: object) -> SchemaError:
    with pytest.raises(SchemaError) as info:
        parse_schema(doc, source=SOURCE)
    return info.value


def field_of(doc: dict[str, Any], name: str = "f") -> FieldSpec:
    return parse_schema(doc, source=SOURCE).collections["tasks"].fields[name]


# -- the shipped default ---------------------------------------------------------


@pytest.fixture(scope="module")
def default() -> Schema:
    return load_schema(DEFAULT_SCHEMA_PATH)


def test_default_schema_has_the_documented_collections(default: Schema) -> None:
    assert default.version == 3
    assert set(default.collections) == {"tasks", "accounts", "pages", "forms"}


def test_default_tasks_are_as_spec_section_2_shows(default: Schema) -> None:
    tasks = default.collections["tasks"]
    assert tasks.policy is Policy.MERGE
    assert tasks.fields["title"] == FieldSpec(
        "title", FieldType.STRING, Policy.MERGE, required=True, default=""
    )
    assert tasks.fields["status"] == FieldSpec(
        "status",
        FieldType.ENUM,
        Policy.MERGE,
        default="todo",
        values=("todo", "doing", "done"),
        state=True,
    )
    assert tasks.fields["estimate"].type is FieldType.INT
    assert tasks.fields["estimate"].default == 0
    assert tasks.fields["assignee"].aliases == ("assigned_to",)
    assert tasks.aliases == {"assigned_to": "assignee"}
    assert tasks.fields["notes"].policy is Policy.TEXT
    assert tasks.fields["seen_at"].type is FieldType.TIMESTAMP
    assert tasks.fields["seen_at"].policy is Policy.LWW
    assert tasks.fields["due"].type is FieldType.TIMESTAMP
    assert tasks.fields["tags"].type is FieldType.JSON
    assert not tasks.all_lww


def test_default_accounts_pages_forms(default: Schema) -> None:
    accounts = default.collections["accounts"].fields
    assert accounts["name"].required and accounts["name"].type is FieldType.STRING
    assert accounts["status"].values == ("prospect", "open", "negotiating", "closed", "lost")
    assert accounts["status"].default == "prospect" and accounts["status"].state
    assert accounts["amount"].type is FieldType.FLOAT
    assert accounts["notes"].policy is Policy.TEXT
    assert accounts["owner"].type is accounts["industry"].type is FieldType.STRING
    assert accounts["last_contacted"].type is FieldType.TIMESTAMP
    assert accounts["last_contacted"].policy is Policy.LWW

    pages = default.collections["pages"].fields
    assert pages["title"].required and pages["body"].policy is Policy.TEXT

    forms = default.collections["forms"].fields
    assert {n: f.type for n, f in forms.items()} == {
        "account_id": FieldType.STRING,
        "kind": FieldType.ENUM,
        "answers": FieldType.JSON,
        "submitted_at": FieldType.TIMESTAMP,
        "signed": FieldType.BOOL,
    }
    assert forms["kind"].values == ("visit", "inspection", "order")


def test_source_json_is_canonical_and_round_trips(default: Schema) -> None:
    doc = json.loads(default.source_json)
    assert doc["version"] == 3
    assert doc["collections"]["tasks"]["fields"]["status"]["values"] == ["todo", "doing", "done"]
    assert default.source_json == json.dumps(
        doc, sort_keys=True, ensure_ascii=False, separators=(",", ":")
    )
    # The JSON GetSchema returns is itself a valid schema, and the same one.
    assert parse_schema(doc, source="GetSchema") == default


# -- reading files -------------------------------------------------------------


def test_a_json_file_loads_like_the_yaml_one(tmp_path: Path) -> None:
    path = tmp_path / "schema.json"
    # Tab indentation: valid JSON, but YAML does not allow it.
    path.write_text(json.dumps(with_field(type="int", default=5), indent="\t"))
    schema = load_schema(path)
    assert schema.collections["tasks"].fields["f"] == FieldSpec(
        "f", FieldType.INT, Policy.MERGE, default=5
    )
    assert schema == parse_schema(with_field(type="int", default=5), source="x")


def test_a_json_file_with_a_duplicate_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "schema.json"
    path.write_text('{"version": 3, "version": 4, "collections": {}}')
    with pytest.raises(SchemaError, match=r"schema\.json: duplicate key 'version'"):
        load_schema(path)


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "schema.json"
    path.write_text('{"version": 3,}')
    with pytest.raises(SchemaError, match=r"schema\.json: not valid JSON"):
        load_schema(path)


def test_a_yaml_duplicate_key_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "schema.yaml"
    path.write_text(
        "version: 3\ncollections:\n  tasks:\n    fields:\n"
        "      title: {type: string}\n      title: {type: text}\n"
    )
    with pytest.raises(SchemaError, match=r"schema\.yaml: line 6: duplicate key 'title'"):
        load_schema(path)


def test_yaml_syntax_errors_and_missing_files_are_schema_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: [3\n")
    with pytest.raises(SchemaError, match=r"bad\.yaml: not valid YAML"):
        load_schema(bad)
    with pytest.raises(SchemaError, match=r"missing\.yaml: cannot read the schema file"):
        load_schema(tmp_path / "missing.yaml")


def test_yaml_reads_yes_no_as_strings_and_timestamps_as_text(tmp_path: Path) -> None:
    path = tmp_path / "schema.yaml"
    path.write_text(
        "version: 3\n"
        "collections:\n"
        "  polls:\n"
        "    fields:\n"
        "      answer: {type: enum, values: [yes, no, NO]}\n"
        "      at: {type: timestamp, default: 2024-05-01T12:00:00.123456789Z}\n"
        "      on: {type: bool, default: true}\n"
    )
    fields = load_schema(path).collections["polls"].fields
    assert fields["answer"].values == ("yes", "no", "NO")
    # Every fraction digit kept (PyYAML's own timestamps stop at microseconds).
    assert fields["at"].default == Timestamp(1_714_564_800_123_456_789)
    assert fields["on"].default is True
    assert json.loads(load_schema(path).source_json)["collections"]["polls"]["fields"]["at"] == {
        "type": "timestamp",
        "default": "2024-05-01T12:00:00.123456789Z",
    }


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "schema.yaml"
    path.write_text(
        "version: 3\n"
        "collections:\n"
        "  tasks:\n"
        "    fields:\n"
        "      a: &base {type: string, required: true, default: x}\n"
        "      b: {<<: *base, default: y}\n"
    )
    fields = load_schema(path).collections["tasks"].fields
    assert (fields["a"].default, fields["b"].default) == ("x", "y")
    assert fields["b"].required


# -- top level -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "key", "problem"),
    [
        (None, "", "the schema is empty"),
        ([1, 2], "", "must be a mapping"),
        ({"collections": minimal()["collections"]}, "version", "required"),
        ({**minimal(), "version": 0}, "version", "must be a positive integer"),
        ({**minimal(), "version": -1}, "version", "must be a positive integer"),
        ({**minimal(), "version": True}, "version", "must be a positive integer"),
        ({**minimal(), "version": "3"}, "version", "must be a positive integer"),
        ({**minimal(), "version": 3.0}, "version", "must be a positive integer"),
        ({**minimal(), "version": 2**32}, "version", "must be at most 4294967295"),
        ({"version": 3}, "collections", "required"),
        ({"version": 3, "collections": {}}, "collections", "at least one collection"),
        ({"version": 3, "collections": ["tasks"]}, "collections", "must be a mapping"),
        ({**minimal(), "versoin": 3}, "versoin", "unknown key"),
    ],
)
def test_top_level_rules(doc: object, key: str, problem: str) -> None:
    err = schema_error(doc)
    assert err.key == key
    assert problem in err.problem
    assert str(err).startswith(f"{SOURCE}: {key + ': ' if key else ''}")


def test_an_unknown_key_suggests_the_known_one() -> None:
    err = schema_error({**minimal(), "colections": {}})
    assert err.key == "colections"
    assert "did you mean 'collections'?" in str(err)


# -- collections ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key", "problem"),
    [
        ("_tasks", "collections._tasks", "a leading underscore is reserved for the server"),
        ("1tasks", "collections.1tasks", "must match"),
        ("my-tasks", "collections.my-tasks", "must match"),
        ("tasks\n", "collections.tasks\n", "must match"),
        (True, "collections.True", "a collection name must be a string"),
    ],
)
def test_collection_names(name: object, key: str, problem: str) -> None:
    doc = minimal()
    doc["collections"] = {name: doc["collections"]["tasks"]}
    err = schema_error(doc)
    assert err.key == key
    assert problem in err.problem


@pytest.mark.parametrize(
    ("settings", "key", "problem"),
    [
        ({"feilds": {}}, "collections.tasks.feilds", "did you mean 'fields'?"),
        ({"fields": {}}, "collections.tasks.fields", "at least one field"),
        ({"fields": ["title"]}, "collections.tasks.fields", "must be a mapping"),
        ({"policy": "text"}, "collections.tasks.policy", "must be merge or lww"),
        ({"policy": "mrege"}, "collections.tasks.policy", "must be merge or lww, got 'mrege'"),
        ({"write_roles": "admin"}, "collections.tasks.write_roles", "must be a list"),
        ({"write_roles": []}, "collections.tasks.write_roles", "at least one role"),
        ({"write_roles": ["admin", ""]}, "collections.tasks.write_roles[1]", "non-empty"),
        ({"write_roles": [" admin"]}, "collections.tasks.write_roles[0]", "surrounding spaces"),
        ({"write_roles": [7]}, "collections.tasks.write_roles[0]", "got an integer (7)"),
    ],
)
def test_collection_rules(settings: dict[str, Any], key: str, problem: str) -> None:
    err = schema_error(with_collection(**settings))
    assert err.key == key
    assert problem in err.problem


def test_a_collection_without_fields_is_refused() -> None:
    doc = minimal()
    doc["collections"]["tasks"] = {"policy": "lww"}
    assert schema_error(doc).key == "collections.tasks.fields"
    doc["collections"]["tasks"] = "fields"
    assert "must be a mapping" in schema_error(doc).problem


def test_collection_settings_are_parsed() -> None:
    spec = parse_schema(
        with_collection(policy="lww", write_roles=["member", "admin"]), source=SOURCE
    ).collections["tasks"]
    assert spec.policy is Policy.LWW
    assert spec.write_roles == frozenset({"member", "admin"})
    assert spec.can_write(frozenset({"admin"})) and not spec.can_write(frozenset({"viewer"}))
    assert spec.all_lww
    open_spec = parse_schema(minimal(), source=SOURCE).collections["tasks"]
    assert open_spec.write_roles is None and open_spec.can_write(frozenset())
    assert open_spec.policy is Policy.MERGE


# -- fields --------------------------------------------------------------------

F = "collections.tasks.fields.f"


@pytest.mark.parametrize(
    ("name", "key", "problem"),
    [
        ("_id", "collections.tasks.fields._id", "reserved for the server"),
        ("due-date", "collections.tasks.fields.due-date", "must match"),
        ("", "collections.tasks.fields.", "must match"),
        (3, "collections.tasks.fields.3", "a field name must be a string"),
    ],
)
def test_field_names(name: object, key: str, problem: str) -> None:
    doc = minimal()
    doc["collections"]["tasks"]["fields"][name] = {"type": "string"}
    err = schema_error(doc)
    assert err.key == key
    assert problem in err.problem


@pytest.mark.parametrize(
    ("settings", "key", "problem"),
    [
        # structure and unknown keys
        ({"type": "string", "requried": True}, f"{F}.requried", "did you mean 'required'?"),
        ({}, f"{F}.type", "required"),
        ({"type": "str"}, f"{F}.type", "must be one of string, text, int, float, bool"),
        ({"type": None}, f"{F}.type", "got null"),
        # values
        ({"type": "enum"}, f"{F}.values", "required for an enum field"),
        ({"type": "enum", "values": []}, f"{F}.values", "at least one value"),
        ({"type": "enum", "values": "a, b"}, f"{F}.values", "must be a list of strings"),
        ({"type": "enum", "values": ["a", 1]}, f"{F}.values[1]", "must be a non-empty string"),
        ({"type": "enum", "values": ["a", ""]}, f"{F}.values[1]", "must be a non-empty string"),
        ({"type": "enum", "values": ["a", "b", "a"]}, f"{F}.values[2]", "'a' is listed twice"),
        ({"type": "string", "values": ["a"]}, f"{F}.values", "only an enum field has values"),
        # policy
        ({"type": "string", "policy": "text"}, f"{F}.policy", "text is only for text fields"),
        ({"type": "int", "policy": "text"}, f"{F}.policy", "this is an int field"),
        ({"type": "text", "policy": "ot"}, f"{F}.policy", "must be merge, lww or text"),
        # required, state
        ({"type": "string", "required": "yes"}, f"{F}.required", "must be true or false"),
        ({"type": "string", "required": 1}, f"{F}.required", "must be true or false"),
        ({"type": "string", "state": "true"}, f"{F}.state", "must be true or false"),
        ({"type": "float", "state": True}, f"{F}.state", "only enum, string, bool and int"),
        ({"type": "text", "state": True}, f"{F}.state", "this is a text field"),
        ({"type": "timestamp", "state": True}, f"{F}.state", "this is a timestamp field"),
        ({"type": "json", "state": True}, f"{F}.state", "this is a json field"),
        # aliases (each on its own; collisions below)
        ({"type": "string", "aliases": "old"}, f"{F}.aliases", "must be a list of old names"),
        ({"type": "string", "aliases": ["ok", "_old"]}, f"{F}.aliases[1]", "reserved"),
        ({"type": "string", "aliases": [None]}, f"{F}.aliases[0]", "must be a string"),
    ],
)
def test_field_rules(settings: dict[str, Any], key: str, problem: str) -> None:
    err = schema_error(with_field(**settings))
    assert err.key == key
    assert problem in err.problem
    assert str(err) == f"{SOURCE}: {key}: {err.problem}"


def test_the_example_error_message_from_the_brief() -> None:
    doc = minimal()
    del doc["collections"]["tasks"]["fields"]["status"]["values"]
    assert str(schema_error(doc)) == (
        f"{SOURCE}: collections.tasks.fields.status.values: required for an enum field"
    )


@pytest.mark.parametrize(
    ("ftype", "collection_policy", "field_policy", "expected"),
    [
        ("text", None, None, Policy.TEXT),
        ("text", "lww", None, Policy.TEXT),
        ("text", None, "lww", Policy.LWW),
        ("text", None, "merge", Policy.MERGE),
        ("string", None, None, Policy.MERGE),
        ("string", "lww", None, Policy.LWW),
        ("int", "lww", "merge", Policy.MERGE),
        ("timestamp", "merge", "lww", Policy.LWW),
    ],
)
def test_field_policy_defaults(
    ftype: str, collection_policy: str | None, field_policy: str | None, expected: Policy
) -> None:
    settings: dict[str, Any] = {"type": ftype}
    if field_policy:
        settings["policy"] = field_policy
    doc = with_field(**settings)
    if collection_policy:
        doc["collections"]["tasks"]["policy"] = collection_policy
    assert field_of(doc).policy is expected


@pytest.mark.parametrize("ftype", ["enum", "string", "bool", "int"])
def test_state_is_allowed_on_the_watched_types(ftype: str) -> None:
    settings: dict[str, Any] = {"type": ftype, "state": True}
    if ftype == "enum":
        settings["values"] = ["a"]
    assert field_of(with_field(**settings)).state


# -- defaults ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"type": "string", "default": ""}, ""),
        ({"type": "text", "default": "hello"}, "hello"),
        ({"type": "int", "default": -(2**63)}, -(2**63)),
        ({"type": "float", "default": 2.5}, 2.5),
        ({"type": "float", "default": 0}, 0.0),
        ({"type": "bool", "default": False}, False),
        ({"type": "enum", "values": ["a", "b"], "default": "b"}, "b"),
        ({"type": "timestamp", "default": "1970-01-01T01:00:00+01:00"}, Timestamp(0)),
        ({"type": "json", "default": {"a": [1, None]}}, Json('{"a": [1, null]}')),
        ({"type": "json", "default": "x"}, Json('"x"')),
        ({"type": "json", "default": False}, Json("false")),
    ],
)
def test_valid_defaults_are_stored_as_field_values(
    settings: dict[str, Any], expected: object
) -> None:
    default = field_of(with_field(**settings)).default
    assert default == expected
    assert type(default) is type(expected)


@pytest.mark.parametrize(
    ("settings", "key", "problem"),
    [
        ({"type": "string", "default": None}, f"{F}.default", "null is not a default"),
        ({"type": "string", "default": 5}, f"{F}.default", "must be a string"),
        ({"type": "text", "default": ["a"]}, f"{F}.default", "must be a string"),
        ({"type": "int", "default": "0"}, f"{F}.default", "must be an integer"),
        ({"type": "int", "default": True}, f"{F}.default", "must be an integer"),
        ({"type": "int", "default": 1.5}, f"{F}.default", "must be an integer"),
        ({"type": "int", "default": 2**63}, f"{F}.default", "outside the int64 range"),
        ({"type": "float", "default": float("nan")}, f"{F}.default", "finite number"),
        ({"type": "float", "default": float("inf")}, f"{F}.default", "finite number"),
        ({"type": "float", "default": True}, f"{F}.default", "finite number"),
        ({"type": "float", "default": 2**53 + 1}, f"{F}.default", "finite number"),
        ({"type": "bool", "default": "true"}, f"{F}.default", "must be true or false"),
        ({"type": "bool", "default": 0}, f"{F}.default", "must be true or false"),
        (
            {"type": "enum", "values": ["a", "b"], "default": "c"},
            f"{F}.default",
            "must be one of a, b, got 'c'",
        ),
        ({"type": "timestamp", "default": "2024-05-01T12:00:00"}, f"{F}.default", "timezone"),
        ({"type": "timestamp", "default": "2024-05-01"}, f"{F}.default", "timezone"),
        ({"type": "timestamp", "default": 0}, f"{F}.default", "ISO-8601"),
        ({"type": "json", "default": {"a": [float("nan")]}}, f"{F}.default.a[0]", "not a JSON"),
        ({"type": "json", "default": {1: "x"}}, f"{F}.default.1", "keys are strings"),
        ({"type": "json", "default": {"a": {1, 2}}}, f"{F}.default.a", "a set is not JSON"),
        ({"type": "json", "default": b"\x00"}, f"{F}.default", "a bytes is not JSON"),
    ],
)
def test_invalid_defaults(settings: dict[str, Any], key: str, problem: str) -> None:
    err = schema_error(with_field(**settings))
    assert err.key == key
    assert problem in err.problem


# -- aliases -------------------------------------------------------------------


def test_aliases_fill_the_collection_map() -> None:
    doc = minimal()
    doc["collections"]["tasks"]["fields"]["title"]["aliases"] = ["name", "label"]
    doc["collections"]["tasks"]["fields"]["status"]["aliases"] = ["state"]
    spec = parse_schema(doc, source=SOURCE).collections["tasks"]
    assert spec.aliases == {"name": "title", "label": "title", "state": "status"}
    assert spec.fields["title"].aliases == ("name", "label")


@pytest.mark.parametrize(
    ("title_aliases", "status_aliases", "key", "problem"),
    [
        (["status"], [], "title.aliases[0]", "'status' is already the name of a field of tasks"),
        (["old", "title"], [], "title.aliases[1]", "'title' is already the name of a field"),
        (["old", "old"], [], "title.aliases[1]", "'old' is listed twice"),
        (["old"], ["old"], "status.aliases[0]", "'old' is already an alias of title"),
    ],
)
def test_alias_collisions(
    title_aliases: list[str], status_aliases: list[str], key: str, problem: str
) -> None:
    doc = minimal()
    doc["collections"]["tasks"]["fields"]["title"]["aliases"] = title_aliases
    doc["collections"]["tasks"]["fields"]["status"]["aliases"] = status_aliases
    err = schema_error(doc)
    assert err.key == f"collections.tasks.fields.{key}"
    assert problem in err.problem


def test_the_same_alias_in_two_collections_is_fine() -> None:
    doc = minimal()
    doc["collections"]["tasks"]["fields"]["title"]["aliases"] = ["name"]
    doc["collections"]["notes"] = copy.deepcopy(doc["collections"]["tasks"])
    schema = parse_schema(doc, source=SOURCE)
    assert all(c.aliases == {"name": "title"} for c in schema.collections.values())


def test_parsed_specs_are_the_declared_types() -> None:
    schema = parse_schema(minimal(), source=SOURCE)
    spec = schema.collections["tasks"]
    assert isinstance(spec, CollectionSpec)
    assert spec.fields["title"] == FieldSpec("title", FieldType.STRING, Policy.MERGE)
    assert spec.fields["status"].values == ("todo", "done")
    assert list(spec.fields) == ["title", "status"]  # file order is kept
