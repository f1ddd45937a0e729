"""The protos as another language's build sees them (protos/README.md): their file options,
the vendored google/rpc protos, and one include path being enough to compile them."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import google.rpc
import pytest
from google.protobuf import descriptor_pb2

from fieldsync.v1 import audit_pb2, common_pb2, sync_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
MODULES = {"common": common_pb2, "sync": sync_pb2, "audit": audit_pb2}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_file_names_its_code_for_java_go_csharp_swift_and_objc(name: str) -> None:
    options = MODULES[name].DESCRIPTOR.GetOptions()
    assert isinstance(options, descriptor_pb2.FileOptions)
    assert options.java_package == "com.fieldsync.v1"
    assert options.java_multiple_files is True
    assert options.java_outer_classname == f"{name.capitalize()}Proto"
    assert options.go_package == "github.com/fieldsync/fieldsync/gen/go/fieldsync/v1;fieldsyncv1"
    assert options.csharp_namespace == "FieldSync.V1"
    assert options.swift_prefix == "FS"
    assert options.objc_class_prefix == "FSX"
    # The wire names do not move with them.
    assert MODULES[name].DESCRIPTOR.package == "fieldsync.v1"


@pytest.mark.parametrize("name", ["status.proto", "error_details.proto"])
def test_the_vendored_google_rpc_protos_are_the_pinned_packages_own(name: str) -> None:
    installed = Path(google.rpc.__path__[0]) / name
    assert (PROTOS / "google" / "rpc" / name).read_bytes() == installed.read_bytes()
    readme = (PROTOS / "README.md").read_text(encoding="utf-8")
    assert f"googleapis-common-protos {metadata.version('googleapis-common-protos')}" in readme
    assert "Apache License" in (PROTOS / "google" / "rpc" / "LICENSE").read_text(encoding="utf-8")


def test_protos_compile_with_no_include_path_but_their_own(tmp_path: Path) -> None:
    # The well-known types come with every protoc (grpc_tools bundles them too).
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(PROTOS),
            f"--descriptor_set_out={tmp_path / 'set.pb'}",
            "--include_imports",
            *(str(p) for p in sorted((PROTOS / "fieldsync" / "v1").glob("*.proto"))),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    files = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "set.pb").read_bytes())
    names = {f.name for f in files.file}
    assert {"fieldsync/v1/sync.proto", "google/rpc/status.proto"} <= names
