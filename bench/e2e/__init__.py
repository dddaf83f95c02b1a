"""Dragoman end to end, side by side with job-queue peers doing the same no-op job on the same Redis.

Commands (from the repository root, project venv)::

    .venv/bin/python -m bench.e2e                 # full: Dragoman, BullMQ, arq (10 ms and default), Celery, SAQ,
                                                  #   serve --workers 1 and 2, and a py-spy profile round;
                                                  #   3 alternating rounds, ~7 minutes
    .venv/bin/python -m bench.e2e --quick         # Dragoman, BullMQ, arq 10 ms; 1 round, under a minute once
                                                  #   the peers are installed (first install ~30 s)
    .venv/bin/python -m bench.e2e --json out.json --markdown out.md
    .venv/bin/python -m bench.e2e --profile       # (quick) + one Dragoman round with py-spy on the
                                                  #   scheduler: its CPU per job by component, task, function
    .venv/bin/python -m bench.e2e --systems dragoman,bullmq --rounds 5 --window 10
    .venv/bin/python -m bench.peers.install [arq celery saq bullmq pyspy]   # only the bench-only installs

``make bench`` and ``make bench-quick`` run this through ``python -m bench`` (``bench/__main__.py``),
with the other sections of docs/benchmarks.md. From Python: ``run_comparison("full"|"quick",
**profile_overrides) -> dict``, then ``report.summary(res)`` for the text table or
``report.markdown(res)`` for the page sections.

Modules: ``runner`` (profiles, systems, alternating rounds, targets), ``systems`` (one round of
Dragoman or of a peer), ``meter`` (CPU, Redis commandstats, per-job figures, medians, the limit),
``procs`` (child processes, /proc readings), ``pyspy`` (the scheduler's profile), ``facts``
(machine, versions, commit), ``report`` (text and Markdown), ``nodes`` / ``sessions`` (Dragoman's
load generators), ``durability`` (the same closed loop on a Sentinel set, WAIT for 0 vs 1 replica).

What one run does: starts one embedded Valkey (``dragoman.embedded.EmbeddedServer``); installs
the peers if missing into bench-only folders (``.bench/venv-{arq,celery,saq}``, ``.bench/node``;
a peer that cannot install is skipped with the reason, never failing the run); then for each
round, for each system in turn (FLUSHALL before each):

* **Dragoman**: ``dragoman serve --redis-url URL --port P`` as its own process, default settings
  (``--workers N`` for the scaling rows: CPU summed over the process group);
  ``bench.e2e.nodes`` (32 node WebSockets shaped like the existing worker, max_concurrency 4,
  answering each ``job_assign`` at once) and ``bench.e2e.sessions`` (100 sessions, one 256 ms Opus
  Plan A ``audio_chunk`` with ``is_final`` per utterance, waiting for the ``translation_result``)
  as two more processes speaking the wire protocol. A job = one utterance: chunk -> scheduler cuts
  and dispatches -> ``job_assign`` -> ``job_result`` -> ``translation_result`` in the session's
  hands. (100 sessions and 32 nodes because the scheduler's defaults allow a session 50 chunks/s
  and a node 200 messages/s: fewer would cap the total below the peers' rates.) Each Dragoman
  round starts with an idle window (all sockets open, no load): the scheduler's fixed cost.
* **peers** (``bench/peers/``): a worker process and a submitter process each; submit a no-op job,
  the worker runs it, the submitter holds its result (BullMQ ``waitUntilFinished`` via
  QueueEvents, arq ``Job.result``, Celery ``AsyncResult.get`` on the Redis backend, SAQ
  ``Queue.apply``).

Every submitter runs the same two phases (``bench/peers/loadgen.py``): closed loop, 50 jobs in
flight, completions counted over a window after a warm-up; open loop, 200 jobs/s started on a
schedule, latency submit -> result of the jobs started in the window (p50/p99), stragglers waited
for and counted as lost. At each window edge the runner reads /proc CPU of every process of the
system (scheduler or worker, the load programs, valkey-server), the machine's busy time (what
else ran: "other CPU") and Redis INFO commandstats, and reports per job: CPU µs by process
(user/sys split and context switches for the scheduler), Redis calls by command, script
execution µs. Figures are medians over the rounds; the issue's targets are checked and printed
(never asserted). Child processes run in their own process groups and are killed as groups.
"""

from bench.e2e.report import markdown, summary
from bench.e2e.runner import FULL, QUICK, Profile, run_comparison

__all__ = ["FULL", "QUICK", "Profile", "markdown", "run_comparison", "summary"]
