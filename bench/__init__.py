"""Benchmarks of aem_kernels against what users write instead; run `python -m bench` (see README.md)."""

import os

# torch's profiler (the CPU peak-memory probe) logs every start and stop otherwise; set before torch loads.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")
