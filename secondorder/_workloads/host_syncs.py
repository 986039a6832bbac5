"""Host synchronisations per optimiser step, counted by instrumenting the calls that make them.

The measuring half of ``benchmarks/host_syncs.py`` (which prints the tables of
docs/benchmarks.md), shared with ``tests/test_host_syncs.py``, which fails if a step gains
a synchronisation.

On a GPU, reading a tensor's value on the host waits for every kernel queued before it:
``Tensor.item``, ``tolist``, ``cpu``, ``numpy``, and ``bool``/``float``/``int``/``index``
of a tensor. Copying host data to the device with ``torch.tensor(data, device=...)`` waits
too. Both are counted here on any device, by wrapping those calls, so that a CPU-only
machine counts what a GPU would wait for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch

_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@dataclasses.dataclass
class Sync:
    kind: str  # "read: item", ..., or "copy to device"
    where: str  # the innermost frame of the library (file:line function), else the caller


def _where() -> str:
    frames = traceback.extract_stack()[:-2]
    ours = [f for f in frames if "secondorder" in f.filename and "host_syncs" not in f.filename]
    frame = ours[-1] if ours else frames[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"


_MARK = "host_syncs.read"


@contextlib.contextmanager
def counting_syncs() -> Iterator[list[Sync]]:
    """Record every host read of a tensor's value, and every ``torch.tensor`` built on a
    device, while the context is open (not thread-safe; for measurements and tests).

    Reads made from Python are caught by wrapping the methods; reads made inside torch's
    C++ (``torch.linalg.cholesky`` checking LAPACK's ``info``, say) by the profiler, as
    ``aten::_local_scalar_dense`` events outside the wrapped calls, credited to the
    operator that made them. The list is complete when the context exits."""
    from torch.profiler import ProfilerActivity, profile, record_function

    syncs: list[Sync] = []
    depth = [0]  # a read made inside another (e.g. tolist calling item) counts once
    originals = {name: getattr(torch.Tensor, name) for name in _READS}
    original_tensor = torch.tensor

    def wrap(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            if depth[0]:
                return original(self, *args, **kwargs)
            syncs.append(Sync(f"read: {name.strip('_')}", _where()))
            depth[0] += 1
            try:
                with record_function(_MARK):
                    return original(self, *args, **kwargs)
            finally:
                depth[0] -= 1

        return read

    def tensor(data, *args, **kwargs):
        if kwargs.get("device") is not None and not depth[0]:
            syncs.append(Sync("copy to device", _where()))
        return original_tensor(data, *args, **kwargs)

    for name in _READS:
        setattr(torch.Tensor, name, wrap(name))
    torch.tensor = tensor
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            yield syncs
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        torch.tensor = original_tensor
    for event in prof.events():
        if event.name != "aten::_local_scalar_dense":
            continue
        chain = []
        parent = event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        if _MARK not in chain:  # a read inside an operator, not one made from Python
            operators = [name for name in chain if name.startswith("aten::")]
            syncs.append(Sync("read inside torch", operators[-1] if operators else "?"))


CONFIGS = {
    "dense": {},
    "dense, momentum": {"momentum": 0.9},
    "dense, graft adam": {"graft": "adam"},
    "dense, graft adagrad + momentum": {"graft": "adagrad", "momentum": 0.9},
    "dense, relative damping": {"relative_damp": 0.01},
    "sparse 10%": {"density": 0.1},
    "sparse 10%, graft adam": {"density": 0.1, "graft": "adam"},
    "dense, Adam's prior": {"prior": "adam"},
    "sparse 10%, Adam's prior": {"density": 0.1, "prior": "adam"},
}


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5))


@dataclasses.dataclass
class Steps:
    """The syncs of each counted step, by kind of step."""

    first: list[list[Sync]]  # the first step (per-member constants are copied to the device)
    filling: list[list[Sync]]  # the other steps until the window is full
    steady: list[list[Sync]]
    refactor: list[list[Sync]]  # with the rank-2 policy, the steps that refactor


def syncs_per_step(settings: dict, factor_update: str, num_grads: int = 8, steps: int = 3) -> Steps:
    """The syncs of each step of MFAC with ``settings``, its small system kept current by
    ``factor_update`` once full (``"refactor"``: every step is a refactorisation, and the
    steady state; ``"rank2"``: every ``num_grads``-th step refactors)."""
    from secondorder.optim import MFAC

    net = model()
    # plain M-FAC unless the configuration grafts
    optimizer = MFAC(net.parameters(), lr=0.01, num_grads=num_grads, **({"graft": None} | settings))
    gen = torch.Generator().manual_seed(1)

    def step() -> None:
        inputs = torch.randn(16, 20, generator=gen)
        targets = torch.randint(0, 5, (16,), generator=gen)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(inputs), targets).backward()
        optimizer.step()

    counted = Steps([], [], [], [])
    for i in range(num_grads):
        with counting_syncs() as syncs:
            step()
        (counted.filling if i else counted.first).append(syncs)
    step()  # full, and one more
    optimizer.window.factor_update = factor_update
    total = steps if factor_update == "refactor" else num_grads + steps
    for _ in range(total):
        before = optimizer.window.num_refactors
        with counting_syncs() as syncs:
            step()
        refactored = optimizer.window.num_refactors > before
        if refactored and factor_update == "rank2":
            counted.refactor.append(syncs)
        else:
            counted.steady.append(syncs)
    return counted


GAP = 4  # refreshes every 4 steps in the projected part

#: name → (build the optimiser for a model, whether call i of step() refreshes)
PROJECTED: dict[str, tuple] = {}


def _projected_groups(net: torch.nn.Module, gap: int) -> list[dict]:
    params = list(net.parameters())
    return [
        {"params": [p for p in params if p.dim() < 2]},
        {"params": [p for p in params if p.dim() >= 2], "rank": 4, "update_proj_gap": gap},
    ]


def projected_configs() -> dict[str, tuple]:
    from secondorder.nn import to_spectral
    from secondorder.optim import SST, DCTAdamW, GaLoreAdamW, NaturalGaLore

    def every(gap: int, phase: int = 0):
        return lambda i: i % gap == phase

    return {
        "GaLoreAdamW": (lambda n, **k: GaLoreAdamW(_projected_groups(n, GAP), **k), every(GAP)),
        "DCTAdamW (refresh every step, its default)": (
            lambda n, **k: DCTAdamW(_projected_groups(n, 1), **k),
            lambda i: False,  # every step refreshes: that is the steady state
        ),
        "DCTAdamW": (lambda n, **k: DCTAdamW(_projected_groups(n, GAP), **k), every(GAP)),
        "NaturalGaLore": (
            lambda n, **k: NaturalGaLore(_projected_groups(n, GAP), history=4, **k),
            every(GAP),
        ),
        "SST": (lambda n, **k: SST(_projected_groups(n, GAP), **k), every(GAP)),
        "SST, spectral mode": (  # a round ends on its last step
            lambda n, **k: SST(to_spectral(n, 4), update_proj_gap=GAP, **k),
            every(GAP, GAP - 1),
        ),
    }


@dataclasses.dataclass
class ProjectedSteps:
    """The syncs of each counted step of a projected optimiser, by kind of step."""

    first: list[list[Sync]]  # the first step (the state is created)
    steady: list[list[Sync]]
    refresh: list[list[Sync]]  # a new basis (SST: a round boundary)
    report: list[list[Sync]]  # skip_on_device: steady steps that read the skip count
    poisoned: list[list[Sync]] = dataclasses.field(default_factory=list)  # NaN gradients


def projected_syncs_per_step(
    name: str, nonfinite: str, steps: int = 3 * GAP + 2, report_every: int = 7, poison=()
) -> ProjectedSteps:
    """The syncs of each of ``steps`` steps of the projected optimiser ``name`` (of
    :data:`PROJECTED`) under ``nonfinite``, reading the skip count every ``report_every``
    steps; the steps in ``poison`` get a NaN gradient (and are listed apart: after a skip
    the refreshes come a step later than the step numbers say)."""
    if not PROJECTED:
        PROJECTED.update(projected_configs())
    build, refreshes = PROJECTED[name]
    net = model()
    extra = {"skip_report_every": report_every} if nonfinite == "skip_on_device" else {}
    optimizer = build(net, lr=0.01, nonfinite=nonfinite, **extra)
    gen = torch.Generator().manual_seed(1)
    counted = ProjectedSteps([], [], [], [])
    for i in range(steps):
        inputs = torch.randn(16, 20, generator=gen)
        targets = torch.randint(0, 5, (16,), generator=gen)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(inputs), targets).backward()
        if i in poison:
            grad = next(p.grad for p in net.parameters() if p.grad is not None)
            grad[0] = float("nan")
        with counting_syncs() as syncs:
            optimizer.step()
        if i in poison:
            counted.poisoned.append(syncs)
        elif i == 0:
            counted.first.append(syncs)
        elif refreshes(i):
            counted.refresh.append(syncs)
        elif extra and (i + 1) % report_every == 0:
            counted.report.append(syncs)
        else:
            counted.steady.append(syncs)
    return counted
