"""Shared pytest fixtures."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))  # tests' own helpers: `from processes import ...`
from processes import STARTED, group_alive, kill_group, run_in_group  # noqa: E402

_JOB_FILES = ("mpich_shm_", "dpnet-copy-")  # what a job of ours may leave in /dev/shm


def _job_files():
    try:
        return {name for name in os.listdir("/dev/shm") if name.startswith(_JOB_FILES)}
    except OSError:
        return set()


@pytest.fixture(scope="session", autouse=True)
def nothing_outlives_the_suite():
    """After the whole session: no process group a test started is still running, and (under CI, where nothing else
    runs) no /dev/shm file of a job (MPICH's segments, dpnet's copy-on-write files) is left that was not there
    before."""
    before = _job_files()
    yield
    alive = [pgid for pgid in STARTED if group_alive(pgid)]
    for pgid in alive:
        kill_group(pgid)
    left = sorted(_job_files() - before)
    assert not alive, f"process groups started by tests were still running at the end of the session: {alive}"
    if left and os.environ.get("CI"):  # elsewhere another MPI job on the machine may have made them: a warning only
        pytest.fail(f"files left in /dev/shm by the tests' jobs: {left}", pytrace=False)
    elif left:
        import warnings

        warnings.warn(f"files left in /dev/shm during the test session (by its jobs, or another job): {left}")


@pytest.fixture(scope="session")
def cifar10_dir():
    """Path of the real CIFAR-10 (the cifar-10-batches-py folder or the folder holding it), from $DPNET_TEST_DATA_DIR.

    When it is unset or holds no CIFAR-10: the test is skipped locally, but fails when $CI is set (CI must run the
    real-data tests, not skip them silently).
    """
    value = os.environ.get("DPNET_TEST_DATA_DIR", "")
    path = Path(value).expanduser() if value else None
    if path is not None and any((p / "data_batch_1").is_file() for p in (path, path / "cifar-10-batches-py")):
        return path
    reason = ("DPNET_TEST_DATA_DIR is not set" if path is None
              else f"DPNET_TEST_DATA_DIR={value} holds no CIFAR-10 (no data_batch_1 in it or in its "
                   f"cifar-10-batches-py)")
    message = f"real CIFAR-10 needed: {reason}; set it to the folder of the official python batches"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


# ----------------------------------------------------------------------------------------------- MPI jobs
# Variables that would make a child think it was started by a launcher, or that would change what it does.
_MPI_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MPI_LOCAL", "SLURM_", "HYDRA_")
_MPI_SCRUBBED = ("DPNET_FAULT_INJECT", "DPNET_BLAS_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")
MPI_SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"


@pytest.fixture(scope="session")
def mpiexec():
    """Path of the mpiexec next to this interpreter (the mpich wheel's), else of the one on PATH.

    Without it or without mpi4py the test is skipped locally, but fails when $CI is set.
    """
    import shutil
    import sys

    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.is_file() else shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        found, why = None, "mpi4py is not installed (pip install dpnet[mpi])"
    else:
        why = "no mpiexec next to the interpreter nor on PATH (pip install dpnet[mpi])"
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    return found


@pytest.fixture(scope="session")
def clean_env():
    """clean_env(**extra): this environment without launcher or thread-count variables (a child must not think it
    was started by mpiexec), with this checkout first on PYTHONPATH, plus `extra`."""
    repo = Path(__file__).resolve().parents[1]

    def make(**extra):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(_MPI_LAUNCHER_PREFIXES) and k not in _MPI_SCRUBBED}
        env["PYTHONPATH"] = os.pathsep.join([str(repo)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        env.update(extra)
        return env

    return make


@pytest.fixture(scope="session")
def run_mpi(mpiexec, clean_env):
    """run_mpi(n, script, *args, timeout=60, **env): run `mpiexec -n n python tests/mpi_scripts/<script> args...`.

    The child gets a clean environment (no launcher or thread-count variables, this checkout first on PYTHONPATH)
    plus `env`. Returns the subprocess.CompletedProcess with an added `elapsed` (seconds). A job still running after
    `timeout` seconds is killed with its whole process group (no orphaned ranks left spinning) and the test fails;
    so is whatever is left of the group when the test is interrupted (tests/support/processes.py).
    """
    def run(n, script, *args, timeout=60, **env):
        cmd = [mpiexec, "-n", str(n), sys.executable, str(MPI_SCRIPTS / script), *map(str, args)]
        return run_in_group(cmd, timeout, env=clean_env(**env))

    return run


@pytest.fixture(scope="session")
def dpnet_cache_dir(tmp_path_factory):
    """A DPNET_CACHE_DIR for the whole test session (the uint8 image cache of CIFAR-10 is built once)."""
    return tmp_path_factory.mktemp("dpnet-cache")


# ----------------------------------------------------------------------------------------------- plugins
@pytest.fixture
def clean_registry(monkeypatch):
    """A fresh plugin registry with autoload on; plugin fixture modules imported by the test are forgotten after."""
    import sys

    from dpnet import registry

    monkeypatch.delenv("DPNET_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("DPNET_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    registry.reset()
    before = set(sys.modules)
    yield
    registry.reset()
    for name in set(sys.modules) - before:
        if name.startswith("dpnetfx_"):
            del sys.modules[name]


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path standing in for site-packages."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    return folder


@pytest.fixture
def install(site, clean_registry):
    """install(*names): the named distributions of tests/plugin_fixtures appear installed (importlib.metadata finds
    their entry points, as after pip install), and the registry is reset to load them."""
    import importlib.util

    from dpnet import registry

    spec = importlib.util.spec_from_file_location(
        "dpnet_plugin_fixtures_install", Path(__file__).with_name("plugin_fixtures") / "fake_install.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)

    def install(*names):
        for name in names:
            fixtures.fake_install(site, name)
        registry.reset()

    return install


@pytest.fixture
def restore_blas_threads():
    """Give back this process's BLAS thread pool after a test that ran the command line (or set_blas_threads) in
    this process."""
    yield
    from dpnet.parallel import environment

    if environment._blas_limits is not None:
        environment._blas_limits.restore_original_limits()
        environment._blas_limits = None
