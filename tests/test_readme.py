"""Every code block of README.md runs as written, in order, beside a real `make run`.

A newcomer's path: `make run` in one terminal, the README's blocks typed into
another. This test does the same: it starts `make run` (with RUN_DIR in a
scratch folder and free ports), then runs each ```sh block in bash and each
```python block with the project's Python, in a scratch folder laid out like
a checkout (`.venv`, `.run`, `protos` link to the real ones), carrying the
shell's exported variables from block to block as a terminal would. The one
thing changed is the address: the services listen on free ports, so
`127.0.0.1:50051` / `:50052` in a block become those, and the "terminal"
starts with FIELDSYNC_SERVER / FIELDSYNC_AUDIT_ADDR set to them (a user has
the defaults). A block that cannot run here says so in the README, in a
`<!-- readme-test: not run as a block: REASON -->` line right above it.

Each block must exit 0 without a traceback, and where the README promises an
output (a comment like `# APPLIED 1`), the test checks it. At the end, Ctrl-C
stops `make run` and both services stop gracefully; its development key is
readable by its owner only.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.proc import free_port

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
SKIP = re.compile(r"<!-- readme-test: not run as a block: (.+?) -->\n\Z")
START_TIMEOUT = 120.0  # make checks its stamps, then two services migrate and start
BLOCK_TIMEOUT = 60.0


@dataclass
class Block:
    lang: str
    code: str
    line: int
    skip_reason: str | None


def readme_blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    blocks = []
    for m in BLOCK.finditer(text):
        before = text[: m.start()]
        skip = SKIP.search(before)
        blocks.append(
            Block(m.group(1), m.group(2), before.count("\n") + 1, skip.group(1) if skip else None)
        )
    return blocks


def test_every_runnable_block_is_run_and_every_skip_says_why() -> None:
    blocks = readme_blocks()
    code = [b for b in blocks if b.lang in ("sh", "python")]
    assert len(code) >= 8
    skipped = [b for b in code if b.skip_reason]
    assert len(skipped) <= 2, [b.line for b in skipped]  # make run / make test only
    assert all("make test" in b.code for b in skipped)
    # Blocks in no language are pictures (the layout), not commands; the one ts
    # block is clients/typescript/test/rpc.ts's, run (and compared) by its own tests.
    assert all(b.lang in ("sh", "python", "") for b in blocks if b.lang != "ts")
    assert sum(b.lang == "ts" for b in blocks) <= 1


class MakeRun:
    """`make run` in its own process group, its output collected as it comes."""

    def __init__(self, run_dir: Path, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.popen = subprocess.Popen(
            ["make", "--no-print-directory", "-C", str(ROOT), "run", f"RUN_DIR={run_dir}"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # Ctrl-C goes to the whole group, as in a terminal
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)
            if "Press Ctrl-C to stop both services." in line:
                self._ready.set()
        self._ready.set()

    def wait_ready(self) -> None:
        assert self._ready.wait(START_TIMEOUT), self.output()
        assert self.popen.poll() is None, f"make run exited: {self.output()}"

    def output(self) -> str:
        return "".join(self.lines[-60:])

    def ctrl_c(self) -> int:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGINT)
        try:
            return self.popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            return self.popen.wait(timeout=30)
        finally:
            self._reader.join(timeout=10)


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[tuple[MakeRun, Path, dict[str, str]]]:
    run_dir = tmp_path / "run"
    base = {k: v for k, v in os.environ.items() if not k.startswith("FIELDSYNC_")}
    base.pop("MAKEFLAGS", None)  # a `make test` around us must not leak its flags
    base.pop("MAKELEVEL", None)
    addrs = {
        "FIELDSYNC_SYNC_ADDR": f"127.0.0.1:{free_port()}",
        "FIELDSYNC_AUDIT_ADDR": f"127.0.0.1:{free_port()}",
    }
    proc = MakeRun(run_dir, {**base, **addrs})
    try:
        proc.wait_ready()
        yield proc, run_dir, {**base, **addrs}
    finally:
        proc.ctrl_c()  # make itself reports the interrupt ("make: *** ... Interrupt")
        out = proc.output()
        print(out)
        # Both services heard it and stopped gracefully.
        assert "fieldsync.sync: stopped" in out
        assert "fieldsync.audit: stopped" in out
        assert "Traceback" not in out


class Terminal:
    """The second terminal: a folder shaped like a checkout and the variables exported so far."""

    def __init__(self, folder: Path, run_dir: Path, env: dict[str, str]) -> None:
        self.cwd = folder
        folder.mkdir()
        (folder / ".venv").symlink_to(Path(sys.executable).parent.parent)
        (folder / ".run").symlink_to(run_dir)
        (folder / "protos").symlink_to(ROOT / "protos")
        self.sync_addr = env["FIELDSYNC_SYNC_ADDR"]
        self.audit_addr = env["FIELDSYNC_AUDIT_ADDR"]
        self.env = {k: v for k, v in env.items() if not k.startswith("FIELDSYNC_")}
        self.env.update(
            {
                "FIELDSYNC_SERVER": self.sync_addr,
                "FIELDSYNC_AUDIT_ADDR": self.audit_addr,
                "PYTHONUNBUFFERED": "1",
            }
        )
        self._env_file = folder.parent / "terminal.env"

    def _with_ports(self, code: str) -> str:
        return code.replace("127.0.0.1:50051", self.sync_addr).replace(
            "127.0.0.1:50052", self.audit_addr
        )

    def run(self, block: Block) -> str:
        code = self._with_ports(block.code)
        if block.lang == "python":
            argv = [sys.executable, "-c", code]
        else:
            # As typed at a prompt, but stopping at the first failing command; then the
            # exported variables go on to the next block.
            script = f"set -euo pipefail\n{code}\nenv -0 > {self._env_file}\n"
            argv = ["bash", "-c", script]
        done = subprocess.run(
            argv,
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
            check=False,
        )
        where = f"README.md line {block.line} ({block.lang}):\n{code}\n--- stdout\n{done.stdout}"
        assert done.returncode == 0, f"{where}\n--- stderr\n{done.stderr}"
        assert "Traceback" not in done.stderr, f"{where}\n--- stderr\n{done.stderr}"
        if block.lang == "sh":
            pairs = self._env_file.read_text().split("\0")
            self.env = dict(p.split("=", 1) for p in pairs if "=" in p)
        return done.stdout


def _json_lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


# What the README promises a block prints, keyed by a line of the block.
def _sdk(out: str) -> None:
    assert out.splitlines() == ["1 0 0 0"]  # applied, merged, conflicts, warnings


def _cli(out: str) -> None:
    syncs = [o for o in _json_lines(out) if "applied" in o]
    assert [(s["applied"], s["conflicts"], s["warnings"]) for s in syncs] == [(0, 1, 0), (1, 0, 0)]
    (record,) = [o for o in _json_lines(out) if "record_id" in o and "version" in o]
    assert record["record_id"] == "globex"


def _raw(out: str) -> None:
    assert out.splitlines() == ["APPLIED 1"]


def _audit(out: str) -> None:
    events = _json_lines(out)
    assert all(e["code"] != "TYPE_COERCED" for e in events)  # the examples are clean
    (pruned,) = [line for line in out.splitlines() if line.startswith("pruned ")]
    assert pruned.endswith(" from sqlite:///.run/audit.db")


def _protoc(out: str, cwd: Path) -> None:
    assert (cwd / "out" / "fieldsync" / "v1" / "sync_pb2_grpc.py").is_file()


CHECKS: dict[str, Callable[[str], None]] = {
    "report = client.sync()": _sdk,
    "fieldsync-client resolve": _cli,
    "stub.ApplyBatch(": _raw,
    "fieldsync-audit prune": _audit,
}


def test_the_readme_runs_as_written(
    tmp_path: Path, make_run: tuple[MakeRun, Path, dict[str, str]]
) -> None:
    proc, run_dir, env = make_run
    assert stat.S_IMODE((run_dir / "jwt-secret").stat().st_mode) == 0o600
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    terminal = Terminal(tmp_path / "terminal", run_dir, env)
    checked = set()
    ran = 0
    for block in readme_blocks():
        if block.lang not in ("sh", "python") or block.skip_reason:
            continue
        out = terminal.run(block)
        ran += 1
        for key, check in CHECKS.items():
            if key in block.code:
                check(out)
                checked.add(key)
        if "grpc_tools.protoc" in block.code:
            _protoc(out, terminal.cwd)
            checked.add("protoc")
    assert checked == {*CHECKS, "protoc"}
    assert ran >= 7
    # Nothing made a database where a service would not look (prune used to).
    assert not list(terminal.cwd.glob("fieldsync-audit.db*"))
    assert proc.popen.poll() is None, proc.output()
