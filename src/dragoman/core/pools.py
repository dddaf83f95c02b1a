"""Which pools a node serves, and which pool a job needs. Pure.

A pool is a set of nodes that can run one kind of job:
- ``src>tgt``: one translation direction (a node registered for the directed pair src -> tgt);
- ``a<>b``: two-way auto mode (the existing web client's default), for nodes that serve both
  ``a -> b`` and ``b -> a``; the node detects which language is spoken. ``a`` < ``b`` alphabetically.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Pair = tuple[str, str]


def directed_pool(src: str, tgt: str) -> str:
    return f"{src}>{tgt}"


def two_way_pool(a: str, b: str) -> str:
    lo, hi = sorted((a, b))
    return f"{lo}<>{hi}"


def pairs_from_languages(asr_languages: Sequence[str], semantic_languages: Sequence[str]) -> list[Pair]:
    """PROTOCOL.md default when a node sends no language_pairs: every ASR source x every target,
    self-pairs included."""
    return [(s, t) for s in asr_languages for t in semantic_languages]


def pools_for_pairs(pairs: Iterable[Pair]) -> list[str]:
    """Every pool a node with these directed pairs belongs to."""
    directed = {(s, t) for s, t in pairs}
    pools = {directed_pool(s, t) for s, t in directed}
    pools |= {two_way_pool(s, t) for s, t in directed if s != t and (t, s) in directed}
    return sorted(pools)


def pool_for_job(src_lang: str, tgt_lang: str, lang_a: str | None = None, lang_b: str | None = None) -> str:
    """The pool a job needs. ``src_lang == "auto"`` with ``lang_a``/``lang_b`` is two-way mode."""
    if src_lang == "auto":
        if not lang_a or not lang_b:
            raise ValueError("src_lang 'auto' needs lang_a and lang_b")
        return two_way_pool(lang_a, lang_b)
    return directed_pool(src_lang, tgt_lang)
