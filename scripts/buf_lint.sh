#!/usr/bin/env bash
# `make proto-lint`: buf lint (STANDARD) on protos/, with buf from the npm registry.
# The vendored google/rpc protos (protos/google/) are a dependency module in a
# scratch workspace, not linted: they are Google's, kept byte for byte.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF_VERSION=1.75.0
if [ ! -x .buf/node_modules/.bin/buf ]; then
  mkdir -p .buf
  (cd .buf && npm install --silent --no-audit --no-fund "@bufbuild/buf@${BUF_VERSION}" >/dev/null)
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/protos" "$work/deps/google"
cp -r protos/fieldsync "$work/protos/"
cp -r protos/google/rpc "$work/deps/google/"
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
