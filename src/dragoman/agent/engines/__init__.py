"""Pluggable inference engines for the node agent: ``simulated`` for demos and tests, ``http`` for real nodes.

``HttpEngine`` is not imported here so that using the simulated engine never imports httpx; get it
from ``dragoman.agent.engines.http`` or through ``make_engine("http", ...)``.
"""

from dragoman.agent.engines.base import (
    Engine,
    EngineErrorCode,
    EngineJob,
    EngineResult,
    make_engine,
)
from dragoman.agent.engines.simulated import SimulatedEngine

__all__ = [
    "Engine",
    "EngineErrorCode",
    "EngineJob",
    "EngineResult",
    "SimulatedEngine",
    "make_engine",
]
