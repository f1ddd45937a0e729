#!/usr/bin/env bash
# `make proto-lint`: buf lint (STANDARD) on protos/, with buf from the npm registry.
# google/rpc/status.proto comes from the installed googleapis-common-protos,
# assembled beside our protos in a scratch workspace (buf has no network here).
set -euo pipefail
cd "$(dirname "$0")/.."
BUF_VERSION=1.75.0
if [ ! -x .buf/node_modules/.bin/buf ]; then
  mkdir -p .buf
  (cd .buf && npm install --silent --no-audit --no-fund "@bufbuild/buf@${BUF_VERSION}" >/dev/null)
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r protos "$work/protos"
googleapis=$(.venv/bin/python -c 'import google.rpc, pathlib; print(pathlib.Path(google.rpc.__path__[0]).parent.parent)')
mkdir -p "$work/deps/google/rpc"
cp "$googleapis/google/rpc/status.proto" "$work/deps/google/rpc/"
cat > "$work/buf.yaml" <<'YAML'
version: v2
modules:
  - path: protos
    lint:
      use: [STANDARD]
  - path: deps
    lint:
      use: []
YAML
cd "$work"
"$OLDPWD/.buf/node_modules/.bin/buf" lint protos
echo "buf lint (STANDARD): clean"
