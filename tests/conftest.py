import os

from hypothesis import HealthCheck, settings

pytest_plugins = ["keeplink.testing.pytest_plugin"]

# No per-example deadline: CI machines are shared and noisy, and speed goals live in
# benchmarks. On CI, print the blob that reproduces a failure.
settings.register_profile(
    "keeplink",
    deadline=None,
    print_blob=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("keeplink")

from linkfixtures import make_link, proxy, sim  # noqa: E402,F401  (fixtures for every test)
