"""The fixed-shape fit (SmplifyConfig.mode 'static') and its CUDA graphs ('graph'): the same steps
as the dynamic fit, nothing read back to the host inside the fit, and on a GPU the recorded
graph equal to the fit it records."""
from __future__ import annotations

import pytest
import torch

from fitting.body_model import load_body_model
from fitting.errors import BadInput
from fitting.fit_graph import padded_size
from fitting.lm import LMSettings, levenberg_marquardt, levenberg_marquardt_static
from fitting.smplify import FitInit, Smplify, SmplifyConfig, fit, mode_for_batch, resolve_mode
from tests.host_sync import HostSync, NoHostSync
from tests.test_fast_smplify import human, one_thread, people, prior  # noqa: F401 - fixtures

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def troubled_batch(model, n: int = 10, seed: int = 6):
    """n people near their truth, three of them unfittable (non-finite keypoints, non-finite
    init, nothing detected)."""
    pose, betas, cam_t, _, kp = people(model, n, seed=seed)
    kp[1, 7, 0] = float("nan")
    kp[3, :, 2] = 0.0
    init = FitInit(pose + 0.05, betas, cam_t * 1.02)
    init.cam_t[2, 1] = float("inf")
    return kp, init


def assert_same_fit(static, dynamic, atol: float = 1e-4):
    assert static.iterations.tolist() == dynamic.iterations.tolist()
    assert static.valid.tolist() == dynamic.valid.tolist() and static.reasons == dynamic.reasons
    assert static.betas_ok.tolist() == dynamic.betas_ok.tolist()
    torch.testing.assert_close(static.loss, dynamic.loss, atol=atol, rtol=1e-4)
    for name in ("pose", "betas", "cam_t"):
        torch.testing.assert_close(getattr(static, name), getattr(dynamic, name), atol=atol, rtol=1e-4)


@pytest.mark.parametrize("start", ["near", "mean"])
def test_static_fit_takes_the_dynamic_fits_steps(start, human, prior):
    kp, init = troubled_batch(human)
    init = init if start == "near" else None
    dynamic = Smplify(human, prior, SmplifyConfig(mode="dynamic"))(kp, init)
    static = Smplify(human, prior, SmplifyConfig(mode="static"))(kp, init)
    assert (dynamic.mode, static.mode, static.device) == ("dynamic", "static", "cpu")
    unfit = [1, 2, 3] if start == "near" else [1, 3]     # the mean start replaces the broken init
    assert [i for i, reason in enumerate(dynamic.reasons) if reason] == unfit
    steps = dynamic.iterations
    assert (steps[unfit] == 0).all() and len(set(steps.tolist())) > 3 and steps.max() <= 32
    assert_same_fit(static, dynamic)


def rosenbrock(targets: torch.Tensor):
    """Per sample: residuals 10 (y - x^2), (a - x); minimum 0 at (a, a^2)."""
    def residuals(x: torch.Tensor, rows):
        a = targets if rows is None else targets[rows]
        return torch.stack([10.0 * (x[:, 1] - x[:, 0].square()), a - x[:, 0]], dim=-1)

    def energy(x, rows):
        return residuals(x, rows).square().sum(-1)

    def linearize(x, rows):
        r = residuals(x, rows)
        jac = torch.zeros(len(x), 2, 2, dtype=x.dtype)
        jac[:, 0, 0], jac[:, 0, 1], jac[:, 1, 0] = -20.0 * x[:, 0], 10.0, -1.0
        return (jac.mT @ r[..., None])[..., 0], jac.mT @ jac
    return energy, linearize


def test_static_lm_steps_like_the_dynamic_one_and_freezes_what_stops():
    targets = torch.tensor([1.0, -0.5, 2.0, 0.3, 1.5, 0.7], dtype=torch.float64)
    active = torch.tensor([True, True, True, True, False, True])
    start = torch.zeros(6, 2, dtype=torch.float64)
    start[5] = float("nan")                              # active, but its energy is not finite: never runs
    energy, linearize = rosenbrock(targets)
    settings = LMSettings(atol=0.0, ftol=1e-9)
    dynamic = levenberg_marquardt(start, energy, linearize, active, 60, settings)
    static = levenberg_marquardt_static(start, energy, linearize, active, 60, settings)
    steps = dynamic.iterations
    assert steps[4] == 0 and steps[5] == 0 and len(set(steps[:4].tolist())) > 1 and steps.max() < 60
    assert static.iterations.tolist() == steps.tolist()
    torch.testing.assert_close(static.x, dynamic.x, equal_nan=True)
    torch.testing.assert_close(static.energy, dynamic.energy, equal_nan=True)
    assert torch.isnan(static.x[5]).all() and static.x[4].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("operation, waits", [
    (lambda x: x.sum().item(), True), (lambda x: bool(x.sum() > 0), True), (lambda x: torch.nonzero(x), True),
    (lambda x: x[x > 0], True), (lambda x: x[[0, 2]], True), (lambda x: x * torch.tensor([1.0] * 5), True),
    (lambda x: x * torch.as_tensor(2.0), True), (lambda x: x.tolist(), True), (lambda x: x.clone().__setitem__(0, 1.0), True),
    (lambda x: torch.linalg.cholesky(torch.eye(3)), True), (lambda x: x.repeat_interleave(torch.tensor(2)), True),
    (lambda x: x.clone()[None].__setitem__((slice(None), 0), 1.0), False), (lambda x: x.clone()[0].fill_(1.0), False),
    (lambda x: torch.where(x > 0, x, 0.0), False), (lambda x: x.index_select(0, torch.arange(3)), False),
    (lambda x: torch.linalg.cholesky_ex(torch.eye(3)), False),
])
def test_the_guard_stops_what_a_gpu_would_wait_for(operation, waits):
    x = torch.randn(5)
    if waits:
        with pytest.raises(HostSync), NoHostSync():
            operation(x)
    else:
        with NoHostSync():
            operation(x)


def test_the_static_fit_reads_nothing_back_to_the_host(human, prior):
    kp, init = troubled_batch(human, n=4)
    smplify = Smplify(human, prior, SmplifyConfig(mode="static"))
    inputs, _ = smplify.screen(kp, init)
    with NoHostSync():
        out = smplify.fit_screened(inputs)
    assert out["iterations"][0] > 0 and out["iterations"][3] == 0
    # the guard is not blind: the dynamic fit compacts its running samples with nonzero
    dynamic = Smplify(human, prior, SmplifyConfig(mode="dynamic"))
    with pytest.raises(HostSync, match="nonzero"), NoHostSync():
        dynamic.fit_screened(inputs)


def test_the_mode_is_a_setting_resolved_per_device_and_recorded(human, prior):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    adam = SmplifyConfig.from_dict({"stages": [{"name": "body", "solver": "adam"}]})
    assert resolve_mode(SmplifyConfig(), cpu) == "dynamic"
    assert resolve_mode(SmplifyConfig(), gpu) == "graph" and resolve_mode(SmplifyConfig(), gpu, reuse=False) == "static"
    assert resolve_mode(adam, gpu) == resolve_mode(SmplifyConfig(forward="mesh"), gpu) == "static"
    assert resolve_mode(SmplifyConfig(mode="static"), cpu) == "static"
    for config, device in ((SmplifyConfig(mode="graph"), cpu), (SmplifyConfig(mode="graph", forward="mesh"), gpu)):
        with pytest.raises(BadInput, match="mode 'graph' needs"):
            resolve_mode(config, device)
    with pytest.raises(BadInput, match="'mode' must be one of"):
        SmplifyConfig(mode="fast")
    with pytest.raises(BadInput, match="cpu_batch_max"):
        SmplifyConfig(cpu_batch_max=1.5)
    with pytest.raises(BadInput, match="graph_batch_max"):
        SmplifyConfig(graph_batch_max=-1)
    # In 'auto' a graph serves batches up to graph_batch_max; larger ones run 'dynamic'.
    auto, graph = SmplifyConfig(graph_batch_max=8192), SmplifyConfig(mode="graph")
    assert [mode_for_batch(auto, "graph", b) for b in (64, 8192, 8193)] == ["graph", "graph", "dynamic"]
    assert mode_for_batch(graph, "graph", 65536) == "graph"
    assert [mode_for_batch(auto, mode, 65536) for mode in ("static", "dynamic")] == ["static", "dynamic"]
    config = SmplifyConfig.from_dict(SmplifyConfig(mode="static", cpu_batch_max=4).to_dict())
    assert (config.mode, config.cpu_batch_max) == ("static", 4)
    kp = people(human, 2, seed=7)[-1]
    result = fit(human, prior, kp)
    assert (result.mode, result.device) == ("dynamic", "cpu")


def test_padded_sizes_are_few_and_waste_at_most_a_quarter():
    sizes = [padded_size(b) for b in range(1, 5000)]
    assert sizes[:9] == [1, 2, 4, 4, 8, 8, 8, 8, 10]
    assert all(b <= s <= max(b, 1.25 * b) or b <= 8 for b, s in zip(range(1, 5000), sizes))
    assert all(padded_size(2 ** k) == 2 ** k for k in range(20)) and padded_size(65536) == 65536
    assert sizes == sorted(sizes) and len(set(sizes)) < 60


# ---------------------------------------------------------------- on a GPU
# A GPU's float32 kernels round differently from a CPU's, which can move a sample's stopping step:
# against the CPU these tests compare losses and validity, and steps only against the GPU's own
# unrecorded fit.

@pytest.fixture(scope="module")
def gpu_model():
    return load_body_model(device="cuda") if torch.cuda.is_available() else None


def on_gpu(kp: torch.Tensor, init: FitInit, n: int) -> tuple[torch.Tensor, FitInit]:
    return kp[:n].cuda(), FitInit(*(t[:n].cuda() for t in (init.pose, init.betas, init.cam_t)))


@cuda
def test_the_static_fit_on_a_gpu_never_synchronises(gpu_model, prior, human):
    kp, init = troubled_batch(human, n=6)
    smplify = Smplify(gpu_model, prior, SmplifyConfig(mode="static"))
    inputs, _ = smplify.screen(*on_gpu(kp, init, 6))
    smplify.fit_screened(inputs)            # first use: libraries load, the allocator warms up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = smplify.fit_screened(inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reference = Smplify(human, prior, SmplifyConfig(mode="dynamic"))(kp, init)
    assert out["valid"].cpu().tolist() == reference.valid.tolist()
    torch.testing.assert_close(out["loss"].cpu(), reference.loss, atol=2e-2, rtol=2e-2)


@cuda
def test_the_recorded_graph_is_the_fit_it_records_at_any_batch_size(gpu_model, prior, human):
    kp, init = troubled_batch(human, n=10)
    graphs = Smplify(gpu_model, prior, SmplifyConfig(mode="graph"))
    eager = Smplify(gpu_model, prior, SmplifyConfig(mode="static"))
    on_cpu = Smplify(human, prior, SmplifyConfig(mode="dynamic"))
    # 10 records a graph at 10, 7 one at 8 (padded); 10 and 9 replay the first, 7 the second
    for n in (10, 7, 10, 9, 7):
        graph, reference = graphs(*on_gpu(kp, init, n)), eager(*on_gpu(kp, init, n))
        assert graph.mode == "graph" and graph.device == "cuda" and graph.pose.device.type == "cuda"
        assert graph.iterations.tolist() == reference.iterations.tolist() and graph.reasons == reference.reasons
        assert graph.valid.tolist() == reference.valid.tolist()
        for name in ("loss", "pose", "betas", "cam_t"):
            torch.testing.assert_close(getattr(graph, name), getattr(reference, name), atol=1e-4, rtol=1e-4)
        cpu = on_cpu(kp[:n], FitInit(init.pose[:n], init.betas[:n], init.cam_t[:n]))
        assert graph.valid.cpu().tolist() == cpu.valid.tolist()
        torch.testing.assert_close(graph.loss.cpu(), cpu.loss, atol=2e-2, rtol=2e-2)
    assert sorted(graphs.graphs.graphs) == [8, 10] and graphs.graphs.recorded == 2


@cuda
def test_a_single_sample_on_a_gpu_is_fitted_on_the_cpu_and_says_so(gpu_model, prior, human):
    kp = people(human, 2, seed=7)[-1]
    smplify = Smplify(gpu_model, prior, SmplifyConfig())
    one, two = smplify(kp[:1].cuda()), smplify(kp.cuda())
    assert (one.mode, one.device, one.pose.device.type) == ("dynamic", "cpu", "cuda")
    assert (two.mode, two.device) == ("graph", "cuda")
    torch.testing.assert_close(one.loss, two.loss[:1], atol=2e-2, rtol=2e-2)
    assert not Smplify(gpu_model, prior, SmplifyConfig(cpu_batch_max=0)).routes_to_cpu(1)


@cuda
def test_a_large_batch_on_a_gpu_runs_dynamic_and_says_so(gpu_model, prior, human):
    kp = people(human, 6, seed=7)[-1].cuda()
    smplify = Smplify(gpu_model, prior, SmplifyConfig(graph_batch_max=4))
    small, large = smplify(kp[:4]), smplify(kp)
    assert (small.mode, large.mode, large.device) == ("graph", "dynamic", "cuda")
    assert smplify.graphs.recorded == 1   # the large batch recorded nothing
    torch.testing.assert_close(small.loss, large.loss[:4], atol=1e-3, rtol=1e-3)
