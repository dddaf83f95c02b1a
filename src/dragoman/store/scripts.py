"""Load the Lua transition scripts as one Redis Functions library; call them with FCALL.

A script file is named ``<name>-<number of KEYS>.lua`` (BullMQ's convention) and starts with a
``--[[ ]]`` header documenting KEYS, ARGV and the output. ``--- @include "includes/x"`` lines name the
shared definitions it uses; cycles are an error.

The library (``build_library``) holds every include once, at its top level, in an order that puts
each include after those it includes and after those every script names before it, and then each
script's own text as the body of a registered function ``<name>_<tag>`` (``KEYS`` and ``ARGV`` are its
parameters). Redis runs a library's top level once, when it is loaded, so the shared ``local
function``s are made once, not on every call as with EVALSHA (where a script's whole text runs each
time): about 9 µs less per call on the server. ``<tag>`` is a digest of the library's text, so builds
with other defines (the tests' clock hook) or another version live side by side on one server.

Functions are kept by the server with its data (RDB, AOF) and replicated, so a promoted replica has
them. A server that has lost them (restarted without persistence, ``FUNCTION FLUSH``) answers
"Function not found": the call loads the library and runs once more (nothing ran the first time).

``{{name}}`` placeholders are filled from ``defines`` (constants from the settings, and the test-only
clock hook) when the library is built; a placeholder without a value is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from redis.exceptions import ResponseError

from dragoman.errors import ScriptError
from dragoman.store.pipeline import AutoPipeline, ReplicasBehind

LUA_DIR = Path(__file__).parent / "lua"
_INCLUDE = re.compile(r'^--- @include "([^"]+)"\s*$', re.MULTILINE)
_FILE = re.compile(r"^(?P<name>[a-z_]+)-(?P<keys>\d+)\.lua$")
_DEFINE = re.compile(r"\{\{(\w+)\}\}")


class ScriptLoadError(ScriptError):
    pass


@dataclasses.dataclass(frozen=True)
class ScriptSpec:
    name: str
    num_keys: int
    source: str  # the script's own text: its header and body, the include lines removed
    includes: tuple[str, ...]  # the includes it names (transitively), each after those it includes


def _include_file(root: Path, name: str, by: Path) -> Path:
    target = (root / (name + ".lua")).resolve()
    if not target.is_file():
        raise ScriptLoadError(f"{by.name}: include not found: {name}")
    return target


def include_order(path: Path, root: Path) -> list[str]:
    """The includes a file names, transitively, each after the ones it includes (first-use order)."""
    order: list[str] = []

    def visit(file: Path, stack: tuple[Path, ...]) -> None:
        for name in _INCLUDE.findall(file.read_text()):
            target = _include_file(root, name, file)
            if target in stack or target == file:
                chain = " -> ".join(p.name for p in (*stack, file, target))
                raise ScriptLoadError(f"include cycle: {chain}")
            if name not in order:
                visit(target, (*stack, file))
                order.append(name)

    visit(path.resolve(), ())
    return order


def _merge_orders(orders: list[list[str]]) -> list[str]:
    """One order of every include that keeps each script's order (a topological sort; ties by first
    appearance). Two scripts naming the same includes in opposite orders is an error."""
    seen: list[str] = []
    after: dict[str, set[str]] = {}
    for order in orders:
        for i, name in enumerate(order):
            if name not in after:
                seen.append(name)
                after[name] = set()
            after[name].update(order[:i])
    out: list[str] = []
    while len(out) < len(seen):
        ready = [n for n in seen if n not in out and after[n] <= set(out)]
        if not ready:
            raise ScriptLoadError(f"includes named in conflicting orders: {sorted(set(seen) - set(out))}")
        out.append(ready[0])
    return out


def fill_defines(source: str, defines: dict[str, Any], name: str = "script") -> str:
    def replace(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in defines:
            raise ScriptLoadError(f"{name}: no value for {{{{{key}}}}}")
        value = defines[key]
        return ("true" if value else "false") if isinstance(value, bool) else str(int(value))

    return _DEFINE.sub(replace, source)


DEFAULT_DEFINES: dict[str, Any] = {"test_clock": False, "inbox_max_len": 10_000}


def discover(root: Path = LUA_DIR) -> dict[str, ScriptSpec]:
    specs: dict[str, ScriptSpec] = {}
    for path in sorted(root.glob("*.lua")):
        m = _FILE.match(path.name)
        if not m:
            raise ScriptLoadError(f"script file name must be <name>-<numkeys>.lua: {path.name}")
        source = _INCLUDE.sub("", path.read_text())
        specs[m["name"]] = ScriptSpec(m["name"], int(m["keys"]), source, tuple(include_order(path, root)))
    return specs


@dataclasses.dataclass(frozen=True)
class Library:
    name: str  # "dragoman_<tag>"
    source: str  # the text FUNCTION LOAD takes
    specs: dict[str, ScriptSpec]
    functions: dict[str, str]  # script name -> registered function name


def build_library(root: Path = LUA_DIR, defines: dict[str, Any] | None = None) -> Library:
    specs = discover(root)
    includes = _merge_orders([list(spec.includes) for spec in specs.values()])
    values = DEFAULT_DEFINES | (defines or {})
    shared = fill_defines("".join(
        f"--- @begin {name}\n{_INCLUDE.sub('', (root / (name + '.lua')).read_text())}\n--- @end {name}\n"
        for name in includes), values, root.name)
    bodies = {name: fill_defines(spec.source, values, name) for name, spec in specs.items()}
    tag = hashlib.sha1((shared + "".join(bodies.values())).encode()).hexdigest()[:12]
    library, functions = f"dragoman_{tag}", {name: f"{name}_{tag}" for name in specs}
    # ``rcall`` (redis.call) is bound as each function starts: the top level, run at load, has none
    source = f"#!lua name={library}\nlocal rcall\n{shared}\n" + "".join(
        f"redis.register_function('{functions[name]}', function(KEYS, ARGV)\nrcall = redis.call\n"
        f"{body}\nend)\n" for name, body in bodies.items())
    return Library(library, source, specs, functions)


def function_missing(exc: ResponseError) -> bool:
    return "function not found" in str(exc).lower()


class Scripts:
    """The transition scripts of one client, as one library. ``await scripts.call(name, keys, args)``.

    With a ``pipeline`` (``store/pipeline.py``) calls go through it: the calls of one loop turn share
    a write, and it adds the WAIT for ``replicas``. Without one (a Cluster client) each call is its
    own FCALL; ``replicas`` then adds a WAIT to each call."""

    def __init__(self, client: Any, root: Path = LUA_DIR, defines: dict[str, Any] | None = None, *,
                 pipeline: AutoPipeline | None = None, replicas: int = 0, replica_wait_ms: int = 1000) -> None:
        self.library = build_library(root, defines)
        self.specs = self.library.specs
        self.client = client
        self.pipeline = pipeline
        self.replicas = replicas
        self.replica_wait_ms = replica_wait_ms

    async def call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run a script. With replicas required, the call returns only once that many replicas have
        its writes, and raises ``ReplicasBehind`` (a connection error: the caller's retry makes it
        again, retry-safe) when they do not within ``replica_wait_ms``."""
        command = self.command(name, keys, args)
        try:
            return await self._run(name, command)
        except ResponseError as exc:
            if not function_missing(exc):
                raise
        await self.load_all(self.client)  # a new or flushed server: nothing ran; load and call again
        return await self._run(name, command)

    def command(self, name: str, keys: list[str], args: list[Any]) -> tuple[Any, ...]:
        """The FCALL of a script (its key count checked)."""
        spec = self.specs[name]
        if len(keys) != spec.num_keys:
            raise ScriptError(f"{name} takes {spec.num_keys} keys, got {len(keys)}")
        return ("FCALL", self.library.functions[name], len(keys), *keys, *args)

    def _run(self, name: str, command: tuple[Any, ...]) -> Awaitable[Any]:
        """The reply to await: through the pipeline, its future (no coroutine frame of its own
        between the caller and the reply, on the path of every script call)."""
        if self.pipeline is not None:
            return self.pipeline.execute(*command)
        if self.replicas <= 0:
            return self.client.execute_command(*command)  # type: ignore[no-any-return]
        return self._run_waited(name, command)

    async def _run_waited(self, name: str, command: tuple[Any, ...]) -> Any:
        pipe = self.client.pipeline(transaction=False)
        pipe.execute_command(*command)
        pipe.execute_command("WAIT", self.replicas, self.replica_wait_ms)
        reply, acked = await pipe.execute()
        if int(acked) < self.replicas:
            raise ReplicasBehind(f"{name}: {acked} of {self.replicas} replicas acknowledged within "
                                 f"{self.replica_wait_ms} ms")
        return reply

    async def load_all(self, client: Any) -> None:
        """Load the library (on a Cluster client: on every primary). Readiness checks call it, so
        first calls find it there; loading it again is harmless."""
        try:
            await client.function_load(self.library.source, replace=True)
        except ResponseError as exc:
            raise ScriptLoadError(f"{self.library.name}: the server refused the library: {exc}") from exc
