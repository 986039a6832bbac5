"""Data-parallel runs on 2 CPU processes (gloo), spawned by the tests."""

import pytest
import torch.distributed as dist
from _distributed_workers import (
    fsdp_sparse_mfac,
    launch,
    low_rank_ddp,
    low_rank_fsdp,
    mfac_through_dcp,
    sharded_grafted_mfac,
    sharded_mfac,
    sharded_sparse_mfac,
)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")


def test_sharded_mfac_equals_one_process_and_resumes_per_rank(tmp_path):
    """2-rank DDP == 1 process on the global batch (through wrap-around); per-rank memory is
    1/world; per-rank checkpoints resume bit-identically; wrong rank or world is refused; a
    NaN in one rank's gradient raises on every rank instead of hanging the others."""
    launch(sharded_mfac, str(tmp_path))


def test_sparse_mfac_under_ddp_equals_shard_local_selection_in_one_process():
    launch(sharded_sparse_mfac)


def test_grafted_and_prior_mfac_under_ddp_equal_one_process():
    launch(sharded_grafted_mfac)


def test_ddp_example_runs_under_torchrun(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # --standalone: the rendezvous store binds a port the system picks as it listens (a
    # port found free beforehand could be taken by another process in between)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    example = [str(root / "examples" / "ddp_mfac.py"), "--epochs", "1"]
    result = subprocess.run(
        [*torchrun, "--nproc_per_node", "2", *example],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "epoch 1: test loss" in result.stdout
    assert "gradient window per rank" in result.stdout


def test_low_rank_optimisers_under_ddp_equal_one_process_on_every_rank():
    launch(low_rank_ddp)


def test_fsdp2_every_rank_steps_its_rows(tmp_path):
    """GaLoreAdamW, NaturalGaLore, DCTAdamW and MFAC under fully_shard == one process, with
    uneven shards, both projection sides and refreshes; per-rank checkpoints resume exactly;
    NaN in one rank's rows raises everywhere; SST refuses sharded weights."""
    launch(low_rank_fsdp, str(tmp_path))


def test_sparse_mfac_under_fsdp2_keeps_each_ranks_own_top_k():
    launch(fsdp_sparse_mfac)


def test_mfac_resumes_through_distributed_checkpoint_under_fsdp2_and_ddp(tmp_path):
    launch(mfac_through_dcp, str(tmp_path))
