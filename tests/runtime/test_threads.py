"""Thread defaults of a CPU engine (kiln.runtime.threads): the cores go to TVM on the cpu target
and to torch elsewhere; `threads=` and `--threads` override."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from kiln.runtime import threads


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv(threads.TVM_NUM_THREADS, raising=False)
    monkeypatch.delenv(threads.TVM_BIND_THREADS, raising=False)
    yield
    torch.set_num_threads(before)


def test_the_cpu_target_gives_the_cores_to_tvm_and_one_thread_to_torch(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 6)
    assert threads.configure(None, "cpu") == {"torch": 1, "tvm": 6}
    assert torch.get_num_threads() == 1
    assert os.environ[threads.TVM_NUM_THREADS] == "6"


def test_tvm_workers_are_not_pinned_unless_the_environment_says_so(monkeypatch):
    threads.configure(None, "cpu")
    assert os.environ[threads.TVM_BIND_THREADS] == "0"
    monkeypatch.setenv(threads.TVM_BIND_THREADS, "1")
    threads.configure(None, "cpu")
    assert os.environ[threads.TVM_BIND_THREADS] == "1"


def test_the_tvm_pool_runs_on_the_cores_other_processes_leave_idle(monkeypatch):
    """Cumulative CPU seconds (all processes, this one) one second apart: others idle, then busy
    on one of the two cores twice -> 2, 2, 1, 1 threads of a pool of 2; then a new fitter on the
    same thread starts at 2 and goes on with others idle."""
    tvm = pytest.importorskip("tvm")
    samples = iter([(0.0, 0.0), (1.0, 1.0), (3.0, 2.0), (5.0, 3.0), (6.0, 3.0), (8.0, 5.0)])
    clock = iter(range(100))
    monkeypatch.setenv(threads.TVM_NUM_THREADS, "2")
    monkeypatch.setattr(threads, "_cpus", lambda: {0, 1})
    monkeypatch.setattr(threads, "busy_seconds", lambda cpus: next(samples))
    monkeypatch.setattr(threads.time, "monotonic", lambda: float(next(clock)))
    used = []

    def steps():  # a thread of its own: a pool of its own, sized by TVM_NUM_THREADS now
        pool = threads.TvmThreads()
        for _ in range(4):
            pool.fit()
            used.append((pool.used, tvm.runtime.num_threads()))
        pool = threads.TvmThreads()  # another engine on this thread starts from the whole pool
        pool.fit()
        used.append((pool.used, tvm.runtime.num_threads()))
        pool.fit()
        used.append((pool.used, tvm.runtime.num_threads()))

    t = threading.Thread(target=steps)
    t.start()
    t.join()
    assert used == [(2, 2), (2, 2), (1, 1), (1, 1), (2, 2), (2, 2)]


def test_an_explicit_count_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv(threads.TVM_NUM_THREADS, "5")
    assert threads.configure(None, "cpu")["tvm"] == 5
    assert threads.configure(3, "cpu")["tvm"] == 3


def test_other_targets_give_the_threads_to_torch():
    assert threads.configure(2, "reference") == {"torch": 2}
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="threads must be >= 1"):
        threads.configure(0, "reference")


def test_the_commands_that_run_an_artifact_take_threads():
    import argparse

    from kiln.cli import _engine_args, _engine_kwargs

    p = argparse.ArgumentParser()
    _engine_args(p)
    assert _engine_kwargs(p.parse_args(["--threads", "3"]))["threads"] == 3
    assert "threads" not in _engine_kwargs(p.parse_args([]))
