"""`--compile-report N` (tests/conftest.py): where the suite's time goes to JAX. Each test's seconds of tracing,
lowering and XLA compiling (a persistent-cache hit counts as a compile: JAX times both as one), by jitted function,
gathered in whichever process runs the test and sent with its report, so pytest-xdist's workers report to the
controller; at the end, the N tests with the most of it and the functions that took it.

    bash scripts/test.sh --compile-report 30 tests/test_engine.py
"""
from __future__ import annotations

import collections

import pytest

# jax's event names (jax._src.dispatch) -> their column: tracing a function, lowering its jaxpr to MLIR, compiling it
# (or reading it from the persistent cache)
PHASES = {"/jax/core/compile/jaxpr_trace_duration": 0, "/jax/core/compile/jaxpr_to_mlir_module_duration": 1,
          "/jax/core/compile/backend_compile_duration": 2}
COMPILE = 2
KEY = "jax_compile"  # the report's user property


class CompileReport:
    def __init__(self, most: int):
        self.most = most
        self.current: dict | None = None  # this process's test: {function: [trace, lower, compile seconds, programs]}
        self.tests: dict[str, tuple[float, dict]] = {}  # the controller's: test -> (its duration, its functions)
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._event)

    def _event(self, event: str, secs: float, fun_name: str = "", **kw) -> None:
        phase = PHASES.get(event)
        if phase is None or self.current is None:
            return
        name = fun_name[4:-1] if fun_name.startswith("jit(") and fun_name.endswith(")") else fun_name or "?"
        row = self.current.setdefault(name, [0.0, 0.0, 0.0, 0])  # (tracing names f, lowering and compiling jit(f))
        row[phase] += secs
        row[3] += phase == COMPILE

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        self.current = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        if call.when == "teardown" and self.current is not None:
            item.user_properties.append((KEY, self.current))  # (the teardown report carries it to the controller)
            self.current = None
        yield

    def pytest_runtest_logreport(self, report):
        duration, functions = self.tests.get(report.nodeid, (0.0, {}))
        for name, value in report.user_properties:
            if name == KEY:
                functions = value
        self.tests[report.nodeid] = (duration + report.duration, functions)

    def pytest_terminal_summary(self, terminalreporter):
        write = terminalreporter.write_line
        totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0])
        rows = []
        for test, (duration, functions) in self.tests.items():
            for name, row in functions.items():
                totals[name] = [a + b for a, b in zip(totals[name], row)]
            if functions:
                rows.append((sum(sum(r[:3]) for r in functions.values()), duration, test, functions))
        if not rows:
            return
        terminalreporter.section(f"JAX compile report: the {self.most} tests with the most")
        write(f"{'jax s':>7} {'test s':>7}  test: its largest functions (seconds / programs)")
        for spent, duration, test, functions in sorted(rows, reverse=True)[: self.most]:
            top = sorted(functions.items(), key=lambda kv: -sum(kv[1][:3]))[:3]
            write(f"{spent:7.1f} {duration:7.1f}  {test}: " + ", ".join(f"{n} {sum(r[:3]):.2f}/{r[3]}" for n, r in top))
        spent, tested = sum(r[0] for r in rows), sum(r[1] for r in rows)
        write(f"in all: {spent:.1f} of {tested:.1f} test-seconds in JAX; by function (trace / lower / compile seconds, "
              "programs compiled or read from the persistent cache):")
        largest = sorted(totals.items(), key=lambda kv: -sum(kv[1][:3]))[: self.most]
        for name, (trace, lower, compile_, programs) in largest:
            write(f"{trace:7.2f} {lower:7.2f} {compile_:7.2f} {programs:6d}  {name}")
