"""The scripts of tests/mpi_scripts as modules: the tests import them for their one-process references."""

import importlib.util
import sys
from pathlib import Path

MPI_SCRIPTS = Path(__file__).resolve().parents[1] / "mpi_scripts"


def load_mpi_script(name):
    """tests/mpi_scripts/<name>.py as a module. Its folder goes on sys.path, as when mpiexec runs it as a script, so
    that it imports its neighbours (blob_images) alike."""
    if str(MPI_SCRIPTS) not in sys.path:
        sys.path.append(str(MPI_SCRIPTS))
    spec = importlib.util.spec_from_file_location(f"mpi_scripts_{name}", MPI_SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_test_module(name):
    """tests/<name>.py as a module of its own (the tests run with --import-mode=importlib, so a test file is not
    importable by name): for the run helpers one test file shares with others."""
    path = Path(__file__).resolve().parents[1] / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"dpnet_tests_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
