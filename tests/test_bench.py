"""bench.py refuses impossible settings with a one-line error and exit code 2, before looking for a GPU."""
import pytest

import bench


@pytest.mark.parametrize("argv, names", [
    (["--steps", "0"], "--steps=0 must be >= 1"),
    (["--warmup", "-1"], "--warmup=-1 must be >= 0"),
    (["--max-num-obj", "100"], "exceeds the 64 cells of the 8x8 grid"),
    (["--grid", "0"], "num_cell_h=0"),
])
def test_bench_refuses_impossible_settings(argv, names, capsys):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and names in err and "\n" not in err
