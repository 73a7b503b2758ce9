"""bench.py refuses impossible settings with a one-line error and exit code 2, before looking for a GPU;
its --weight-grads table times layers the default model has."""
import pytest
import torch

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


def test_weight_grad_shapes_are_layers_of_the_default_model():
    """bench.py --weight-grads times convolutions that the default model has (channels, kernel,
    stride), with the input sizes they see (the glimpse decoder's 32 -> 32 at 32x32 included)."""
    from common import Config
    from scalor import SCALOR
    convs = {(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0])
             for m in SCALOR(Config()).modules() if isinstance(m, torch.nn.Conv2d)}
    for _, cin, cout, _, k, s in bench.WEIGHT_GRAD_SHAPES:
        assert (cin, cout, k, s) in convs
    assert (900, 32, 32, 32, 3, 1) in bench.WEIGHT_GRAD_SHAPES
