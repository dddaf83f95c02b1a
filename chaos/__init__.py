"""The fault suite: real processes (Valkey, scheduler processes, ``dragoman node`` agents, speaking
clients) under a steady load, one fault at a time, and a page that says what every utterance ended in.

``python -m chaos`` (``make chaos``) runs it and writes docs/reliability.md; tests/e2e/test_chaos_quick.py
runs a short version in CI.

- ``topology.py``  the processes and the two proxies; ``proxy.py`` the proxies (failover, TCP cut)
- ``load.py``      the speakers and the ledger of outcomes
- ``faults.py``    one injector per fault; ``fuzz.py`` and ``forge.py`` the hostile peers
- ``audit.py``     slot and job checks against Redis after quiescence
- ``run.py``       one fault run, start to audit; ``report.py`` the table and the page
"""
