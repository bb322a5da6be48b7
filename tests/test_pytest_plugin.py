"""The leak check itself: a test that leaves a task or a timer behind fails."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


def test_a_leaked_task_or_timer_fails_the_test(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["keeplink.testing.pytest_plugin"]')
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(
        """
        import asyncio

        async def test_leaks_a_task():
            asyncio.get_running_loop().create_task(asyncio.sleep(3600), name="forgotten")

        async def test_leaks_a_timer():
            asyncio.get_running_loop().call_later(3600, lambda: None)

        async def test_leaves_a_virtual_timer(virtual_clock):
            virtual_clock.call_at(5, lambda: None)

        async def test_clean():
            task = asyncio.get_running_loop().create_task(asyncio.sleep(0))
            await task
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning")
    result.assert_outcomes(passed=4, errors=3)  # the leaks fail at teardown
    result.stdout.fnmatch_lines(["*task left running: forgotten*", "*timer left scheduled*",
                                 "*1 timer(s) on the virtual clock at*"])  # fmt: skip
