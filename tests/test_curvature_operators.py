import pytest
import torch
from _curvature_oracles import DENSE, LOSSES, MODELS, f64, make_data, tiny_mlp
from torch import nn

from secondorder.curvature import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    NondeterminismError,
)
from secondorder.errors import NonFiniteError

OPERATORS = {"hessian": HessianOperator, "ggn": GGNOperator, "ef": EmpiricalFisherOperator}


@pytest.fixture(scope="module")
def cases():
    """Operator and dense oracle for every (operator, model, loss), built once."""
    built = {}
    for model_name, (make_model, input_shape) in MODELS.items():
        for loss_name, loss_fn in LOSSES.items():
            model = make_model()
            data = make_data(input_shape, loss_name)  # batches of 3, 3 and 1
            params = list(model.parameters())
            for op_name, cls in OPERATORS.items():
                op = cls(model, loss_fn, params, data, chunk_size=4)
                dense = DENSE[op_name](model, loss_fn, params, data)
                built[op_name, model_name, loss_name] = op, dense
    return built


CASES = [(o, m, l) for o in OPERATORS for m in MODELS for l in LOSSES]


@pytest.mark.parametrize("key", CASES, ids=["-".join(k) for k in CASES])
def test_operator_matches_dense_oracle_in_every_format(cases, key):
    op, dense = cases[key]
    assert op.shape == dense.shape and op.dtype == f64
    gen = torch.Generator().manual_seed(1)
    matrix = torch.randn(op.dim, 9, generator=gen, dtype=f64)  # 9 columns: chunks of 4, 4, 1
    torch.testing.assert_close(op @ matrix, dense @ matrix, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op @ matrix[:, 0], dense @ matrix[:, 0], rtol=1e-10, atol=1e-12)
    blocks = [torch.randn(p.shape, generator=gen, dtype=f64) for p in op.params]
    products = op @ blocks
    assert isinstance(products, list)
    assert [p.shape for p in products] == [b.shape for b in blocks]
    flat = torch.cat([b.reshape(-1) for b in blocks])
    torch.testing.assert_close(
        torch.cat([p.reshape(-1) for p in products]), dense @ flat, rtol=1e-10, atol=1e-12
    )
    assert isinstance(op @ tuple(blocks), tuple)
    assert (op @ matrix[:, :0]).shape == (op.dim, 0)


class _WithUnusedLayer(nn.Module):
    """The tiny MLP with a layer that the forward pass never calls: zero Hessian rows."""

    def __init__(self) -> None:
        super().__init__()
        self.body = tiny_mlp()
        self.unused = nn.Linear(2, 2).to(f64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("key", [(m, l) for m in MODELS for l in LOSSES] + [("unused", "mse")])
def test_hessian_by_double_backward_matches_the_oracle(monkeypatch, key):
    """The loop through one kept autograd graph that large batches take (forced here from
    one sample) gives the dense Hessian, unused parameters included (zero rows)."""
    from secondorder.curvature import operators

    monkeypatch.setattr(operators, "_LOOP_FROM_SAMPLES", 1)
    model_name, loss_name = key
    make_model, shape = MODELS.get(model_name, (_WithUnusedLayer, (4,)))
    model = make_model()
    data = make_data(shape, loss_name)  # batches of 3, 3 and 1
    params = list(model.parameters())
    op = HessianOperator(model, LOSSES[loss_name], params, data)
    dense = DENSE["hessian"](model, LOSSES[loss_name], params, data)
    matrix = torch.randn(op.dim, 5, generator=torch.Generator().manual_seed(2), dtype=f64)
    torch.testing.assert_close(op @ matrix, dense @ matrix, rtol=1e-10, atol=1e-12)
    assert op._product_on_batch(dict(model.named_parameters()), *data[0], 3)[1] == 1


def test_columns_per_call_states_the_path_each_batch_takes():
    """The public rule: about 2,048 samples' worth of vectors per vmapped call, at most 16;
    ``chunk_size`` overrides it; the Hessian loops one vector at a time from 512 samples."""
    make_model, shape = MODELS["mlp"]
    model = make_model()
    data = make_data(shape, "mse")
    hessian = HessianOperator(model, LOSSES["mse"], None, data)
    ggn = OPERATORS["ggn"](model, LOSSES["mse"], None, data)
    assert [ggn.columns_per_call(b) for b in (1, 128, 512, 4096)] == [16, 16, 4, 1]
    assert [hessian.columns_per_call(b) for b in (128, 511, 512)] == [16, 4, None]
    chunked = HessianOperator(model, LOSSES["mse"], None, data, chunk_size=3)
    assert [chunked.columns_per_call(b) for b in (1, 512, 4096)] == [3, 3, 3]


@pytest.mark.parametrize("op_name", list(OPERATORS))
def test_short_last_batch_weighs_by_its_samples(op_name):
    """The same seven samples in batches (3, 3, 1), (7,) and (1, 6) give one matrix."""
    make_model, shape = MODELS["mlp"]
    model = make_model()
    loss_fn = LOSSES["cross_entropy"]
    dense = [
        OPERATORS[op_name](model, loss_fn, None, make_data(shape, "cross_entropy", s)).to_dense()
        for s in [(3, 3, 1), (7,), (1, 6)]
    ]
    torch.testing.assert_close(dense[0], dense[1], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(dense[2], dense[1], rtol=1e-10, atol=1e-13)


def test_subset_of_params_is_the_block_of_the_full_matrix():
    model = tiny_mlp()
    data = make_data((4,), "cross_entropy")
    loss_fn = nn.functional.cross_entropy
    full = HessianOperator(model, loss_fn, None, data).to_dense()
    last = list(model.parameters())[2:]  # the last Linear's weight and bias
    block = HessianOperator(model, loss_fn, last, data).to_dense()
    start = sum(p.numel() for p in list(model.parameters())[:2])
    torch.testing.assert_close(block, full[start:, start:], rtol=1e-10, atol=1e-13)


def test_ggn_is_hessian_for_a_linear_model_and_psd():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(f64).eval()
    data = make_data((4,), "cross_entropy")
    loss_fn = nn.functional.cross_entropy
    ggn = GGNOperator(model, loss_fn, None, data).to_dense()
    hessian = HessianOperator(model, loss_fn, None, data).to_dense()
    torch.testing.assert_close(ggn, hessian, rtol=1e-10, atol=1e-13)
    assert torch.linalg.eigvalsh(ggn).min() > -1e-12


class _AttentionClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x).mean(dim=1))


@pytest.mark.parametrize("op_name", list(OPERATORS))
def test_transformer_block_in_eval_mode(op_name):
    """Fused attention (no double backward) and the eval fast path (no forward AD) still work."""
    torch.manual_seed(0)
    model = _AttentionClassifier().to(f64).eval()
    data = make_data((3, 4), "cross_entropy", sizes=(2, 1))
    loss_fn = nn.functional.cross_entropy
    params = [model.block.linear1.weight, model.head.weight]
    op = OPERATORS[op_name](model, loss_fn, params, data)
    v = torch.randn(op.dim, dtype=f64)
    expected = DENSE[op_name](model, loss_fn, params, data) @ v
    torch.testing.assert_close(op @ v, expected, rtol=1e-9, atol=1e-12)


def test_to_scipy_products_and_eigsh():
    from scipy.sparse.linalg import eigsh

    model = tiny_mlp()
    data = make_data((4,), "cross_entropy")
    op = HessianOperator(model, nn.functional.cross_entropy, None, data)
    dense = op.to_dense()
    linear = op.to_scipy()
    x = torch.randn(op.dim, 2, dtype=f64)
    assert linear.dtype == torch.empty((), dtype=f64).numpy().dtype
    torch.testing.assert_close(torch.from_numpy(linear @ x.numpy()), dense @ x)
    torch.testing.assert_close(torch.from_numpy(linear.matvec(x[:, 0].numpy())), dense @ x[:, 0])
    top = eigsh(linear, k=1, which="LA", return_eigenvectors=False)[0]
    assert top == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-8)


def test_loss_and_gradient_over_uneven_batches():
    model = tiny_mlp()
    data = make_data((4,), "cross_entropy")
    op = HessianOperator(model, nn.functional.cross_entropy, None, data)
    loss, gradient = op.loss_and_gradient()
    inputs, targets = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
    expected = nn.functional.cross_entropy(model(inputs), targets)
    expected_grad = torch.autograd.grad(expected, list(model.parameters()))
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(gradient, torch.cat([g.reshape(-1) for g in expected_grad]))


# -- bad input ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_op():
    model = tiny_mlp()
    return HessianOperator(
        model, nn.functional.cross_entropy, None, make_data((4,), "cross_entropy")
    )


def test_wrong_vector_size_dtype_or_values(mlp_op):
    with pytest.raises(ValueError, match=f"length {mlp_op.dim}"):
        mlp_op @ torch.zeros(mlp_op.dim + 1, dtype=f64)
    with pytest.raises(ValueError, match="matrix"):
        mlp_op @ torch.zeros(2, mlp_op.dim, dtype=f64)
    with pytest.raises(TypeError, match="float32"):
        mlp_op @ torch.zeros(mlp_op.dim)
    with pytest.raises(ValueError, match="shaped like params"):
        mlp_op @ [torch.zeros(3, dtype=f64)]
    bad = torch.zeros(mlp_op.dim, dtype=f64)
    bad[3] = float("nan")
    with pytest.raises(NonFiniteError, match="1 NaN or Inf"):
        mlp_op @ bad


def test_params_not_in_the_model_or_repeated():
    model = tiny_mlp()
    data = make_data((4,), "cross_entropy")
    loss_fn = nn.functional.cross_entropy
    with pytest.raises(ValueError, match="not a parameter of the model"):
        HessianOperator(model, loss_fn, [torch.zeros(5, 4, dtype=f64)], data)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        HessianOperator(model, loss_fn, [p.detach().clone() for p in model.parameters()], data)
    weight = model[0].weight
    with pytest.raises(ValueError, match="more than once"):
        HessianOperator(model, loss_fn, [weight, weight], data)
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(model, loss_fn, [], data)


def test_dropout_in_train_mode_is_caught_by_the_check():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).to(f64).train()
    data = make_data((4,), "cross_entropy")
    loss_fn = nn.functional.cross_entropy
    with pytest.raises(NondeterminismError, match=r"model\.eval\(\)"):
        HessianOperator(model, loss_fn, None, data)
    HessianOperator(model.eval(), loss_fn, None, data)  # the cure named in the message works


def test_shuffling_dataloader_is_caught_and_generators_refused():
    model = tiny_mlp()
    inputs, targets = torch.randn(12, 4, dtype=f64), torch.randint(0, 3, (12,))
    dataset = torch.utils.data.TensorDataset(inputs, targets)
    loss_fn = nn.functional.cross_entropy
    shuffled = torch.utils.data.DataLoader(dataset, batch_size=5, shuffle=True)
    with pytest.raises(NondeterminismError, match="shuffle=True"):
        GGNOperator(model, loss_fn, None, shuffled)
    ordered = torch.utils.data.DataLoader(dataset, batch_size=5)
    op = GGNOperator(model, loss_fn, None, ordered)  # DataLoader batches are lists: fine
    torch.testing.assert_close(
        op.to_dense(), GGNOperator(model, loss_fn, None, [(inputs, targets)]).to_dense()
    )
    with pytest.raises(TypeError, match="re-iterable"):
        GGNOperator(model, loss_fn, None, iter([(inputs, targets)]))


@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("op_name", list(OPERATORS))
def test_batch_norm_in_train_mode_is_refused_before_any_product(op_name, check):
    """A forward pass that updates running statistics is refused at construction, whether or
    not the determinism check runs, and the model's buffers are left as they were."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).to(f64).train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    data = make_data((4,), "cross_entropy")
    loss_fn = nn.functional.cross_entropy
    with pytest.raises(NondeterminismError, match=r"model\.eval\(\)") as error:
        OPERATORS[op_name](model, loss_fn, None, data, check_deterministic=check)
    assert "model.eval()" in str(error.value) and "1.running_mean" in str(error.value)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name])
    op = OPERATORS[op_name](model.eval(), loss_fn, None, data, check_deterministic=check)
    expected = DENSE[op_name](model, loss_fn, list(model.parameters()), data)
    torch.testing.assert_close(op.to_dense(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op_name", list(OPERATORS))
def test_sum_reduced_loss_gives_the_matrix_of_the_summed_loss(op_name):
    """``reduction="sum"`` on batches of 7 and 2: the matrix of the loss summed over all nine
    samples, N times that of the mean; ``loss_and_gradient`` likewise."""
    make_model, shape = MODELS["mlp"]
    model = make_model()
    data = make_data(shape, "cross_entropy", sizes=(7, 2))
    params = list(model.parameters())
    summed = OPERATORS[op_name](model, nn.CrossEntropyLoss(reduction="sum"), None, data)
    mean = OPERATORS[op_name](model, nn.CrossEntropyLoss(), None, data)
    expected = 9 * DENSE[op_name](model, nn.functional.cross_entropy, params, data)
    torch.testing.assert_close(summed.to_dense(), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mean.to_dense(), expected / 9, rtol=1e-10, atol=1e-12)
    loss, gradient = summed.loss_and_gradient()
    mean_loss, mean_gradient = mean.loss_and_gradient()
    torch.testing.assert_close(loss, 9 * mean_loss)
    torch.testing.assert_close(gradient, 9 * mean_gradient)
    if op_name == "ef":
        torch.testing.assert_close(summed.diagonal(), expected.diagonal())


def test_unreduced_or_unknown_loss_reduction_is_refused():
    model = tiny_mlp()
    data = make_data((4,), "cross_entropy")
    for loss_fn in (nn.CrossEntropyLoss(reduction="none"), nn.MSELoss(reduction="avg")):
        for cls in OPERATORS.values():
            with pytest.raises(ValueError, match="reduction"):
                cls(model, loss_fn, None, data)


@pytest.mark.parametrize("weighted", [False, True], ids=["ignore_index", "class weights"])
def test_cross_entropy_batches_weigh_what_their_own_mean_divides_by(weighted):
    """With ignored targets (and class weights) the batches' means have other denominators
    than their sizes: the operators are those of the loss on all the data in one batch,
    a batch whose targets are all ignored left out."""
    from _curvature_oracles import NUM_CLASSES, Flat
    from torch.func import hessian, jacrev

    model = tiny_mlp()
    weight = torch.linspace(0.5, 2.0, NUM_CLASSES, dtype=f64) if weighted else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, ignore_index=-1)
    gen = torch.Generator().manual_seed(3)
    targets = [torch.tensor(t) for t in ([0, -1, 2, 1, -1], [-1, 1, 2], [-1, -1], [2])]
    data = [(torch.randn(len(y), 4, generator=gen, dtype=f64), y) for y in targets]
    params = list(model.parameters())
    flat = Flat(model, params)
    inputs, labels = torch.cat([x for x, _ in data]), torch.cat(targets)
    expected_hessian = hessian(lambda t: loss_fn(flat.outputs(t, inputs), labels))(flat.theta)
    jacobian = jacrev(flat.outputs)(flat.theta, inputs).reshape(-1, flat.theta.numel())
    outputs = flat.outputs(flat.theta, inputs)
    h = hessian(lambda o: loss_fn(o, labels))(outputs).reshape(outputs.numel(), -1)
    expected_ggn = jacobian.T @ h @ jacobian
    for cls, expected in ((HessianOperator, expected_hessian), (GGNOperator, expected_ggn)):
        dense = cls(model, loss_fn, params, data).to_dense()
        torch.testing.assert_close(dense, expected, rtol=1e-10, atol=1e-12)
