"""In CI a skip for want of something CI provides is a failure; elsewhere it stays a skip."""

from __future__ import annotations

import pytest

from tests.conftest import ci_must_run

pytest_plugins = ["pytester"]

BODY = """
import pytest

def test_needs_shared():
    pytest.skip("../shared/realdata not present")

def test_needs_gpu():
    pytest.skip("no CUDA device")
"""


@pytest.mark.parametrize("ci", ["true", None])
def test_skips_of_what_ci_provides_fail_in_ci(pytester, monkeypatch, ci):
    from tests import conftest

    pytester.makeconftest(
        "from tests.conftest import pytest_runtest_makereport  # noqa: F401\\n"
        f"import sys; sys.path.insert(0, {str(conftest.__file__.rsplit('/tests/', 1)[0])!r})\\n"
    )
    pytester.makepyfile(BODY)
    if ci:
        monkeypatch.setenv("CI", ci)
    else:
        monkeypatch.delenv("CI", raising=False)
    result = pytester.runpytest_inprocess("-rs", "-p", "no:cacheprovider")
    if ci:
        result.assert_outcomes(failed=1, skipped=1)  # the GPU test (CI has none) still skips
    else:
        result.assert_outcomes(skipped=2)


def test_reasons(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert ci_must_run("PostgreSQL at x not reachable") and ci_must_run("could not import 'medpy.metric.binary'")
    assert not ci_must_run("no CUDA device")
    monkeypatch.setenv("CI", "false")
    assert not ci_must_run("../shared/data not present")
