"""Multi-process training (torch.distributed, gloo on CPU): gradients equal a single process's on
the same global batch; a torchrun job logs and checkpoints once and resumes with one process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import scalor as scalor_mod
from common import small_config

# torchrun jobs use the default rendezvous port: under pytest-xdist they run one after another on one worker
pytestmark = pytest.mark.xdist_group("torchrun")

ROOT = Path(__file__).resolve().parent.parent


def _deterministic_sampling():
    """Same latent samples whatever the batch split: means for Gaussians, no logistic noise."""
    scalor_mod.normal_rsample = lambda mean, std: mean
    scalor_mod.relaxed_bernoulli_rsample = lambda logits, tau: logits / tau


def _gradients(model, seq, forward=None):
    out = (forward or model)(seq, step=40_000, tau=0.7)   # gradients cross frames too
    out.loss().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _worker(rank, world, init_file, seq, result_file):
    torch.set_num_threads(1)
    _deterministic_sampling()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = scalor_mod.SCALOR(small_config(seq_len=3, observe_frames=1)).double().train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    per = seq.shape[0] // world
    grads = _gradients(model, seq[rank * per:(rank + 1) * per], ddp)
    if rank == 0:
        torch.save(grads, result_file)
    dist.destroy_process_group()


def test_two_processes_match_one_process_gradients(tmp_path):
    g = torch.Generator().manual_seed(3)
    seq = torch.rand(4, 3, 3, 64, 64, generator=g, dtype=torch.float64)   # fp64: rounding out of the way
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), seq, str(tmp_path / "grads.pt")), nprocs=2, join=True)
    two = torch.load(tmp_path / "grads.pt")

    real = (scalor_mod.normal_rsample, scalor_mod.relaxed_bernoulli_rsample)
    try:
        _deterministic_sampling()
        torch.manual_seed(0)
        model = scalor_mod.SCALOR(small_config(seq_len=3, observe_frames=1)).double().train()
        one = _gradients(model, seq)
    finally:
        scalor_mod.normal_rsample, scalor_mod.relaxed_bernoulli_rsample = real
    assert one.abs().sum() > 0
    # in float64 the two differ only by summation order: relative error of the whole gradient < 1e-10
    # (in float32 it is ~2e-5, the rounding of gradients that cross frames)
    assert (two - one).norm() / one.norm() < 1e-10


def _train(args, nproc=None, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    return subprocess.run(launcher + [str(ROOT / "train.py")] + args, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_torchrun_job_logs_once_and_resumes_with_one_process(tmp_path):
    flags = ["--small", "--seq-len", "3", "--batch-size", "2", "--print-freq", "2", "--generate-freq", "3",
             "--save-freq", "2", "--num-sprite-sequences", "16", "--workers", "0", "--device", "cpu",
             "--ckpt-dir", str(tmp_path / "ck"), "--summary-dir", str(tmp_path / "sm")]
    job = _train(flags + ["--steps", "3"], nproc=2)
    assert job.returncode == 0, job.stderr[-2000:]
    assert "x 2 processes" in job.stdout
    events = [p for p in (tmp_path / "sm").iterdir() if p.name.startswith("events")]
    assert len(events) == 1
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["ckpt_00000002.pt", "ckpt_00000003.pt"]
    payload = torch.load(tmp_path / "ck" / "ckpt_00000003.pt", weights_only=False)
    assert payload["world_size"] == 2 and len(payload["rng_ranks"]) == 2
    # 16 sequences / (2 per process x 2 processes) = 4 global batches per epoch: after 3 steps, batch 3
    assert (payload["epoch"], payload["batch_index"]) == (0, 3)

    resumed = _train(flags + ["--steps", "5", "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "written by 2 processes, this run has 1" in resumed.stdout
    lines = (tmp_path / "sm" / "losses.jsonl").read_text().splitlines()
    assert [eval(line.replace("false", "False"))["step"] for line in lines] == [1, 2, 3, 4, 5]
    after = torch.load(tmp_path / "ck" / "ckpt_00000005.pt", weights_only=False)
    # one process continues from sequence 12 of the epoch in batches of 2: batch 6, then 7, 8 -> epoch 1, batch 0
    assert (after["epoch"], after["batch_index"]) == (1, 0)


def test_cuda_graph_refused_under_torchrun(tmp_path):
    job = _train(["--small", "--cuda-graph", "--device", "cpu", "--steps", "1", "--ckpt-dir", str(tmp_path / "ck"),
                  "--summary-dir", str(tmp_path / "sm")], nproc=2)
    assert job.returncode != 0
    assert "--cuda-graph works in single-process runs only" in job.stderr
    assert not (tmp_path / "ck").exists()
