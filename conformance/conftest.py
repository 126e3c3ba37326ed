"""Conformance suite options and fixtures.

    pytest conformance/ --backend cpu                 # default: $GLM_BACKEND, else cpu
    pytest conformance/ --backend triton --dtype fp32 # --dtype repeatable or comma-separated
    pytest conformance/ --report reports/cpu.json     # also writes reports/cpu.md
    pytest conformance/ --backend ascend --emulated   # vendor adapters against CPU emulators of the
                                                      # vendor libraries' documented APIs (emulators/)

Fixtures for test modules: ``backend_name``, ``plan`` (the backend's traced dispatch plan),
``device``, ``dtype`` (parametrised from ``--dtype``: "fp32" | "bf16" | "fp16"), ``checker``
(``checker(op, case)`` -> :class:`checks.Checker`) and ``conformance_report`` (the session's
:class:`report.Recorder`; other suites may attach extras with ``add_extra``).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

import hwlayer

from .checks import DTYPES, TOLERANCES_FILE, Checker, load_tolerances
from .report import Recorder

# Value checks that read device data (HWLAYER_CHECK=1) are on in the suite: it feeds bad input on
# purpose. Serving leaves them off.
os.environ.setdefault("HWLAYER_CHECK", "1")

_CHECKERS = pytest.StashKey[list]()
_RECORDER = pytest.StashKey[Recorder]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hwlayer conformance")
    group.addoption("--backend", default=None,
                    help="backend under test (default: $GLM_BACKEND, else cpu)")
    group.addoption("--dtype", action="append", default=None,
                    help="dtype(s) to run: fp32, bf16, fp16 (repeatable or comma-separated; default all)")
    group.addoption("--report", default=None, metavar="PATH",
                    help="write a JSON report to PATH and a Markdown table next to it (.md)")
    group.addoption("--emulated", action="store_true", default=False,
                    help="run the backend's native adapters on CPU against emulators of its vendor libraries' "
                         "documented APIs (conformance/emulators); the report says 'emulated from docs, not hardware'")


def _dtypes(config: pytest.Config) -> list[str]:
    raw = config.getoption("--dtype") or list(DTYPES)
    names = [d.strip().lower() for item in raw for d in item.split(",") if d.strip()]
    unknown = [d for d in names if d not in DTYPES]
    if unknown:
        raise pytest.UsageError(f"--dtype: unknown dtype {unknown[0]!r}; expected one of {', '.join(DTYPES)}")
    return list(dict.fromkeys(names))


def _backend(config: pytest.Config) -> str:
    return (config.getoption("--backend") or os.environ.get("GLM_BACKEND") or "cpu").strip().lower()


def pytest_configure(config: pytest.Config) -> None:
    name = _backend(config)
    if config.getoption("--emulated"):
        from . import emulators

        try:
            emulators.activate(name)  # before selection: the emulated backend detects as available
        except (ValueError, RuntimeError) as exc:
            raise pytest.UsageError(f"--emulated: {exc}") from None
    try:
        backend = hwlayer.select_backend(name)
    except hwlayer.BackendError as exc:
        raise pytest.UsageError(f"--backend {name}: {exc}") from None
    recorder = Recorder(name, backend.device_type, _dtypes(config), str(TOLERANCES_FILE.name))
    if config.getoption("--emulated"):
        recorder.add_extra("emulation", {"status": "emulated from docs, not hardware", "verified": backend.verified})
    config.stash[_RECORDER] = recorder


def pytest_unconfigure(config: pytest.Config) -> None:
    if config.getoption("--emulated"):
        from . import emulators

        emulators.deactivate()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", _dtypes(metafunc.config))


@pytest.fixture(scope="session")
def backend_name(pytestconfig: pytest.Config) -> str:
    return _backend(pytestconfig)


@pytest.fixture(scope="session")
def plan(backend_name: str, pytestconfig: pytest.Config) -> hwlayer.DispatchPlan:
    p = hwlayer.plan(backend_name, trace=True)  # traced: the report says which tier served each case
    pytestconfig.stash[_RECORDER].plan = {
        op: {"origin": e.origin, "implementation": e.implementation, "plugin": e.plugin, "reason": e.reason}
        for op, e in p.entries.items()
    }
    return p


@pytest.fixture(scope="session")
def device(plan: hwlayer.DispatchPlan) -> Any:
    return plan.device


@pytest.fixture(scope="session")
def tolerances() -> dict[str, Any]:
    return load_tolerances()


@pytest.fixture(scope="session")
def conformance_report(pytestconfig: pytest.Config) -> Recorder:
    return pytestconfig.stash[_RECORDER]


@pytest.fixture
def checker(request: pytest.FixtureRequest, plan, dtype, tolerances, conformance_report):
    made: list[Checker] = []
    request.node.stash[_CHECKERS] = made

    def make(op: str, case: str) -> Checker:
        ck = Checker(op, case, dtype, plan, conformance_report, tolerances, request.node.nodeid)
        made.append(ck)
        return ck

    yield make
    for ck in made:
        ck.finish()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    # An exception that did not come from a check (the op raised, wrong return type): record it.
    if call.when == "call" and report.failed and call.excinfo is not None:
        for ck in item.stash.get(_CHECKERS, []):
            if ck.result.passed:
                first_line = (str(call.excinfo.value).strip().splitlines() or [""])[0][:300]
                message = f"{ck.label()}: raised {call.excinfo.typename}: {first_line}"
                ck.result.merge(passed=False, max_abs=float("inf"), max_rel=float("inf"), atol=None, rtol=None,
                                ratio=float("inf"), message=message)
    return report


def _unserved_native_ops(config: pytest.Config) -> list[str]:
    """Under --emulated: ops the backend must serve natively that were called but never reached
    their adapter (every call declined by ``supports()``: the generic op would be compared with itself).
    Also records the native call count of every op in the report's ``emulation`` entry."""
    from . import emulators

    name = _backend(config)
    counts = hwlayer.plan(name, trace=True).call_counts()
    native = {op: n for (op, tier), n in sorted(counts.items()) if tier == "native"}
    missing = []
    for op in emulators.EXPECTED_NATIVE.get(name, ()):
        calls = sum(n for (o, _tier), n in counts.items() if o == op)
        if calls and not counts.get((op, "native"), 0):
            missing.append(op)
    recorder = config.stash.get(_RECORDER, None)
    if recorder is not None and "emulation" in recorder.extra:
        expected = list(emulators.EXPECTED_NATIVE.get(name, ()))
        recorder.extra["emulation"].update(native_calls=native, expected_native=expected, never_served=missing)
    return missing


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.config.getoption("--emulated"):
        missing = _unserved_native_ops(session.config)
        if missing:
            session.config.stash[_UNSERVED] = missing
            session.exitstatus = exitstatus = pytest.ExitCode.TESTS_FAILED
    path = session.config.getoption("--report")
    recorder = session.config.stash.get(_RECORDER, None)
    if path and recorder is not None:
        json_path, md_path = recorder.write(path, int(exitstatus))
        session.config.stash[_REPORT_PATHS] = (json_path, md_path)


_REPORT_PATHS = pytest.StashKey[tuple]()
_UNSERVED = pytest.StashKey[list]()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    unserved = config.stash.get(_UNSERVED, None)
    if unserved:
        terminalreporter.write_line(f"--emulated: native adapter(s) never served a call: {', '.join(unserved)} "
                                    "(every call was declined by supports())", red=True)
    paths = config.stash.get(_REPORT_PATHS, None)
    if paths:
        terminalreporter.write_line(f"hwlayer conformance report: {paths[0]} and {paths[1]}")
