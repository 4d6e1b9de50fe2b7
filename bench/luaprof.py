"""Time per Lua line of the spend-path Functions, measured inside a real Redis.

Callgrind says how many instructions Redis spends per call, and in which C functions,
but not which line of the Lua script made it spend them. This builds a Redis of its own
from a Redis 7 source tree with one change to `src/script_lua.c`: while a script runs, a
Lua count hook fires before every VM instruction and adds the CPU cycles (rdtsc) since
the previous one to that instruction's line, so a line that calls `redis.call`,
`cmsgpack.pack` or `string.format` is charged what the call cost. Only lines of the
Function library are counted; the totals are written at exit. The hook makes every call
many times slower: compare lines with each other, not with a normal Redis.

    python bench/luaprof.py --redis-src DIR [--calls 2000] [--commit]

DIR: an unpacked Redis 7 source tree (on Debian, with deb-src enabled:
`apt-get source redis`). The build goes to a temp directory; DIR is not changed.
Prints the Function library's lines that cost most, per Reserve (or per Reserve+Commit
pair with --commit), with the share of the script's time and VM instructions per call.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import redis.asyncio as aioredis

from quotagate.catalog import load as load_catalog
from quotagate.clock import SystemClock
from quotagate.ledger.model import Allowance, Charge, Subject
from quotagate.ledger.scripts import library
from quotagate.ledger.store import Ledger

M = "message_tokens"

HOOK = r"""
#include <x86intrin.h>
#define QGPROF_LINES 65536
static unsigned long long qgprof_cycles[QGPROF_LINES], qgprof_count[QGPROF_LINES];
static unsigned long long qgprof_since = 0;
static int qgprof_line = 0, qgprof_state = -1;
static void qgprofWrite(void) {
    FILE *f = fopen(getenv("QG_LUAPROF"), "w");
    if (!f) return;
    for (int i = 1; i < QGPROF_LINES; i++)
        if (qgprof_count[i]) fprintf(f, "%d %llu %llu\n", i, qgprof_count[i], qgprof_cycles[i]);
    fclose(f);
}
static void qgprofHook(lua_State *lua, lua_Debug *ar) {
    unsigned long long t = __rdtsc();
    if (qgprof_since && qgprof_line > 0 && qgprof_line < QGPROF_LINES) {
        qgprof_cycles[qgprof_line] += t - qgprof_since;
        qgprof_count[qgprof_line] += 1;
    }
    lua_getinfo(lua, "Sl", ar);
    qgprof_line = strcmp(ar->source, "@user_function") == 0 ? ar->currentline : 0;
    qgprof_since = __rdtsc();
}
"""
CALL = "\nvoid luaCallFunction("
ARM_BEFORE = "    if (server.busy_reply_threshold > 0 && !debug_enabled) {"
ARM = """    if (qgprof_state < 0) {
        qgprof_state = getenv("QG_LUAPROF") != NULL;
        if (qgprof_state) atexit(qgprofWrite);
    }
    if (qgprof_state) {
        qgprof_since = 0;
        lua_sethook(lua, qgprofHook, LUA_MASKCOUNT, 1);
        delhook = 1;
    } else if (server.busy_reply_threshold > 0 && !debug_enabled) {"""


def build(src: Path, into: Path) -> Path:
    tree = into / "redis"
    shutil.copytree(src, tree, symlinks=True)
    c = tree / "src" / "script_lua.c"
    text = c.read_text()
    if CALL not in text or ARM_BEFORE not in text:
        sys.exit(f"{c}: not a Redis 7 source this script knows how to patch")
    text = text.replace(CALL, HOOK + CALL, 1).replace(ARM_BEFORE, ARM, 1)
    c.write_text(text)
    subprocess.run(["make", f"-j{os.cpu_count() or 2}", "MALLOC=libc", "redis-server"],
                   cwd=tree, check=True, stdout=subprocess.DEVNULL)
    return tree / "src" / "redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def workload(port: int, calls: int, commit: bool) -> None:
    """The benchmark's shape: 20 orgs of 2 teams and 5 seats, a Reserve of 500-4,000
    tokens for a random seat, then (--commit) a Commit of 80 % of it; 50 in flight."""
    r = aioredis.Redis(port=port)
    for _ in range(200):
        try:
            await r.ping()
            break
        except OSError:
            await asyncio.sleep(0.05)
    ledger = Ledger(r, load_catalog(None).catalog, SystemClock())
    await ledger.upsert_plan("bench", [Allowance(M, 2**40)])
    for o in range(20):
        org = f"org-{o}"
        await ledger.upsert_org(org, "bench", seats=10)
        for t in range(2):
            await ledger.upsert_team(org, f"{org}-t{t}", 5)
            for s in range(5):
                await ledger.upsert_seat(org, f"{org}-t{t}-s{s}", f"{org}-t{t}")
    rng = random.Random(7)
    calls_ = []
    for i in range(calls):
        o, t, s = rng.randrange(20), rng.randrange(2), rng.randrange(5)
        calls_.append((Subject(f"org-{o}", f"org-{o}-t{t}", f"org-{o}-t{t}-s{s}"),
                       rng.randint(500, 4_000), f"k{i}"))
    for k in range(0, calls, 50):
        batch = calls_[k:k + 50]
        holds = await asyncio.gather(*(ledger.reserve(s, [Charge(M, a)], idempotency_key=key)
                                       for s, a, key in batch))
        if commit:
            await asyncio.gather(*(ledger.commit(h.reservation_id, [Charge(M, a * 4 // 5)])
                                   for h, (_, a, _) in zip(holds, batch, strict=True)))
    try:
        await r.execute_command("SHUTDOWN", "NOSAVE")
    except (ConnectionError, aioredis.ConnectionError):
        pass


def report(counts: Path, calls: int, top: int) -> None:
    _, lib = library(load_catalog(None).catalog.quiet_meters)
    lines = lib.split("\n")
    rows = []
    for raw in counts.read_text().splitlines():
        line, n, cycles = map(int, raw.split())
        rows.append((cycles, n, line))
    total = sum(c for c, _, _ in rows)
    vm = sum(n for _, n, _ in rows)
    print(f"per call: {total / calls:,.0f} cycles in the script, {vm / calls:,.0f} VM "
          f"instructions (with the hook's own cost excluded)")
    calls_line = sum(c for c, _, ln in rows if "redis.call(" in lines[ln - 1])
    print(f"lines calling redis.call: {100 * calls_line / total:.1f} % of the script's time")
    print(f"{'cycles/call':>12} {'share':>6} {'instr':>6}  line")
    for cycles, n, ln in sorted(rows, reverse=True)[:top]:
        text = lines[ln - 1].strip() if 0 < ln <= len(lines) else "?"
        print(f"{cycles / calls:12,.0f} {100 * cycles / total:5.1f}% {n / calls:6.1f}  "
              f"{ln:5d} {text[:90]}")


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--redis-src", type=Path, required=True)
    a.add_argument("--calls", type=int, default=2000)
    a.add_argument("--commit", action="store_true", help="profile Reserve+Commit pairs")
    a.add_argument("--top", type=int, default=40)
    args = a.parse_args()
    with tempfile.TemporaryDirectory(prefix="qg-luaprof-") as tmp:
        binary = build(args.redis_src, Path(tmp))
        out, port = Path(tmp) / "lines.txt", free_port()
        proc = subprocess.Popen([str(binary), "--port", str(port), "--dir", tmp, "--save", "",
                                 "--appendonly", "yes"], stdout=subprocess.DEVNULL,
                                env={**os.environ, "QG_LUAPROF": str(out)})
        try:
            asyncio.run(workload(port, args.calls, args.commit))
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        report(out, args.calls, args.top)


if __name__ == "__main__":
    main()
