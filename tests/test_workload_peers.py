"""The benchmarks' peers (Muon on the hidden matrices with AdamW for the rest) and the
held-out check's corpus."""

import pytest
import torch

from secondorder._workloads.data import load_stdlib_corpus, load_stdlib_prose
from secondorder._workloads.models import tiny_llama
from secondorder._workloads.peers import OptimizerChain, hidden_matrices, muon_with_adamw
from secondorder._workloads.training import optimizer_state_bytes


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_llama(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24)


def _train(model, optimizer, steps: int = 3) -> None:
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 256, (2, 8), generator=generator)
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()


def test_hidden_matrices_are_the_attention_and_mlp_weights():
    model = _llama()
    names = {id(p): n for n, p in model.named_parameters()}
    hidden = [names[id(p)] for p in hidden_matrices(model)]
    assert len(hidden) == 7  # q, k, v, o, gate, up, down
    assert all("self_attn" in n or "mlp" in n for n in hidden)


def test_chain_steps_as_muon_and_adamw_side_by_side_under_one_schedule():
    """The chain's trajectory equals Muon and AdamW each stepped with its own scheduler,
    and its state is theirs."""
    chained = _llama()
    chain = muon_with_adamw(chained, lr=1e-2)
    _train(chained, chain)

    apart = _llama()
    matrices = hidden_matrices(apart)
    rest = [p for p in apart.parameters() if all(p is not m for m in matrices)]
    muon = torch.optim.Muon(matrices, lr=1e-2, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(rest, lr=1e-2, weight_decay=0.0)
    scheduled = [
        torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (s + 1)) for o in (muon, adamw)
    ]
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, 256, (2, 8), generator=generator)
        muon.zero_grad()
        adamw.zero_grad()
        apart(input_ids=ids, labels=ids).loss.backward()
        muon.step()
        adamw.step()
        for scheduler in scheduled:
            scheduler.step()

    for a, b in zip(chained.parameters(), apart.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [g["lr"] for g in chain.param_groups] == [muon.param_groups[0]["lr"]] * 2
    assert optimizer_state_bytes(chain) == optimizer_state_bytes(muon) + optimizer_state_bytes(
        adamw
    )


def test_chain_refuses_a_parameter_held_twice_and_an_empty_chain():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="two optimizers"):
        OptimizerChain(torch.optim.SGD([p], lr=0.1), torch.optim.SGD([p], lr=0.1))
    with pytest.raises(ValueError, match="at least one"):
        OptimizerChain()


def test_muon_refuses_a_model_without_hidden_matrices():
    with pytest.raises(ValueError, match="no hidden matrix"):
        muon_with_adamw(torch.nn.Linear(4, 2), lr=1e-3)


def test_prose_corpus_is_not_the_code_corpus():
    prose = load_stdlib_prose()
    assert len(prose.train) > 300_000
    assert len(prose.valid) == pytest.approx(0.2 * (len(prose.train) + len(prose.valid)), abs=1)
    code = load_stdlib_corpus(50_000)
    assert not set(prose.files) & set(code.files)
    text = bytes(prose.train[:2000].tolist()).decode()
    assert "def " not in text and "statement" in text
    with pytest.raises(ValueError, match="valid_fraction"):
        load_stdlib_prose(valid_fraction=1.0)
