"""Multi-worker server (`workers` > 1): worker processes share the public port; this process serves the
one control address and the one /metrics address for all of them.

Contract:
- Every worker serves the same version. A statement is fanned out to every worker with `stage_only`:
  each loads and validates, then holds the model staged. Only when every worker has staged it (or
  serves it already) does the supervisor commit it on all of them at once (one parallel round of
  loopback calls). If any worker fails, is down or staged another version, none swaps: the old version
  keeps serving everywhere and GetStatus says which worker failed and why.
- GetStatus aggregates: `serving` is the version every worker serves (while they differ, the last
  agreed version, with load_state LOADING); FAILED with the worker's error if any failed;
  `accepting_requests` only when every worker accepts; `workers` holds each worker's own status.
- A worker that dies is restarted with bounded back-off and converges: the reconcile loop re-states
  the aspired version to it and commits its staged model once it matches what the others serve.
- With port 0 the supervisor reserves a free public port itself (SO_REUSEPORT, held while it runs)
  before any worker starts; every worker binds that port.
- `stop()` drains every worker (each drains as a single server does) before it returns.
- /metrics is aggregated at scrape time from the workers' own endpoints (see docs/architecture.md).

Modules: `workers` (the worker process and its handle: spawn, ports, restarts with back-off), `rollout`
(pure functions: the workers' answers to the next step, their statuses to the aggregate), `metrics` (the
merge with its carry-over state), `servicer` (the control servicer, protos to and from the rollout's
dataclasses), `multiprocess` (the Supervisor that runs them).
"""

from tabserve_server.supervisor.multiprocess import Supervisor

__all__ = ["Supervisor"]
