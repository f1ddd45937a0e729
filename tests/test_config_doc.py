"""docs/configuration.md is what scripts/gen_config_doc.py makes of the configuration
dataclasses, and those dataclasses document every variable their code reads."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import audit_service.config
import fieldsync.auth
import sync_service.config
from audit_service.config import AuditConfig
from fieldsync.config_doc import Setting, help_epilog, settings_of, show_default
from sync_service.config import SyncConfig

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
_NAME = re.compile(r"FIELDSYNC_[A-Z0-9_]+")


def test_the_configuration_reference_is_up_to_date() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_config_doc.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # The message says how to regenerate it (a field was added or its docstring changed).
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""


def type_of(setting: Setting) -> type:
    """The dataclass that declares a nested setting (auth.secret -> AuthConfig)."""
    for cls in (SyncConfig, AuditConfig):
        for name, nested in _nested_classes(cls):
            if setting.field.startswith(f"{name}.") and nested.__name__ == setting.owner:
                return nested
    raise AssertionError(setting)


def _nested_classes(cls: type) -> list[tuple[str, type]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        for arg in (hints[f.name], *typing.get_args(hints[f.name])):
            if isinstance(arg, type) and dataclasses.is_dataclass(arg):
                out.append((f.name, arg))
    return out


def test_every_variable_the_configuration_code_reads_is_documented_with_its_default() -> None:
    documented = {
        s.variable
        for cls in (SyncConfig, AuditConfig)
        for s in settings_of(cls)
        if s.variable is not None
    }
    # The modules of the service configs and of every dataclass nested in them (an
    # added TLS or limits class in a module of its own is scanned too).
    modules = {sync_service.config, audit_service.config, fieldsync.auth}
    modules |= {
        sys.modules[type_of(s).__module__]
        for cls in (SyncConfig, AuditConfig)
        for s in settings_of(cls)
        if "." in s.field
    }
    for module in modules:
        source = Path(module.__file__ or "").read_text(encoding="utf-8")
        read = {n for n in _NAME.findall(source) if not n.endswith("_")}  # not FIELDSYNC_JWT_*
        # A field whose docstring does not start with `FIELDSYNC_NAME:` is missing here.
        assert read <= documented, f"{module.__name__}: not documented: {read - documented}"
    text = DOC.read_text(encoding="utf-8")
    for variable in documented:
        assert f"| `{variable}` |" in text


def test_defaults_are_shown_as_a_user_types_them() -> None:
    assert show_default(None) == "—"
    assert show_default(True) == "1"
    assert show_default(10.0) == "10"
    assert show_default(32 * 1024 * 1024) == "33554432 (32 MiB)"
    assert show_default(SyncConfig.schema_path) == "sync_service/data/schema.yaml"
    rows = {s.variable: s.default for s in settings_of(SyncConfig)}
    assert rows["FIELDSYNC_SYNC_DB"] == "sqlite:///fieldsync-sync.db"
    assert rows["FIELDSYNC_AUDIT_RELAY"] == "1"
    assert rows["FIELDSYNC_JWT_AUDIENCE"] == "fieldsync"


def test_a_variable_two_fields_read_is_listed_once_with_both_meanings() -> None:
    epilog = help_epilog(SyncConfig)
    assert epilog.count("FIELDSYNC_JWT_SECRET (default —)") == 1
    secret = epilog.split("FIELDSYNC_JWT_SECRET (default —)", 1)[1].split("\n  FIELDSYNC_", 1)[0]
    assert "a shared secret" in secret
    assert "mints the sync service's own token" in " ".join(secret.split())
