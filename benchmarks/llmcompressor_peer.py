"""llm-compressor's side of ``benchmarks/llmcompressor_bench.py``: one ``oneshot`` call.

Run by that script with the Python of a separate environment that has llmcompressor
(it pins its own transformers), never imported by the library::

    /tmp/llmc/bin/python benchmarks/llmcompressor_peer.py --check
    /tmp/llmc/bin/python benchmarks/llmcompressor_peer.py --model DIR --calibration FILE \
        --method "SparseGPT 50%" --out FILE [--threads 1]

It loads the dense model saved in ``DIR`` (``save_pretrained``), calibrates on the
token windows of ``FILE`` (a ``[sequences, length]`` tensor, in order, batches of
``--batch-size``) with the modifier matching ``--method``, and writes the compressed
weights (dequantized for GPTQ) to ``--out``; it prints the wall time and peak memory
of the ``oneshot`` call as one line of JSON. Peak memory is measured as on our side
(``secondorder/_workloads/measure.py``, loaded from its file so that the library's
package is not imported here).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch

MEASURE = Path(__file__).resolve().parents[1] / "secondorder" / "_workloads" / "measure.py"


def load_measure() -> Any:
    """``secondorder/_workloads/measure.py`` as a standalone module (it needs only torch)."""
    spec = importlib.util.spec_from_file_location("_measure", MEASURE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["_measure"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def recipe(method: str) -> list[Any]:
    """The llm-compressor modifiers that do ``method`` to every linear layer but ``lm_head``.

    GPTQ as ours and the authors': asymmetric min-max grids of 128 input columns, 4 bits,
    no activation ordering (llm-compressor's default is ``actorder="static"``), 1% damping.
    """
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier

    # ``ignore=["lm_head"]`` does not keep the pruning modifiers off the output layer (they
    # name it "lm_head."): the pattern their warning suggests does
    where = {"targets": ["Linear"], "ignore": ["re:.*lm_head"]}
    gptq = {
        "scheme": "W4A16_ASYM",
        "actorder": None,
        "dampening_frac": 0.01,
        "block_size": 128,
        "bypass_divisibility_checks": True,
    }  # down_proj has 344 columns: a partial group
    recipes = {
        "SparseGPT 50%": lambda: [SparseGPTModifier(sparsity=0.5, **where)],
        "SparseGPT 2:4": lambda: [SparseGPTModifier(sparsity=0.5, mask_structure="2:4", **where)],
        "Wanda 50%": lambda: [WandaPruningModifier(sparsity=0.5, **where)],
        "GPTQ 4-bit g128": lambda: [GPTQModifier(**gptq, **where)],
        "SparseGPT 50% + GPTQ 4-bit g128": lambda: [
            SparseGPTModifier(sparsity=0.5, **where),
            GPTQModifier(**gptq, **where),
        ],
    }
    if method not in recipes:
        raise ValueError(f"method must be one of {sorted(recipes)}, got {method!r}")
    return recipes[method]()


def byte_tokenizer() -> Any:
    """A tokenizer of the 256 byte values: ``oneshot`` asks for one even for token ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(256)}
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token="<0>"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<0>", pad_token="<0>")


def compress(args: argparse.Namespace) -> None:
    """Load, calibrate and compress with ``oneshot``; save the weights; print the measurement."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    measure = load_measure()
    windows = torch.load(args.calibration, weights_only=True)
    dataset = Dataset.from_dict({"input_ids": windows.tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    modifiers = recipe(args.method)
    tokenizer = byte_tokenizer()
    with measure.measured(torch.device("cpu")) as measurement:
        model = oneshot(
            model=model, tokenizer=tokenizer, dataset=dataset, recipe=modifiers,
            num_calibration_samples=len(windows), max_seq_length=windows.shape[1],
            batch_size=args.batch_size, shuffle_calibration_samples=False,
        )  # fmt: skip
    weights = {
        name: tensor.detach().clone()
        for name, tensor in model.state_dict().items()
        if name.endswith(".weight")
    }
    torch.save(weights, args.out)
    print(json.dumps({"seconds": measurement.seconds, "peak_bytes": measurement.peak_bytes}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="print llmcompressor's version")
    parser.add_argument("--model", help="folder of the dense model (save_pretrained)")
    parser.add_argument("--calibration", help="file of the calibration token windows")
    parser.add_argument("--method", help="what to do, as llmcompressor_bench.py names it")
    parser.add_argument("--out", help="file to write the compressed weights to")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per batch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    if args.check:
        import llmcompressor

        print(json.dumps({"llmcompressor": llmcompressor.__version__}))
        return
    compress(args)


if __name__ == "__main__":
    main()
