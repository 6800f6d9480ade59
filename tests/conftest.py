"""Shared test set-up: CPU only, four forced host devices (tensor-parallel tests), no network; fresh random input
per run that a failing test's report says how to draw again (tests/fresh.py)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()


def _pin_worker() -> None:
    """A pytest-xdist worker keeps to its own share of the CPUs (worker i of n: the i-th, (i+n)-th, ... CPU this
    process may use), every thread it has and so every one it starts: XLA sizes its compile and run thread pools from
    that set, so two workers on two cores no longer each run two threads that take turns on both cores. Measured
    side by side, cold, two workers: -7% worker-seconds on six of the heaviest files (docs/architecture.md, "The
    suite on two workers"). Not with fewer CPUs than workers, nor in one process (RADIXLM_TEST_WORKERS=0)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    cpus = sorted(os.sched_getaffinity(0))
    if not worker.startswith("gw") or not 2 <= count <= len(cpus):
        return
    mine = set(cpus[int(worker[2:]) :: count])
    for thread in os.listdir("/proc/self/task"):  # (a thread started before this keeps its own set otherwise)
        try:
            os.sched_setaffinity(int(thread), mine)
        except OSError:  # it ended meanwhile
            pass


_pin_worker()

import pytest  # noqa: E402

import fresh  # noqa: E402

_LOWERED: list[str] = []  # every function JAX lowered (to compile it, or to look it up in the persistent cache)
_listening = False


@pytest.fixture
def lowered():
    """-> a function listing the functions JAX lowered since the test began. A lowering means an executable that was
    not in memory: a compile, or a persistent-cache lookup."""
    global _listening
    if not _listening:
        import jax

        jax.monitoring.register_event_duration_secs_listener(
            lambda event, secs, fun_name="", **kw: _LOWERED.append(fun_name)
            if event == "/jax/core/compile/jaxpr_to_mlir_module_duration" else None)
        _listening = True
    start = len(_LOWERED)
    return lambda: _LOWERED[start:]


def pytest_addoption(parser):
    parser.addoption("--compile-report", type=int, default=0, metavar="N",
                     help="list the N tests that spent the most time tracing, lowering and compiling with JAX, and the "
                          "functions that took it (tests/compile_report.py)")


def pytest_configure(config):
    fresh.run_seed()  # set in the environment before xdist starts its workers, which inherit it
    if config.getoption("compile_report"):
        from compile_report import CompileReport

        config.pluginmanager.register(CompileReport(config.getoption("compile_report")), "compile_report")


@pytest.fixture(autouse=True, scope="module")
def _room_for_executables():
    """A worker runs file after file, each compiling programs of its own, whose executables JAX keeps with their memory
    mappings (~100 a step program): past a quarter of the kernel's limit a file starts by dropping them (at the limit
    XLA segfaults; engine.compiled). An engine being built drops them past half, within a file too."""
    from engine.compiled import release_executables_if_crowded

    release_executables_if_crowded(share=0.25)


def pytest_report_header(config):
    return f"fresh random input: {fresh.ENV}={fresh.run_seed()} (tests/fresh.py)"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    fresh.begin(item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        count = item.config.getoption("count", 1)  # pytest-repeat's: its copies' ids end -i-count
        again = (f"{fresh.ENV}={fresh.run_seed()} bash scripts/test.sh " + (f"--count {count} " if count > 1 else "")
                 + f"'{item.nodeid}'")
        report.sections.append(("fresh random input", f"this run's draws again: {again}"))
