"""Generate the Python stubs of protos/ into fieldsync/v1 (the one codegen step).

    python scripts/gen_protos.py          write the stubs
    python scripts/gen_protos.py --check  exit 1 when the stubs on disk are stale

Generated files are never edited by hand and never committed: `make install`
runs this. Typed stubs (.pyi) come from mypy-protobuf's plugins.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_PACKAGE = Path("fieldsync") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _include_dirs() -> list[Path]:
    import grpc_tools

    # google/rpc/status.proto is vendored in protos/ (protos/README.md); the generated
    # modules import its Python module from googleapis-common-protos at run time.
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    return [PROTO_ROOT, well_known]


def _plugin(name: str) -> Path:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise SystemExit(f"{name} not found beside {sys.executable}: install mypy-protobuf")
    return path


def generate(out_root: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.glob("fieldsync/v1/*.proto"))
    args = [
        "grpc_tools.protoc",
        *(f"-I{d}" for d in _include_dirs()),
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ]
    rc = subprocess.run([sys.executable, "-m", *args], cwd=PROTO_ROOT, check=False).returncode
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    return sorted(
        p for p in (out_root / OUT_PACKAGE).iterdir() if p.name.endswith(GENERATED_SUFFIXES)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the stubs are stale")
    ns = parser.parse_args()
    target = ROOT / OUT_PACKAGE
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        if ns.check:
            stale = [
                f.name
                for f in fresh
                if not (target / f.name).exists() or not filecmp.cmp(f, target / f.name, False)
            ]
            extra = sorted(
                p.name
                for p in target.iterdir()
                if p.name.endswith(GENERATED_SUFFIXES) and p.name not in {f.name for f in fresh}
            )
            if stale or extra:
                print(f"stale generated stubs: {stale + extra}; run `make gen`", file=sys.stderr)
                return 1
            print(f"{len(fresh)} generated stubs are up to date")
            return 0
        for f in fresh:
            shutil.copyfile(f, target / f.name)
        print(f"generated {len(fresh)} files into {OUT_PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
