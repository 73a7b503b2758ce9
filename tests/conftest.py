"""Test setup: the project root on sys.path, deterministic single-threaded CPU runs."""
import os
import sys

# Triton kernels (kernels.py) run in Triton's CPU interpreter in the tests; set before triton is imported
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# one thread per pytest-xdist worker (the README's `-n 2` runs two at once on 2 cores), else up to 2
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_cfg():
    from common import small_config
    return small_config(seq_len=3, batch_size=2, observe_frames=1)


@pytest.fixture
def one_thread():
    """Tiny models run fastest, and steadiest on a busy machine, on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_dirs(folder, *extra) -> list:
    """train.py flags that keep a run's checkpoints and summary inside `folder` (a Path)."""
    return ["--ckpt-dir", str(folder / "checkpoints"), "--summary-dir", str(folder / "summary"), *extra]


@pytest.fixture
def checkpoint(tmp_path, tiny_cfg):
    """A checkpoint file of an untrained tiny model (seeded), step 1234."""
    from checkpoints import save_checkpoint
    from scalor import SCALOR
    torch.manual_seed(0)
    path = str(tmp_path / "tiny.pt")
    save_checkpoint(path, SCALOR(tiny_cfg), step=1234, cfg=tiny_cfg)
    return path
