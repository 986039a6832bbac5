"""M-FAC under data parallelism, with the gradient window sharded over the ranks.

    torchrun --nproc_per_node 2 examples/ddp_mfac.py            # CPU, gloo
    torchrun --nproc_per_node 8 examples/ddp_mfac.py --backend nccl   # one GPU per rank

Each rank trains on its share of every batch of scikit-learn's digits; DDP
averages the gradients, and MFAC(process_group=...) keeps only this rank's
1/world of the window: the numbers printed at the end show the memory per rank.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from secondorder._workloads.data import load_digits
from secondorder._workloads.models import digits_cnn
from secondorder._workloads.training import evaluate
from secondorder.curvature import SlidingWindowMFAC
from secondorder.optim import MFAC


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--num-grads", type=int, default=64)
    args = parser.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(
        f"cuda:{int(os.environ['LOCAL_RANK'])}" if args.backend == "nccl" else "cpu"
    )
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights on every rank

    train, test = load_digits()
    model = DistributedDataParallel(digits_cnn().to(device))
    # the demo's setting for this CNN: MFAC's defaults (Adam's diagonal as prior), lr 1e-2
    optimizer = MFAC(
        model.parameters(),
        lr=1e-2,
        num_grads=args.num_grads,
        process_group=dist.group.WORLD,
    )
    order = torch.Generator().manual_seed(
        0
    )  # every rank draws the same batches and takes its share
    for epoch in range(args.epochs):
        model.train()
        for inputs, targets in train.batches(args.batch_size, order):
            inputs, targets = inputs[rank::world].to(device), targets[rank::world].to(device)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
        loss, accuracy = evaluate(model.module.cpu(), test)
        model.module.to(device)
        if rank == 0:
            print(f"epoch {epoch + 1}: test loss {loss:.4f}, accuracy {accuracy:.4f}", flush=True)

    window = optimizer.window
    shard = window.nbytes  # this rank's gradients, its spare row and the n × n system
    full = SlidingWindowMFAC.estimate_bytes(
        sum(p.numel() for p in model.parameters()), window.num_grads, window.storage_dtype
    )
    if rank == 0:
        print(
            f"gradient window per rank: {shard / 2**20:.1f} MiB (one process would hold {full / 2**20:.1f} MiB)"
        )
    dist.barrier()  # no rank closes its connections while another still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
