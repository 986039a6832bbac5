import pytest
import torch
from _curvature_oracles import (
    decaying_matrix,
    f64,
    make_data,
    tiny_cnn,
)
from torch import nn

from secondorder.curvature import GGNOperator, HessianOperator, spectral_density, top_eigenvalues


def _symmetric(eigenvalues, seed=0):
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(
        torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=f64)
    )
    return (basis * eigenvalues) @ basis.T


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_lanczos_matches_eigvalsh_on_an_indefinite_matrix(which):
    gen = torch.Generator().manual_seed(1)
    eigenvalues = torch.cat(
        [torch.tensor([9.0, 7.5, -8.0, -6.0], dtype=f64), torch.randn(96, generator=gen, dtype=f64)]
    )
    matrix = _symmetric(eigenvalues)
    exact = torch.linalg.eigvalsh(matrix)
    expected = {
        "largest": exact.flip(0)[:3],
        "smallest": exact[:3],
        "magnitude": exact[exact.abs().argsort(descending=True)][:3],
    }[which]
    result = top_eigenvalues(matrix, 3, which=which, tol=1e-9, max_iter=100, progress=False)
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-8, atol=1e-8)
    # The reported residuals are the true ones, and the vectors are unit eigenvectors.
    x = result.eigenvectors
    true_residuals = (matrix @ x - x * result.eigenvalues).norm(dim=0)
    torch.testing.assert_close(result.residual_norms, true_residuals)
    torch.testing.assert_close(x.norm(dim=0), torch.ones(3, dtype=f64))
    assert result.num_matvecs < 100


def test_repeated_eigenvalues_of_a_low_rank_matrix_are_all_found():
    matrix = _symmetric(torch.tensor([2.0] * 4 + [1.0] + [0.0] * 45, dtype=f64))
    result = top_eigenvalues(matrix, 5, tol=1e-10, progress=False)
    torch.testing.assert_close(result.eigenvalues, torch.tensor([2.0] * 4 + [1.0], dtype=f64))
    assert result.converged


def test_not_converged_is_reported():
    matrix, _ = decaying_matrix(200, rate=0.999)  # clustered: slow to separate
    result = top_eigenvalues(matrix, 3, tol=1e-12, max_iter=5, progress=False)
    assert not result.converged
    assert result.num_matvecs == 5 + 3  # the Lanczos steps and one batched residual check


@pytest.mark.parametrize("operator", [HessianOperator, GGNOperator])
def test_top_eigenvalues_of_a_model(operator):
    model = tiny_cnn()
    data = make_data((1, 6, 6), "cross_entropy")
    op = operator(model, nn.functional.cross_entropy, None, data)
    exact = torch.linalg.eigvalsh(op.to_dense()).flip(0)[:2]
    result = top_eigenvalues(op, 2, tol=1e-9, progress=False)
    torch.testing.assert_close(result.eigenvalues, exact, rtol=1e-8, atol=1e-10)
    assert result.converged


def test_density_integrates_to_one_and_sits_where_the_eigenvalues_are():
    gen = torch.Generator().manual_seed(0)
    bulk = 1.0 + 0.1 * torch.rand(60, generator=gen, dtype=f64)  # 75% of the spectrum near 1
    outliers = 10.0 + 0.5 * torch.rand(20, generator=gen, dtype=f64)  # 25% near 10
    matrix = _symmetric(torch.cat([bulk, outliers]))
    result = spectral_density(matrix, num_runs=20, num_iters=20, progress=False,
                              generator=torch.Generator().manual_seed(1))  # fmt: skip
    grid, density = result.grid, result.density
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-6)

    def mass(low, high):
        inside = (grid >= low) & (grid <= high)
        return torch.trapezoid(density[inside], grid[inside]).item()

    assert mass(0.5, 1.6) == pytest.approx(0.75, abs=0.08)
    assert mass(9.5, 11.0) == pytest.approx(0.25, abs=0.08)
    assert mass(2.0, 9.0) < 0.02
    assert result.spectral_sum(lambda x: x) == pytest.approx(float(matrix.trace()), rel=0.1)
    assert result.nodes.shape == result.weights.shape == (20, 20)
    torch.testing.assert_close(result.weights.sum(1), torch.ones(20, dtype=f64))
    assert result.num_matvecs == 20 * 20


def test_density_on_a_given_grid_and_bad_input():
    matrix = _symmetric(torch.linspace(0, 1, 30, dtype=f64))
    grid = torch.linspace(-1, 2, 301, dtype=f64)
    result = spectral_density(matrix, 4, 10, grid=grid, sigma=0.05, progress=False)
    assert torch.equal(result.grid, grid) and result.sigma == 0.05
    assert torch.trapezoid(result.density, grid).item() == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="sigma"):
        spectral_density(matrix, 4, 10, sigma=0.0, progress=False)
    with pytest.raises(ValueError, match="k=31"):
        top_eigenvalues(matrix, 31, progress=False)
    with pytest.raises(ValueError, match="which"):
        top_eigenvalues(matrix, 1, which="top", progress=False)
    with pytest.raises(ValueError, match="lanczos"):
        top_eigenvalues(matrix, 1, method="power", progress=False)
