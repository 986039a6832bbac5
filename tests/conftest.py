import os

import torch

# Without a GPU, Triton kernels are tested in its interpreter; it must be
# chosen before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests' problems are tiny: a thread pool is pure overhead for them, and on a
# busy machine a second OpenMP thread waiting for a core makes them ~10x slower.
torch.set_num_threads(1)
