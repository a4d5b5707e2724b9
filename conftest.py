"""Shared test set-up: hypothesis profiles and seeding.

HYPOTHESIS_PROFILE selects a profile: ``ci`` (the default; bounded so the default tier stays within minutes on
2 cores), ``dev`` (fast, for editing) or ``thorough`` (at least 500 examples per property, no deadline).
"""

import os

import torch
from hypothesis import HealthCheck, settings

# Tests measure numbers, not threads; two threads match CI's two cores and keep timings comparable.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

_SLOW_DATA = [HealthCheck.too_slow, HealthCheck.data_too_large]
# ci is derandomized: a merge gate must give the same verdict on the same code; dev and thorough explore anew.
settings.register_profile("ci", max_examples=50, deadline=None, suppress_health_check=_SLOW_DATA, print_blob=True,
                          derandomize=True)
settings.register_profile("dev", max_examples=8, deadline=None, suppress_health_check=_SLOW_DATA)
settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=_SLOW_DATA, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
