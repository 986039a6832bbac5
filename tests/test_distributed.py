"""Data-parallel runs on 2 CPU processes (gloo), spawned by the tests."""

import pytest
import torch.distributed as dist
from _distributed_workers import launch, sharded_mfac

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")


def test_sharded_mfac_equals_one_process_and_resumes_per_rank(tmp_path):
    """2-rank DDP == 1 process on the global batch (through wrap-around); per-rank memory is
    1/world; per-rank checkpoints resume bit-identically; wrong rank or world is refused; a
    NaN in one rank's gradient raises on every rank instead of hanging the others."""
    launch(sharded_mfac, str(tmp_path))
