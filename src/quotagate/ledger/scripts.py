"""The Lua scripts: loaded once from lua/*.lua (each prefixed with lib.lua) and called
through redis-py script objects, which send EVALSHA and fall back to loading the script
when Redis answers NOSCRIPT (after a restart or SCRIPT FLUSH)."""

from __future__ import annotations

from importlib import resources
from typing import Any

NAMES = ("reserve", "commit", "refund", "extend", "sweep", "topup", "balance", "configure",
         "transfer")


def source(name: str) -> str:
    lua = resources.files(__package__).joinpath("lua")
    return lua.joinpath("lib.lua").read_text("utf-8") + "\n" + \
        lua.joinpath(f"{name}.lua").read_text("utf-8")


class Scripts:
    """One registered script object per script; shareable by every request."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._by_name = {name: redis.register_script(source(name)) for name in NAMES}
        self.reserve = self._by_name["reserve"]
        self.commit = self._by_name["commit"]
        self.refund = self._by_name["refund"]
        self.extend = self._by_name["extend"]
        self.sweep = self._by_name["sweep"]
        self.topup = self._by_name["topup"]
        self.balance = self._by_name["balance"]
        self.configure = self._by_name["configure"]
        self.transfer = self._by_name["transfer"]

    async def load_all(self) -> None:
        """SCRIPT LOAD each script (health reports SERVING only once this succeeded)."""
        for script in self._by_name.values():
            script.sha = await self._redis.script_load(script.script)

    async def loaded(self) -> bool:
        shas = [s.sha for s in self._by_name.values()]
        if not all(shas):
            return False
        exists = await self._redis.script_exists(*shas)
        return bool(all(exists))
