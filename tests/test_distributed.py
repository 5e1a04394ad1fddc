"""Tests of the communicators and processes (dpnet.parallel). MPI tests spawn `mpiexec -n N python tests/mpi_scripts/<script>.py` themselves.

Without mpi4py or mpiexec the MPI tests are skipped locally and fail when $CI is set.
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from dpnet.parallel import environment
from processes import kill_group, run_in_group, start_in_group
from requirements import require_program
from dpnet.distributed import (SerialCommunicator, check_in_sync, fault_injection_point, get_communicator,
                               make_reducer, set_blas_threads)

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"


@pytest.fixture
def run_python(clean_env):
    """run_python(code, timeout=60, **env): `python -c code` in a clean environment (see conftest.clean_env), in a
    process group of its own."""
    def run(code, timeout=60, **env):
        return run_in_group([sys.executable, "-c", textwrap.dedent(code)], timeout, env=clean_env(**env), cwd=REPO)
    return run


# ----------------------------------------------------------------------------------------------- serial, in process
def test_serial_communicator_is_a_checked_no_op():
    comm = SerialCommunicator()
    assert (comm.rank, comm.size, comm.is_root, comm.local_size()) == (0, 1, True, 1)
    for dtype in (np.float32, np.float64, np.int64):
        buf = np.arange(6, dtype=dtype).reshape(2, 3)
        for op in ("sum", "max", "min"):
            assert comm.allreduce(buf, op=op) is buf
        assert comm.bcast(buf) is buf
        assert (buf == np.arange(6).reshape(2, 3)).all()
    comm.barrier()
    with pytest.raises(ValueError, match="contiguous"):
        comm.allreduce(np.zeros((4, 4))[:, 1])
    with pytest.raises(TypeError, match="NumPy"):
        comm.allreduce([1.0, 2.0])
    with pytest.raises(ValueError, match="op"):
        comm.allreduce(np.zeros(2), op="prod")
    frozen = np.zeros(3)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        comm.bcast(frozen)
    assert make_reducer(comm) is None
    check_in_sync(comm, np.arange(10.0))


def test_mpi_requested_without_mpi4py_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `from mpi4py import MPI` raise ImportError
    with pytest.raises(ImportError, match=r"pip install dpnet\[mpi\]"):
        get_communicator("mpi")
    monkeypatch.setenv("PMI_SIZE", "2")  # "started by mpiexec -n 2" but no mpi4py: an error, not N serial runs
    with pytest.raises(ImportError, match=r"pip install dpnet\[mpi\]"):
        get_communicator()
    with pytest.raises(ValueError, match="kind"):
        get_communicator("nccl")


def test_fault_injection_parsing(monkeypatch):
    comm = SerialCommunicator()
    monkeypatch.delenv("DPNET_FAULT_INJECT", raising=False)
    fault_injection_point(comm, 5)
    monkeypatch.setenv("DPNET_FAULT_INJECT", " rank = 0 , step = 3 ")
    fault_injection_point(comm, 2)
    with pytest.raises(RuntimeError, match="injected fault on rank 0 at step 3"):
        fault_injection_point(comm, 3)
    monkeypatch.setenv("DPNET_FAULT_INJECT", "rank=1,step=3")
    fault_injection_point(comm, 3)  # another rank's fault
    for bad in ("rank=1", "rank=1,step=x", "rank=1;step=2", "rank=1,step=2,when=now"):
        monkeypatch.setenv("DPNET_FAULT_INJECT", bad)
        with pytest.raises(ValueError, match="DPNET_FAULT_INJECT"):
            fault_injection_point(comm, 0)


@pytest.fixture
def restore_blas_threads():
    yield
    if environment._blas_limits is not None:
        environment._blas_limits.restore_original_limits()


def test_blas_threads_precedence(monkeypatch, restore_blas_threads):
    from threadpoolctl import threadpool_info

    def blas_threads():
        return {info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}

    for var in ("DPNET_BLAS_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", *environment.LOCAL_SIZE_VARS):
        monkeypatch.delenv(var, raising=False)
    cores = len(os.sched_getaffinity(0))
    assert set_blas_threads() == cores
    monkeypatch.setenv("MPI_LOCALNRANKS", str(2 * cores))  # more processes than cores: one thread each
    assert set_blas_threads() == 1
    assert blas_threads() <= {1}
    monkeypatch.setenv("OMP_NUM_THREADS", "3,2")
    assert set_blas_threads() == 3
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    assert set_blas_threads() == 2
    monkeypatch.setenv("DPNET_BLAS_THREADS", "1")
    assert set_blas_threads() == 1
    assert blas_threads() <= {1}
    assert set_blas_threads(4) == 4
    monkeypatch.setenv("DPNET_BLAS_THREADS", "zero")
    with pytest.raises(ValueError, match="DPNET_BLAS_THREADS"):
        set_blas_threads()
    with pytest.raises(ValueError, match="positive"):
        set_blas_threads(0)


# ----------------------------------------------------------------------------------------------- serial, subprocess
@pytest.mark.timeout(60)
def test_plain_process_is_serial_without_importing_mpi4py(run_python):
    result = run_python("""
        import sys
        import numpy as np
        from dpnet.distributed import SerialCommunicator, get_communicator
        for kind in (None, "auto", "serial"):
            comm = get_communicator(kind)
            assert type(comm) is SerialCommunicator, comm
            assert comm.allreduce(np.ones(3)).sum() == 3
        assert "mpi4py" not in sys.modules, "mpi4py was imported"
        print("serial ok", flush=True)
        comm.abort(3)
        print("abort returned")
    """)
    assert result.returncode == 3, result.stderr
    assert result.stdout == "serial ok\n"


# ----------------------------------------------------------------------------------------------- MPI
@pytest.mark.timeout(60)
def test_one_process_under_mpiexec_is_serial(mpiexec, clean_env):
    code = ("import sys; from dpnet.distributed import get_communicator, SerialCommunicator; "
            "assert type(get_communicator()) is SerialCommunicator; assert 'mpi4py' not in sys.modules; print('ok')")
    cmd = [mpiexec, "-n", "1", sys.executable, "-c", code]
    result = run_in_group(cmd, 30, env=clean_env())
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.timeout(60)
def test_launcher_and_mpi_disagreeing_is_an_error(mpiexec, run_python):
    """As under srun without a PMI plugin: Slurm says 2 tasks, but each process initializes MPI alone."""
    result = run_python("from dpnet.distributed import get_communicator; get_communicator()", SLURM_STEP_NUM_TASKS="2")
    assert result.returncode == 1
    assert "the launcher started 2 processes but MPI sees 1" in result.stderr


@pytest.mark.timeout(90)
@pytest.mark.parametrize("n", [2, 3])
def test_collectives(n, run_mpi):
    """allreduce sum/max/min in place (float32, float64, int64), bcast, reduce_scatter / allgather / gather with equal
    and unequal blocks, errors, shared memory (one array, one per process), reducer, check_in_sync."""
    result = run_mpi(n, "collectives.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == f"ok {n} ranks\n"
    assert result.stderr.count("are needed to share parameters and gradients between processes") == 2, result.stderr


@pytest.mark.timeout(60)
def test_fault_on_one_rank_aborts_the_whole_job(run_mpi):
    start = time.monotonic()
    result = run_mpi(3, "fault.py", timeout=30, DPNET_FAULT_INJECT="rank=1,step=5")
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 15, f"the job took {elapsed:.1f} s to die"
    assert result.stderr.count("dpnet: rank") == 1, result.stderr
    assert "dpnet: rank 1 of 3 failed with an unhandled RuntimeError" in result.stderr
    assert "Traceback" in result.stderr and "injected fault on rank 1 at step 5" in result.stderr
    assert "finished" not in result.stdout
    segments = re.search(r"segments:(.*)", result.stdout)[1].split()  # MPICH's files in /dev/shm: the abort removes
    assert segments and not any(os.path.exists(path) for path in segments), segments


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_on_a_rank_blocked_in_allreduce_aborts_the_whole_job(sig, tmp_path, mpiexec, clean_env):
    cmd = [mpiexec, "-n", "3", sys.executable, str(SCRIPTS / "wait_for_signal.py"), str(tmp_path)]
    proc = start_in_group(cmd, env=clean_env())
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "pid1").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the ranks did not start"
            time.sleep(0.05)
        time.sleep(0.2)  # let rank 1 enter MPI_Allreduce
        start = time.monotonic()
        os.kill(int((tmp_path / "pid1").read_text()), sig)
        _, stderr = proc.communicate(timeout=15)
        elapsed = time.monotonic() - start
    finally:
        kill_group(proc.pid)
        if proc.poll() is None:
            proc.wait()
    assert proc.returncode != 0
    assert elapsed < 15
    assert f"dpnet: rank 1 of 3 received {sig.name}" in stderr, stderr
    segments = (tmp_path / "segments").read_text().split()  # MPICH's files in /dev/shm: the abort removes
    assert segments and not any(os.path.exists(path) for path in segments), segments


@pytest.mark.timeout(60)
def test_blas_threads_split_the_cores_between_ranks(run_mpi):
    result = run_mpi(2, "blas_threads.py")
    assert result.returncode == 0, result.stderr
    ranks = json.loads(result.stdout)
    expected = max(1, len(os.sched_getaffinity(0)) // 2)  # 1 on a 2-core machine
    assert ranks == [dict(set=expected, blas_min=expected, blas_max=expected, local_size=2)] * 2


# ----------------------------------------------------------------------------------------------- launch scripts
LAUNCH = REPO / "launch"


@pytest.mark.parametrize("args", [[], ["0"], ["-2"], ["two"], [""]])
def test_local_sh_rejects_a_bad_process_count(args, clean_env):
    result = run_in_group(["bash", str(LAUNCH / "local.sh"), *args], 30, env=clean_env())
    assert result.returncode == 2, result.stderr
    assert "number of processes" in result.stderr and "usage" in result.stderr.lower()


@pytest.mark.parametrize("script", ["local.sh", "hosts.sh", "slurm.sbatch", "find_mpi.sh"])
def test_launch_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True).returncode == 0
    shellcheck = require_program("shellcheck", "apt-get install shellcheck")
    result = subprocess.run([shellcheck, "-x", "-s", "bash", str(LAUNCH / script)], capture_output=True, text=True,
                            cwd=REPO)  # -x: with launch/find_mpi.sh, which they source
    assert result.returncode == 0, result.stdout



@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", [2, 3])
def test_one_machine_jobs_start_mpi_without_ucx_shared_memory(n, run_mpi):
    """Hydra's jobs on one machine start MPI with UCX_TLS=^sm: MPICH's own shared memory carries their messages, and
    UCX's shared-memory transports would only map 4 MB per process."""
    result = run_mpi(n, "ucx_setting.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(re.findall(r"rank (\d) UCX_TLS=(\S+)", result.stdout)) == [(str(r), "^sm") for r in range(n)]


@pytest.mark.timeout(60)
def test_a_user_choice_of_ucx_transports_is_kept(run_mpi):
    result = run_mpi(2, "ucx_setting.py", UCX_TLS="self,sm,tcp")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(re.findall(r"rank (\d) UCX_TLS=(\S+)", result.stdout)) == [("0", "self,sm,tcp"), ("1", "self,sm,tcp")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", [2, 3])
def test_bcast_copy_on_write(n, run_mpi):
    """Every process gets root's array as private copy-on-write mappings of one file in /dev/shm, unlinked before the
    call returns on root; without room there, plain arrays with the same values."""
    result = run_mpi(n, "shared_copy.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == f"ok {n} ranks\n", result.stdout


def test_bcast_copy_on_write_in_one_process():
    from dpnet.parallel import SerialCommunicator, bcast_copy_on_write

    parts = [np.arange(3, dtype=np.float32), np.ones((2, 2))]
    (only,) = bcast_copy_on_write(SerialCommunicator(), parts, 7, np.float64, copies=2)  # nobody to share it with
    assert np.array_equal(only, [0, 1, 2, 1, 1, 1, 1]) and only.dtype == np.float64
    only[0] = 5
    assert parts[0][0] == 0
    with pytest.raises(ValueError, match="hold 7 elements, size says 8"):
        bcast_copy_on_write(SerialCommunicator(), parts, 8, np.float64)


def test_an_abort_unlinks_the_job_files_this_process_maps():
    """What comm.abort() removes from /dev/shm before MPI_Abort: the MPICH segments and bcast_copy_on_write files that
    this process maps (here a stand-in of each), nothing it does not map."""
    import mmap
    import tempfile

    if not os.path.isdir(environment.SHM_DIR):
        pytest.skip("no /dev/shm on this system")
    paths = []
    for prefix in ("mpich_shm_dpnet-test-", "dpnet-copy-", "mpich_shm_dpnet-test-unmapped-"):
        descriptor, path = tempfile.mkstemp(prefix=prefix, dir=environment.SHM_DIR)
        os.close(descriptor)
        paths.append(path)
    try:
        mappings = []
        for path in paths[:2]:
            with open(path, "wb") as file:
                file.write(b"\0" * 4096)
            with open(path, "rb") as file:
                mappings.append(mmap.mmap(file.fileno(), 4096, access=mmap.ACCESS_READ))
        assert set(paths[:2]) <= environment.job_shared_memory_files()
        environment.unlink_job_shared_memory_files()
        assert [os.path.exists(path) for path in paths] == [False, False, True]
    finally:
        for path in paths:
            if os.path.exists(path):
                os.unlink(path)


# ----------------------------------------------------------------------------------------------- as_communicator
def test_anything_but_a_communicator_is_refused_before_any_collective():
    from dpnet.parallel import as_communicator
    from dpnet.solver import Solver

    for wrong in (object(), "mpi", 2):
        with pytest.raises(TypeError, match=r"comm must be a dpnet communicator .* or an mpi4py communicator"):
            as_communicator(wrong)
    data = {"X_train": np.zeros((4, 3)), "y_train": np.zeros(4, dtype=int), "X_val": np.zeros((2, 3)),
            "y_val": np.zeros(2, dtype=int)}

    class Model:
        params = {"w": np.zeros(3)}

        def loss(self, X, y=None):
            raise AssertionError("never reached")

    with pytest.raises(TypeError, match="got str"):
        Solver(Model(), data, comm="world", verbose=False)
    assert type(as_communicator(None)) is SerialCommunicator


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", [1, 2])
def test_a_raw_mpi4py_communicator_is_wrapped(n, mpiexec, clean_env):
    """Solver(comm=MPI.COMM_WORLD) trains as with dpnet's own communicator: the processes agree on the result."""
    code = textwrap.dedent("""
        import numpy as np
        from mpi4py import MPI
        from dpnet.classifiers.fc_net import FullyConnectedNet
        from dpnet.parallel import MPICommunicator, as_communicator, check_in_sync
        from dpnet.solver import Solver
        assert type(as_communicator(MPI.COMM_WORLD)) is MPICommunicator
        rng = np.random.default_rng(0)
        data = {"X_train": rng.standard_normal((40, 6)), "y_train": rng.integers(3, size=40),
                "X_val": rng.standard_normal((10, 6)), "y_val": rng.integers(3, size=10)}
        model = FullyConnectedNet([5], input_dim=6, num_classes=3, dtype=np.float64, seed=0)
        solver = Solver(model, data, comm=MPI.COMM_WORLD, batch_size=10, num_epochs=1, verbose=False, seed=0)
        solver.train()
        check_in_sync(solver.comm, [model.params[k] for k in sorted(model.params)])
        if solver.comm.rank == 0:
            print("ok", solver.comm.size, flush=True)
    """)
    result = run_in_group([mpiexec, "-n", str(n), sys.executable, "-c", code], 45, env=clean_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == f"ok {n}\n", result.stdout
