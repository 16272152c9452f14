"""Test configuration: 8 host CPU devices for the multi-device tests, hypothesis profiles."""

import os

# Must be set before jax is imported anywhere in the test process.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

from hypothesis import HealthCheck, settings  # noqa: E402

# CI runs a fixed, reproducible set of examples; HYPOTHESIS_PROFILE=explore draws new ones.
settings.register_profile(
    "default",
    max_examples=300,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("explore", parent=settings.get_profile("default"), derandomize=False,
                          max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
