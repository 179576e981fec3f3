"""Functions the executor tests send to worker processes (importable by name there)."""

import os
import time


def add(a, b):
    return a + b, os.getpid()


def sleep_then(value, seconds):
    time.sleep(seconds)
    return value


def niceness():
    return os.nice(0)


def raises():
    raise ValueError("bad value")


def die():
    os._exit(13)


def casa_raises():
    from dsa110_contimg.casa_env import prepare_casa

    prepare_casa(os.environ.get("CONTIMG_TEST_STATE", "/tmp/contimg-test-state"))
    import casatools

    tb = casatools.table()
    tb.open("/nonexistent/table.ms")  # CASA raises RuntimeError


def burn_and_hold(cpu_s, mib):
    """Spin the CPU for ``cpu_s`` and touch ``mib`` MiB, for the usage report."""
    block = bytearray(mib * 2**20)
    block[::4096] = b"x" * len(block[::4096])
    t0 = time.process_time()
    while time.process_time() - t0 < cpu_s:
        pass
    return len(block)


def omp_threads_after(seconds):
    """The OpenMP thread count this task was given, reported after ``seconds``."""
    time.sleep(seconds)
    return os.environ.get("OMP_NUM_THREADS")
