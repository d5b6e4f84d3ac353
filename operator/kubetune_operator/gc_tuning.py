"""The operator's garbage-collector threshold, set once at start-up.

Kopf's per-event views of a body (Body, Meta, Spec, Status, Patch) are reference cycles, so the
cyclic collector is needed: it frees them once their event is handled. At CPython's default
generation-0 threshold (700 net allocations) it runs so often that bodies still being handled are
promoted to the old generation. Their growth
there triggers full collections of the whole heap, about 160 ms each with 1,000 FineTuneJobs
indexed. Under a burst of 1,000 FineTuneJobs the collector took 17 % of the operator's CPU
(3.3 of 19.3 CPU-seconds), 9 % with this threshold (gc.callbacks; docs/benchmarks.md, "Operator
scale").
"""

from __future__ import annotations

import gc
from typing import Final

# The young generation is collected every 5,000 net allocations: more than the handling of one
# watch event allocates, so what is in flight has died by then. Generations 1 and 2 keep
# CPython's ratios.
THRESHOLDS: Final = (5000, 10, 10)


def tune_gc() -> None:
    gc.set_threshold(*THRESHOLDS)
