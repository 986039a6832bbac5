import pytest
import torch
from _curvature_oracles import (
    dense_empirical_fisher,
    dense_hessian,
    f64,
    make_data,
)
from torch import nn

from secondorder.curvature import spectral_density
from secondorder.diagnostics import (
    CurvatureMonitor,
    plot_metrics,
    plot_spectral_density,
    read_metrics,
)

ALL = ("hessian_trace", "top_eigenvalue", "fisher_trace", "grad_norm", "loss")


def _dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).to(f64)


def test_monitor_logs_the_right_values_on_the_right_steps(tmp_path):
    model = _dropout_model().train()  # dropout on: the monitor must measure in eval mode
    batch = make_data((4,), "cross_entropy", sizes=(9,))[0]
    loss_fn = nn.functional.cross_entropy
    path = tmp_path / "run" / "curvature.csv"
    monitor = CurvatureMonitor(
        model, loss_fn, batch, every=2, metrics=ALL, writer=path,
        num_matvecs=45, lanczos_iters=60, lanczos_tol=1e-8,
    )  # fmt: skip
    rows = [monitor.step(step) for step in range(5)]
    assert [r is not None for r in rows] == [True, False, True, False, True]
    assert model.training  # restored

    model.eval()
    params = list(model.parameters())
    hessian = dense_hessian(model, loss_fn, params, [batch])
    fisher = dense_empirical_fisher(model, loss_fn, params, [batch])
    loss = loss_fn(model(batch[0]), batch[1])
    gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    for row in monitor.history:
        assert row["top_eigenvalue"] == pytest.approx(float(torch.linalg.eigvalsh(hessian)[-1]))
        assert 0 <= row["top_eigenvalue_residual"] < 1e-6
        assert row["fisher_trace"] == pytest.approx(float(fisher.trace()))
        assert row["grad_norm"] == pytest.approx(float(gradient.norm()))
        assert row["loss"] == pytest.approx(loss.item())
        error = abs(row["hessian_trace"] - float(hessian.trace()))
        assert error < 5 * row["hessian_trace_std_error"] + 1e-9
    # The probes differ from call to call, the deterministic metrics do not.
    assert monitor.history[0]["hessian_trace"] != monitor.history[1]["hessian_trace"]

    logged = read_metrics(path)
    assert logged["step"] == [0.0, 2.0, 4.0]
    for column in monitor.columns:
        assert logged[column] == pytest.approx([row[column] for row in monitor.history])


def test_monitor_follows_the_parameters_as_they_train():
    model = _dropout_model().eval()
    batch = make_data((4,), "cross_entropy", sizes=(9,))[0]
    loss_fn = nn.functional.cross_entropy
    monitor = CurvatureMonitor(model, loss_fn, batch, every=1, metrics=("grad_norm",))
    before = monitor.step(0)["grad_norm"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        optimizer.step()
    after = monitor.step(1)["grad_norm"]
    expected = torch.cat(
        [
            g.reshape(-1)
            for g in torch.autograd.grad(
                loss_fn(model(batch[0]), batch[1]), list(model.parameters())
            )
        ]
    ).norm()
    assert after == pytest.approx(float(expected)) and after != pytest.approx(before)


def test_monitor_measures_what_requires_grad_at_each_measurement():
    """Frozen after the monitor was built, a layer leaves the measurement; unfrozen, it
    comes back; given params are measured whatever they require."""
    model = _dropout_model().eval()
    batch = make_data((4,), "cross_entropy", sizes=(9,))[0]
    loss_fn = nn.functional.cross_entropy
    monitor = CurvatureMonitor(model, loss_fn, batch, every=1, metrics=("grad_norm",))
    pinned = CurvatureMonitor(
        model, loss_fn, batch, every=1, metrics=("grad_norm",), params=model.parameters()
    )

    def gradient_norm(params):
        loss = loss_fn(model(batch[0]), batch[1])
        return float(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).norm())

    everything = gradient_norm(list(model.parameters()))
    assert monitor.step(0)["grad_norm"] == pytest.approx(everything)
    model[0].requires_grad_(False)
    last = gradient_norm(list(model[3].parameters()))
    assert monitor.step(1)["grad_norm"] == pytest.approx(last)
    assert last != pytest.approx(everything)
    assert pinned.step(1)["grad_norm"] == pytest.approx(everything)
    model[0].requires_grad_(True)
    assert monitor.step(2)["grad_norm"] == pytest.approx(everything)


def test_tensorboard_writer_gets_scalars_and_csv(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model = _dropout_model().eval()
    batch = make_data((4,), "cross_entropy", sizes=(9,))[0]
    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    monitor = CurvatureMonitor(
        model, nn.functional.cross_entropy, batch, every=5, writer=writer, num_matvecs=6,
        lanczos_iters=5,
    )  # fmt: skip
    for step in range(11):
        monitor.step(step)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "curvature/top_eigenvalue" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("curvature/grad_norm")] == [0, 5, 10]
    assert read_metrics(tmp_path / "tb" / "curvature.csv")["step"] == [0.0, 5.0, 10.0]


def test_plots_are_written(tmp_path):
    model = _dropout_model().eval()
    batch = make_data((4,), "cross_entropy", sizes=(9,))[0]
    paths = {}
    for name, lr_scale in [("a", 1), ("b", 2)]:
        paths[name] = tmp_path / f"{name}.csv"
        monitor = CurvatureMonitor(
            model, nn.functional.cross_entropy, batch, every=1, writer=paths[name],
            num_matvecs=6, lanczos_iters=5, seed=lr_scale,
        )  # fmt: skip
        for step in range(3):
            monitor.step(step)
    single = plot_metrics(paths["a"], tmp_path / "single.png")
    both = plot_metrics(paths, tmp_path / "both.png", metrics=["hessian_trace", "top_eigenvalue"])
    matrix = torch.diag(torch.linspace(0, 1, 20, dtype=f64))
    density = spectral_density(matrix, 3, 8, progress=False)
    spectrum = plot_spectral_density(density, tmp_path / "sub" / "density.png", eigenvalues=[1.0])
    for path in (single, both, spectrum):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no run has a column 'nope'"):
        plot_metrics(paths, tmp_path / "x.png", metrics=["nope"])


def test_plot_metrics_draws_what_each_run_logged(tmp_path):
    """Two runs with different metrics: one panel per metric any run has, each with the runs
    that have it (it raised "has no column 'hessian_trace'")."""
    model = _dropout_model().eval()
    batch = make_data((4,), "cross_entropy", sizes=(9,))[0]
    paths = {}
    for name, metrics in [("full", ("hessian_trace", "grad_norm")), ("lean", ("grad_norm",))]:
        paths[name] = tmp_path / f"{name}.csv"
        monitor = CurvatureMonitor(
            model, nn.functional.cross_entropy, batch, every=1, writer=paths[name],
            metrics=metrics, num_matvecs=6,
        )  # fmt: skip
        for step in range(2):
            monitor.step(step)
    figure = plot_metrics(paths, tmp_path / "both.png")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from secondorder.diagnostics.plots import panels

    tables = {name: read_metrics(path) for name, path in paths.items()}
    assert panels(tables, None) == {"hessian_trace": ["full"], "grad_norm": ["full", "lean"]}
    assert panels(tables, ["hessian_trace"]) == {"hessian_trace": ["full"]}


def test_monitor_bad_input():
    model = _dropout_model()
    batch = make_data((4,), "cross_entropy", sizes=(9,))[0]
    with pytest.raises(ValueError, match="unknown or no metrics"):
        CurvatureMonitor(model, nn.functional.cross_entropy, batch, metrics=("sharpness",))
    with pytest.raises(ValueError, match=">= 3"):
        CurvatureMonitor(model, nn.functional.cross_entropy, batch, num_matvecs=2)
    with pytest.raises(ValueError, match="every"):
        CurvatureMonitor(model, nn.functional.cross_entropy, batch, every=0)
