// Generate the TypeScript stubs of protos/fieldsync/v1 (and the google/rpc protos vendored in
// protos/google/rpc) into src/gen with buf and protoc-gen-es (the one codegen step of this package).
//
//     node scripts/gen.mjs          write the stubs
//     node scripts/gen.mjs --check  exit 1 when the stubs on disk (committed) are stale,
//                                   or when a vendored proto differs from its pinned source
//
// buf needs one workspace holding every import, so the repository's protos and the vendored
// ones (protos/google/rpc, from the PyPI package googleapis-common-protos pinned in
// constraints.txt) are copied into a scratch folder, as two modules, and generated from there. The
// google/protobuf well-known types are not generated: @bufbuild/protobuf/wkt ships them.
import { execFileSync } from "node:child_process";
import { cpSync, existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(dirname(fileURLToPath(import.meta.url)));
const repo = join(here, "..", "..");
const out = join(here, "src", "gen");
const bin = (name) => join(here, "node_modules", ".bin", name);

function listFiles(dir) {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => relative(dir, join(e.parentPath ?? e.path, e.name)))
    .sort();
}

function generate(target) {
  const work = mkdtempSync(join(tmpdir(), "fieldsync-ts-gen-"));
  try {
    cpSync(join(repo, "protos", "fieldsync"), join(work, "protos", "fieldsync"), { recursive: true });
    cpSync(join(repo, "protos", "google"), join(work, "deps", "google"), {
      recursive: true,
      filter: (src) => !src.endsWith("LICENSE"),
    });
    writeFileSync(
      join(work, "buf.yaml"),
      "version: v2\nmodules:\n  - path: protos\n  - path: deps\n",
    );
    writeFileSync(
      join(work, "buf.gen.yaml"),
      [
        "version: v2",
        "clean: true",
        "plugins:",
        `  - local: ${JSON.stringify(bin("protoc-gen-es"))}`,
        `    out: ${JSON.stringify(target)}`,
        "    opt: [target=ts, import_extension=js]",
        "",
      ].join("\n"),
    );
    execFileSync(bin("buf"), ["generate"], { cwd: work, stdio: "inherit" });
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

// The vendored protos must be byte for byte those of the pinned googleapis-common-protos
// (when the Python environment is there to compare with).
function vendoredDrift() {
  const site = join(repo, ".venv", "lib");
  if (!existsSync(site)) return [];
  const py = readdirSync(site).find((d) => d.startsWith("python"));
  const rpc = py && join(site, py, "site-packages", "google", "rpc");
  if (!rpc || !existsSync(rpc)) return [];
  const vendored = join(repo, "protos", "google", "rpc");
  return listFiles(vendored)
    .filter((f) => f.endsWith(".proto"))
    .filter((f) => readFileSync(join(rpc, f), "utf8") !== readFileSync(join(vendored, f), "utf8"));
}

if (process.argv.includes("--check")) {
  const fresh = mkdtempSync(join(tmpdir(), "fieldsync-ts-fresh-"));
  try {
    generate(fresh);
    const want = listFiles(fresh);
    const have = listFiles(out);
    const stale = [...new Set([...want, ...have])].filter(
      (f) =>
        !want.includes(f) ||
        !have.includes(f) ||
        readFileSync(join(fresh, f), "utf8") !== readFileSync(join(out, f), "utf8"),
    );
    const drift = vendoredDrift();
    if (stale.length || drift.length) {
      if (stale.length) console.error(`stale TypeScript stubs in src/gen: ${stale.join(", ")}; run \`npm run gen\` in clients/typescript`);
      if (drift.length) console.error(`vendored protos differ from googleapis-common-protos: ${drift.join(", ")}`);
      process.exit(1);
    }
    console.log(`TypeScript stubs up to date (${want.length} files)`);
  } finally {
    rmSync(fresh, { recursive: true, force: true });
  }
} else {
  generate(out);
  console.log(`generated ${listFiles(out).length} files into src/gen`);
}
