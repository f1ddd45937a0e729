"""docs/configuration.md is what scripts/gen_config_doc.py makes of the configuration
dataclasses, and those dataclasses document every variable their code reads."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import audit_service.config
import fieldsync.auth
import sync_service.config
from audit_service.config import AuditConfig
from fieldsync.config_doc import help_epilog, settings_of, show_default
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


def test_every_variable_the_configuration_code_reads_is_documented_with_its_default() -> None:
    documented = {
        s.variable
        for cls in (SyncConfig, AuditConfig)
        for s in settings_of(cls)
        if s.variable is not None
    }
    for module in (sync_service.config, audit_service.config, fieldsync.auth):
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
