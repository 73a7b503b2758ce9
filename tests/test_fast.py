"""fast.py: the speed options (flags, defaults per device, old checkpoints) and what apply changes --
the classes of a few modules, never the parameters or the numbers (those are tests/test_model.py's,
test_equivalence.py's, test_kernels.py's and test_compile.py's)."""
import argparse
import os

import pytest
import torch

import fast
from common import Config, ConfigError
from fast import SpeedOptions
from scalor import SCALOR


def test_cuda_graph_by_default_on_one_gpu_only():
    assert SpeedOptions().resolved("cuda").cuda_graph is True
    assert SpeedOptions().resolved("cuda", distributed=True).cuda_graph is False
    assert SpeedOptions().resolved("cpu").cuda_graph is False
    assert SpeedOptions(cuda_graph=False).resolved("cuda").cuda_graph is False
    notices = []
    cpu = SpeedOptions(cuda_graph=True, compile=True).resolved("cpu", notice=notices.append)
    assert (cpu.cuda_graph, cpu.compile) == (False, False) and len(notices) == 2
    assert SpeedOptions(compile=True).resolved("cuda").compile is True


def test_flags_round_trip():
    parser = argparse.ArgumentParser()
    SpeedOptions.add_arguments(parser)
    assert SpeedOptions.from_args(parser.parse_args([])) == SpeedOptions()
    opts = SpeedOptions.from_args(parser.parse_args(["--no-cuda-graph", "--compile", "--precision", "bf16",
                                                     "--no-triton-convs", "--no-checkpoint-glimpses"]))
    assert opts == SpeedOptions(cuda_graph=False, compile=True, precision="bf16", triton_convs=False,
                                checkpoint_glimpses=False)
    with pytest.raises(ValueError, match="precision"):
        SpeedOptions(precision="fp16")


def test_old_checkpoint_configs_drop_their_speed_switches():
    old = {**Config().to_dict(), "checkpoint_glimpses": False, "triton_convs": True, "nhwc_weight_grad": False,
           "dot_convs": True, "fused_param_grads": False}
    assert Config.from_dict(old) == Config()
    with pytest.raises(ConfigError, match="unknown config fields"):
        Config.from_dict({**Config().to_dict(), "no_such_field": 1})


def test_apply_changes_classes_not_parameters():
    torch.manual_seed(0)
    plain = SCALOR(Config())
    state = plain.state_dict()
    assert not any(type(m).__module__ == "fast" for m in plain.modules())    # the plain model is plain PyTorch
    fast.apply(plain, SpeedOptions())
    assert isinstance(plain, fast.FastSCALOR) and isinstance(plain.glimpse_dec, fast.FastGlimpseDecoder)
    after = plain.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)


def test_compile_cache_is_persistent_unless_set(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    fast.persistent_compile_cache(str(tmp_path / "cache"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    fast.persistent_compile_cache(str(tmp_path / "cache"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"
    import torch._inductor.config as inductor_config
    assert inductor_config.fx_graph_cache
