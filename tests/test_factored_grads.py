"""dpnet.factored_grads: the block of a weight gradient computed from its factors (the shared-memory part runs in
the MPI equivalence tests of test_solver_mpi.py, which check it against one process)."""

import numpy as np
import pytest

from dpnet.factored_grads import add_weight_block


def test_any_range_of_the_flattened_product_is_computed_exactly():
    rng = np.random.default_rng(0)
    x, dout = rng.standard_normal((9, 5)), rng.standard_normal((9, 7))
    whole = (x.T @ dout).ravel()
    for start in range(whole.size + 1):  # every range: within a row, across rows, whole rows, partial ends
        for stop in range(start, whole.size + 1):
            out = np.full(stop - start, np.nan)
            assert add_weight_block(x, dout, start, stop, out) is out
            np.testing.assert_allclose(out, whole[start:stop], rtol=1e-13, atol=1e-15, err_msg=f"{start}:{stop}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_block_keeps_the_dtype_and_reads_strided_rows(dtype):
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((6, 40)).astype(dtype)  # a layer's rows inside a larger shared buffer
    x, dout = rows[:, :12], rows[:, 12:20]
    out = np.empty(50, dtype=dtype)
    add_weight_block(x, dout, 13, 63, out)
    tolerance = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(out, (x.T @ dout).ravel()[13:63], rtol=tolerance, atol=tolerance)
