"""Load the Lua transition scripts: resolve includes, register each once with the client.

A script file is named ``<name>-<number of KEYS>.lua`` (BullMQ's convention) and starts with a
``--[[ ]]`` header documenting KEYS, ARGV and the output. ``--- @include "includes/x"`` lines are
replaced by that file's text; each include is inlined once per script, and cycles are an error; of
the included definitions only those the script uses are kept (``shake``: Redis runs a script's whole
text on every call).
Registration uses redis-py's ``register_script``: EVALSHA, and on NOSCRIPT (after ``SCRIPT FLUSH`` or
a server restart) it loads the script again and retries.

``{{name}}`` placeholders are filled from ``defines`` (constants from the settings, and the test-only
clock hook) when the scripts are loaded; a placeholder without a value is an error.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from redis.exceptions import NoScriptError

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
    source: str


def resolve_includes(path: Path, root: Path) -> str:
    """The script's text with every include inlined once, in first-use order."""
    seen: set[Path] = set()

    def expand(file: Path, stack: tuple[Path, ...]) -> str:
        def replace(match: re.Match[str]) -> str:
            target = (root / (match.group(1) + ".lua")).resolve()
            if target in stack or target == file:
                chain = " -> ".join(p.name for p in (*stack, file, target))
                raise ScriptLoadError(f"include cycle: {chain}")
            if target in seen:
                return f"-- (included already: {match.group(1)})"
            if not target.is_file():
                raise ScriptLoadError(f"{file.name}: include not found: {match.group(1)}")
            seen.add(target)
            name = match.group(1)
            return f"--- @begin {name}\n{expand(target, (*stack, file))}\n--- @end {name}"

        return _INCLUDE.sub(replace, file.read_text())

    return expand(path.resolve(), ())


_BEGIN_END = re.compile(r"^--- @(begin|end) \S+\s*$")
_DEFINES = re.compile(r"^local\s+(?:function\s+([A-Za-z_]\w*)|([A-Za-z_][\w\s,]*?)\s*=)")
_NAME = re.compile(r"[A-Za-z_]\w*")
_BLOCK_COMMENT = re.compile(r"--\[\[.*?\]\]", re.DOTALL)


def _names(code: str) -> set[str]:
    """The words of Lua code, less its block comments and whole-line comments (a comment at the end
    of a code line stays: a doubt keeps a definition)."""
    code = _BLOCK_COMMENT.sub("", code)
    return set(_NAME.findall("".join(line for line in code.splitlines(keepends=True)
                                     if not line.lstrip().startswith("--"))))


def shake(source: str) -> str:
    """Keep, of the included definitions, only those the script uses (directly or through another
    kept one), in their order; drop the includes' comments. Redis runs a script's whole text on
    every call, so every ``local function`` included costs a closure per call: all the includes
    together cost ~17 µs per call on the server, whatever the script used.

    An include's top level is a sequence of ``local function name(...)`` blocks (their bodies
    indented, ``end`` at column 0), ``local NAME = value`` lines and comments: a chunk starts at each
    column-0 ``local`` or comment line. A chunk that defines nothing is kept. Names are matched as
    words anywhere in the code (strings included, comments not), so a doubt keeps a definition."""
    body: list[tuple[int, str]] = []  # (position, text) outside every include
    chunks: list[tuple[int, list[str]]] = []  # (position, lines) of included code
    depth = 0
    in_comment = False
    current: list[str] | None = None
    for pos, line in enumerate(source.splitlines(keepends=True)):
        m = _BEGIN_END.match(line)
        if m:
            depth += 1 if m.group(1) == "begin" else -1
            current = None
            continue
        if depth == 0:
            body.append((pos, line))
            continue
        if in_comment:
            current.append(line)  # type: ignore[union-attr]
            in_comment = "]]" not in line
            continue
        if line.startswith(("local ", "--")) or current is None:
            current = [line]
            chunks.append((pos, current))
            in_comment = line.startswith("--[[") and "]]" not in line
        else:
            current.append(line)

    def is_comment(lines: list[str]) -> bool:
        return lines[0].startswith("--")

    defined: list[set[str]] = []
    for _, lines in chunks:
        m = _DEFINES.match(lines[0])
        names = {m.group(1)} if m and m.group(1) else ({n.strip() for n in m.group(2).split(",")} if m else set())
        defined.append(names)
    needed = _names("".join(text for _, text in body))
    keep = [not is_comment(lines) and not defined[i] for i, (_, lines) in enumerate(chunks)]
    for i in range(len(chunks)):
        if keep[i]:
            needed |= _names("".join(chunks[i][1]))
    changed = True
    while changed:
        changed = False
        for i, (_, lines) in enumerate(chunks):
            if not keep[i] and not is_comment(lines) and defined[i] & needed:
                keep[i] = changed = True
                needed |= _names("".join(lines))
    parts = body + [(pos, "".join(lines)) for i, (pos, lines) in enumerate(chunks) if keep[i]]
    return "".join(text for _, text in sorted(parts))


def fill_defines(source: str, defines: dict[str, Any], name: str = "script") -> str:
    def replace(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in defines:
            raise ScriptLoadError(f"{name}: no value for {{{{{key}}}}}")
        value = defines[key]
        return ("true" if value else "false") if isinstance(value, bool) else str(int(value))

    return _DEFINE.sub(replace, source)


DEFAULT_DEFINES: dict[str, Any] = {"test_clock": False, "inbox_max_len": 10_000}


def discover(root: Path = LUA_DIR, defines: dict[str, Any] | None = None) -> dict[str, ScriptSpec]:
    values = DEFAULT_DEFINES | (defines or {})
    specs: dict[str, ScriptSpec] = {}
    for path in sorted(root.glob("*.lua")):
        m = _FILE.match(path.name)
        if not m:
            raise ScriptLoadError(f"script file name must be <name>-<numkeys>.lua: {path.name}")
        source = fill_defines(shake(resolve_includes(path, root)), values, path.name)
        specs[m["name"]] = ScriptSpec(m["name"], int(m["keys"]), source)
    return specs


class Scripts:
    """The registered scripts of one client. ``await scripts.call(name, keys, args)``.

    With a ``pipeline`` (``store/pipeline.py``) calls go through it: the calls of one loop turn share
    a write, and it adds the WAIT for ``replicas``. Without one (a Cluster client) each call is its
    own EVALSHA; ``replicas`` then adds a WAIT to each call."""

    def __init__(self, client: Any, root: Path = LUA_DIR, defines: dict[str, Any] | None = None, *,
                 pipeline: AutoPipeline | None = None, replicas: int = 0, replica_wait_ms: int = 1000) -> None:
        self.specs = discover(root, defines)
        self.client = client
        self.pipeline = pipeline
        self.replicas = replicas
        self.replica_wait_ms = replica_wait_ms
        self._registered = {name: client.register_script(spec.source) for name, spec in self.specs.items()}

    async def call(self, name: str, keys: list[str], args: list[Any], linger: float = 0.0) -> Any:
        """Run a script. With replicas required, the call returns only once that many replicas have
        its writes, and raises ``ReplicasBehind`` (a connection error: the caller's retry makes it
        again, retry-safe) when they do not within ``replica_wait_ms``. ``linger``: see
        ``AutoPipeline`` (ignored without it)."""
        spec = self.specs[name]
        if len(keys) != spec.num_keys:
            raise ScriptError(f"{name} takes {spec.num_keys} keys, got {len(keys)}")
        script = self._registered[name]
        if self.pipeline is not None:
            try:
                return await self.pipeline.execute("EVALSHA", script.sha, len(keys), *keys, *args, linger=linger)
            except NoScriptError:  # a new or flushed server: load it, once, and call again
                script.sha = await self.client.script_load(spec.source)
                return await self.pipeline.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        if self.replicas <= 0:
            return await script(keys=keys, args=args)
        pipe = self.client.pipeline(transaction=False)
        await script(keys=keys, args=args, client=pipe)
        pipe.execute_command("WAIT", self.replicas, self.replica_wait_ms)
        reply, acked = await pipe.execute()
        if int(acked) < self.replicas:
            raise ReplicasBehind(f"{name}: {acked} of {self.replicas} replicas acknowledged within "
                                 f"{self.replica_wait_ms} ms")
        return reply

    async def load_all(self, client: Any) -> None:
        """Load every script now (readiness checks; first calls skip the NOSCRIPT round trip)."""
        for name, script in self._registered.items():
            script.sha = await client.script_load(self.specs[name].source)
