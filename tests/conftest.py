pytest_plugins = ["keeplink.testing.pytest_plugin"]

from linkfixtures import make_link, proxy, sim  # noqa: E402,F401  (fixtures for every test)
