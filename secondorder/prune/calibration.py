"""Calibration for layer-wise pruning: what the linear layers of a model see on sample data.

Layer-wise pruners (SparseGPT, Wanda) need a statistic of each layer's inputs:
``XXᵀ`` or the norm of each input feature, over every token of the calibration
data. Forward pre-hooks on the layers collect them while the model runs.

The layers are processed block by block (a decoder layer of a transformer, or a
single layer elsewhere), and each block is calibrated on what the blocks before
it output *after* they were pruned, as SparseGPT does. Two ways get there:

- **Sequential** (:class:`BlockInputs`), when each block's output is the next
  block's input, as for the decoder layers of a transformer: one pass over the
  data records what the first block receives and the keyword arguments every
  block receives (attention mask, position embeddings, …), the blocks computing
  on the first batch only (which shows that they are chained) and passing their
  input through on the others; then each block runs once on its cached inputs
  to calibrate, and once more, pruned, to give the next block its inputs. Cost
  linear in depth; each block can be moved to a compute device alone
  (:func:`on_device`) while the rest of the model stays where it is.
- **Re-run** (:func:`calibrate`), for any other model (an ``nn.Sequential`` MLP,
  whose blocks are single layers with activations between them): the model runs
  from its input again for every block and stops once the block has run; the
  earlier blocks are already pruned in place, so what reaches the block is the
  same. Cost quadratic in depth.

Both give the same statistics: a block runs on the same inputs with the same
arguments either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from .._common import to_device
from .targets import PruneTarget, refresh_pruned_weights

__all__ = [
    "Block",
    "BlockInputs",
    "InputStatistic",
    "calibrate",
    "calibration_mode",
    "collecting",
    "group_by_block",
    "linear_weights",
    "on_device",
    "run_model",
]


class InputStatistic(Protocol):
    """Accumulates something about a layer's inputs, one batch of ``[tokens, features]`` at a time."""

    def add(self, inputs: torch.Tensor) -> None: ...


class _StopForward(Exception):
    """Raised by a hook once the block being calibrated has run: the rest of the model is not needed."""


def linear_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The weights of every ``nn.Linear`` that requires grad, except the output layer.

    The output layer is what a Hugging Face model's ``get_output_embeddings()``
    returns (``lm_head``), or a submodule named ``lm_head``; a model with neither
    (an ``nn.Sequential`` classifier) has every linear layer pruned. Embeddings are
    not ``nn.Linear`` and are never included.
    """
    output = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        output = getter()
    return [
        (module, "weight")
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module is not output
        and name.rpartition(".")[2] != "lm_head"
        and getattr(module, "weight_orig", module.weight).requires_grad
    ]


Block = tuple[nn.Module, list[PruneTarget]]


def group_by_block(model: nn.Module, targets: Iterable[PruneTarget]) -> list[Block]:
    """The targets grouped by the block that holds them, blocks and targets in registration order.

    A block is an element of the outermost ``nn.ModuleList`` containing the layer
    (a transformer's decoder layers: ``model.model.layers[i]`` in a Hugging Face
    Llama); a layer in no ``nn.ModuleList`` is a block on its own (so an
    ``nn.Sequential`` MLP is pruned one layer after another).
    """
    block_of: dict[int, nn.Module] = {}
    for module in model.modules():  # pre-order: an outer list is seen before an inner one
        if isinstance(module, nn.ModuleList):
            for element in module:
                for inner in element.modules():
                    block_of.setdefault(id(inner), element)
    order = {id(module): index for index, module in enumerate(model.modules())}
    groups: dict[int, Block] = {}
    for target in sorted(targets, key=lambda t: order[id(t.module)]):
        block = block_of.get(id(target.module), target.module)
        groups.setdefault(id(block), (block, []))[1].append(target)
    return sorted(groups.values(), key=lambda group: order[id(group[0])])


def run_model(model: nn.Module, batch: Any, device: torch.device) -> Any:
    """Call ``model`` on one calibration batch.

    A batch is a tensor of inputs (``model(x)``), a mapping of keyword inputs
    (``model(**batch)``, as a Hugging Face model takes ``input_ids``,
    ``attention_mask``, …), or an ``(inputs, targets)`` pair whose targets are
    ignored and whose inputs are either of the above.
    """
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise TypeError(
                f"a calibration batch given as a sequence must be an (inputs, targets) pair, "
                f"got {len(batch)} items"
            )
        batch = batch[0]
    if isinstance(batch, Mapping):
        return model(**{key: to_device(value, device) for key, value in batch.items()})
    if isinstance(batch, torch.Tensor):
        return model(batch.to(device))
    raise TypeError(
        "a calibration batch must be a tensor of inputs, a dict of keyword inputs or an "
        f"(inputs, targets) pair, got {type(batch).__name__}"
    )


@contextlib.contextmanager
def calibration_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, and no key/value cache for a Hugging Face model (``config.use_cache``), restored after.

    A block run again on recorded arguments must not find a cache that an
    earlier run filled (the references set ``use_cache = False`` too).
    """
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if use_cache:
        config.use_cache = False  # type: ignore[union-attr]
    try:
        yield
    finally:
        model.train(was_training)
        if use_cache:
            config.use_cache = use_cache  # type: ignore[union-attr]


@contextlib.contextmanager
def collecting(statistics: Mapping[nn.Module, InputStatistic]) -> Iterator[None]:
    """Feed every call's input of each layer to its statistic, flattened to ``[tokens, features]``.

    ``statistics`` maps each layer (a module whose first argument is its input)
    to the :class:`InputStatistic` that receives its inputs.
    """

    def collector(statistic: InputStatistic):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs = args[0] if args else kwargs["input"]
            statistic.add(inputs.detach().reshape(-1, inputs.shape[-1]))

        return hook

    handles = [
        layer.register_forward_pre_hook(collector(statistic), with_kwargs=True)
        for layer, statistic in statistics.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _ensure_batches(batches: int) -> None:
    if batches == 0:
        raise ValueError(
            "data yielded no batches; pass a re-iterable of calibration batches such as a list "
            "or a DataLoader"
        )


@torch.no_grad()
def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    block: nn.Module,
    statistics: Mapping[nn.Module, InputStatistic],
    device: torch.device,
) -> int:
    """Run ``model`` over ``data`` up to the end of ``block``, feeding each layer's inputs to its statistic.

    The re-run calibration of the module docstring: batches are moved to
    ``device`` (where the model takes its inputs) and the model runs in eval mode
    (:func:`calibration_mode`). Returns the number of batches.
    """

    def stop(*_: Any) -> None:
        raise _StopForward

    batches = 0
    with calibration_mode(model), collecting(statistics):
        handle = block.register_forward_hook(stop)
        try:
            for batch in data:
                with contextlib.suppress(_StopForward):
                    run_model(model, batch, device)
                batches += 1
        finally:
            handle.remove()
    _ensure_batches(batches)
    return batches


def _device_of(module: nn.Module) -> torch.device | None:
    """The device of ``module``'s first parameter (or buffer); ``None`` if it holds neither."""
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return None


def _move(module: nn.Module, device: torch.device) -> None:
    module.to(device)
    refresh_pruned_weights(module)  # the product weight = weight_orig * weight_mask is not moved


@contextlib.contextmanager
def on_device(block: nn.Module, device: torch.device) -> Iterator[None]:
    """``block`` moved to ``device`` for the duration and back to its own device after (no-op if there)."""
    home = _device_of(block)
    if home is None or home == device:
        yield
        return
    _move(block, device)
    try:
        yield
    finally:
        _move(block, home)


@contextlib.contextmanager
def blocks_on_device(blocks: Sequence[nn.Module], device: torch.device) -> Iterator[None]:
    """While the model runs, each block is moved to ``device`` for its own call, with its inputs.

    Its output is moved back to the block's own device, where the rest of the
    model is: only one block is on ``device`` at a time.
    """
    homes = {id(block): _device_of(block) for block in blocks}
    moving = [block for block in blocks if homes[id(block)] not in (None, device)]

    def before(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        _move(module, device)
        return to_device(args, device), to_device(kwargs, device)

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        home = homes[id(module)]
        assert home is not None
        _move(module, home)
        return to_device(output, home)

    handles = [b.register_forward_pre_hook(before, with_kwargs=True) for b in moving]
    handles += [b.register_forward_hook(after, with_kwargs=True) for b in moving]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hidden_of(output: Any) -> torch.Tensor | None:
    """What a block passes on to the next: its output, or the first item of a tuple of outputs."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _store(value: Any, device: torch.device, moved: dict[int, tuple[Any, Any]]) -> Any:
    """``value`` with its tensors on ``device``, each tensor moved once however often it appears.

    ``moved`` keeps the originals alive, so that their ids stay unique.
    """
    if isinstance(value, torch.Tensor):
        if id(value) not in moved:
            moved[id(value)] = (value, value.to(device))
        return moved[id(value)][1]
    if isinstance(value, dict):
        return {key: _store(item, device, moved) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_store(item, device, moved) for item in value)
    return value


#: what a block returned: ``None`` for a tensor, else the length of a plain tuple
_Form = int | None


def _form_of(output: Any) -> _Form | bool:
    """``None`` for a tensor, the length of a plain tuple led by a tensor, ``False`` for anything else."""
    if isinstance(output, torch.Tensor):
        return None
    if type(output) is tuple and output and isinstance(output[0], torch.Tensor):
        return len(output)
    return False


@contextlib.contextmanager
def _passing_through(blocks: Sequence[nn.Module], forms: Sequence[_Form]) -> Iterator[None]:
    """Each block returns its input unchanged, in the form it returned its output.

    While recording the arguments the blocks receive, their computation is not
    needed (and the first batch showed that nothing runs between them).
    """

    def passthrough(form: _Form) -> Any:
        def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return hidden if form is None else (hidden, *([None] * (form - 1)))

        return forward

    saved = [block.__dict__.get("forward") for block in blocks]
    for block, form in zip(blocks, forms, strict=True):
        block.forward = passthrough(form)
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


class _Recorder:
    """Forward hooks on the blocks that record what each receives and check that they are chained."""

    def __init__(self, blocks: Sequence[nn.Module], storage: torch.device) -> None:
        self.blocks = blocks
        self.position = {id(block): index for index, block in enumerate(blocks)}
        self.storage = storage
        self.hidden: list[torch.Tensor] = []
        self.arguments: list[list[tuple[tuple, dict]]] = []
        self.forms: list[_Form | bool] = []
        self.chained = True
        self.next = 0  # the block expected to be called next
        self.output: torch.Tensor | None = None  # what the previous block passed on
        self.moved: dict[int, tuple[Any, Any]] = {}

    def start_batch(self) -> None:
        self.next, self.output, self.moved = 0, None, {}
        self.arguments.append([])
        self.forms = []

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        index = self.position[id(module)]
        in_order = index == self.next and args and isinstance(args[0], torch.Tensor)
        if not in_order or (index > 0 and args[0] is not self.output):
            self.chained = False
            raise _StopForward
        if index == 0:
            self.hidden.append(_store(args[0], self.storage, self.moved))
        self.arguments[-1].append(_store((args[1:], kwargs), self.storage, self.moved))
        self.next = index + 1
        if index == len(self.blocks) - 1:
            raise _StopForward

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.output = _hidden_of(output)
        self.forms.append(_form_of(output))

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        handles = [
            b.register_forward_pre_hook(self.before, with_kwargs=True, prepend=True)
            for b in self.blocks
        ]
        handles += [b.register_forward_hook(self.after, with_kwargs=True) for b in self.blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class BlockInputs:
    """What the current block receives on every calibration batch: the sequential calibration.

    Holds, per batch, the input of the block being processed (the first
    positional argument, what the block before it returned) and, per block and
    batch, the other arguments that the model gives it (attention mask,
    position embeddings, flags). :meth:`capture` records them in one pass of the
    model; :meth:`calibrate` runs a block on them with the statistics collected;
    :meth:`advance` replaces them by the block's outputs, the next block's inputs.
    Tensors are kept on ``storage`` (the CPU, to offload them, or the compute device).
    """

    def __init__(
        self,
        hidden: list[torch.Tensor],
        arguments: list[list[tuple[tuple, dict]]],
        storage: torch.device,
    ) -> None:
        self.hidden = hidden
        self.arguments = (
            arguments  # [batch][block] -> (positional arguments after the first, keywords)
        )
        self.storage = storage

    @classmethod
    @torch.no_grad()
    def capture(
        cls,
        model: nn.Module,
        data: Iterable[Any],
        blocks: Sequence[nn.Module],
        *,
        input_device: torch.device,
        storage: torch.device,
        device: torch.device,
    ) -> BlockInputs | None:
        """Run ``model`` over ``data`` up to the last block, recording what each block receives.

        On the first batch the blocks run, on ``device`` one at a time
        (:func:`blocks_on_device`); on the others they pass their input through
        unchanged, since only their arguments are recorded. The last block never
        runs. Returns ``None`` when the blocks are not chained, that is when on
        some batch they are not called in order, once each, each taking as its
        first argument exactly what the previous one returned (an activation
        between them, a block called twice, blocks of the model skipped): the
        re-run calibration then applies.
        """
        recorder = _Recorder(blocks, storage)
        forms: list[_Form] | None = None
        with calibration_mode(model):
            for batch in data:
                recorder.start_batch()
                with contextlib.ExitStack() as stack:
                    if forms is None:
                        stack.enter_context(blocks_on_device(blocks, device))
                    else:
                        stack.enter_context(_passing_through(blocks[:-1], forms))
                    stack.enter_context(recorder.hooked())
                    with contextlib.suppress(_StopForward):
                        run_model(model, batch, input_device)
                if not recorder.chained or recorder.next != len(blocks):
                    return None
                if forms is None and all(form is not False for form in recorder.forms):
                    forms = recorder.forms
        _ensure_batches(len(recorder.hidden))
        return cls(recorder.hidden, recorder.arguments, storage)

    def _run(self, block: nn.Module, index: int, batch: int, device: torch.device) -> Any:
        args, kwargs = self.arguments[batch][index]
        inputs = self.hidden[batch].to(device)
        return block(inputs, *to_device(args, device), **to_device(kwargs, device))

    @torch.no_grad()
    def calibrate(
        self,
        block: nn.Module,
        index: int,
        statistics: Mapping[nn.Module, InputStatistic],
        device: torch.device,
    ) -> None:
        """Run block number ``index`` (on ``device``) on every batch, feeding its layers' inputs to their statistics."""
        with collecting(statistics):
            for batch in range(len(self.hidden)):
                self._run(block, index, batch, device)

    @torch.no_grad()
    def advance(self, block: nn.Module, index: int, device: torch.device) -> None:
        """Replace the inputs of block ``index`` by its outputs, one batch at a time."""
        for batch in range(len(self.hidden)):
            output = _hidden_of(self._run(block, index, batch, device))
            assert output is not None, "capture() saw this block return a tensor"
            self.hidden[batch] = output.to(self.storage)
