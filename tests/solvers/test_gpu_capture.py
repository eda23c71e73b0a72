"""Real CUDA-graph capture returns what the eager paths return (run on a GPU: pytest -m gpu).

On the CPU the captured driver is tested with eager stand-ins (`test_loop.py`); here the real
graphs are recorded and replayed: the captured Jacobi loop and the captured sequential loops of
MADE bitwise equal to their eager runs, the captured DenseNet loop on new images, PixelCNN++'s
captured forward, the scan's chunk graphs and the captured scan backward.
"""

import pytest
import torch

import ffsolve
from ffsolve.data import logit_bounds
from ffsolve.models.densenet import DenseNet, densenet_bc
from ffsolve.models.made import load_made
from ffsolve.models.pixelcnnpp import PixelCNNpp, PixelCNNppConfig
from ffsolve.models.rnn import VanillaRNN, VanillaRNNConfig
from ffsolve.problems import (
    DenseNetLayers,
    LinearRecurrenceProblem,
    MADESampling,
    PixelCNNSampling,
    logistic_noise,
    pixelcnn_noise,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _made(incremental=False, batch=16):
    model, meta = load_made("checkpoints/made_mnist", CUDA)
    noise = logistic_noise(batch, model.dims, torch.Generator().manual_seed(0), CUDA)
    return MADESampling(model, noise, logit_bounds(meta["data"]["lam"]), incremental)


@pytest.mark.parametrize("method,opts", [("jacobi", {}), ("jacobi_gs", {"block_size": 28})])
def test_captured_made_loop_is_bitwise_the_eager_one(method, opts):
    problem = _made()
    with torch.no_grad():
        eager = ffsolve.solve(problem, method=method, capture=False, **opts)
        for _ in range(2):  # capture, then a replay of the cached loop
            got = ffsolve.solve(problem, method=method, capture="auto", **opts)
            assert got.stats.get("captured") and got.num_iters == eager.num_iters
            assert torch.equal(got.value, eager.value)
            assert torch.equal(got.residuals, eager.residuals)
    seq = ffsolve.solve(problem, method="sequential", capture=False).value
    assert torch.equal(eager.value, seq)  # the naive loop runs Jacobi's kernels


@pytest.mark.parametrize("incremental", [False, True])
def test_captured_sequential_loop_is_bitwise_the_eager_one(incremental):
    problem = _made(incremental)
    with torch.no_grad():
        eager = ffsolve.solve(problem, method="sequential", capture=False).value
        for _ in range(2):
            got = ffsolve.solve(problem, method="sequential", capture="auto")
            assert got.stats == {"captured": True} and torch.equal(got.value, eager)


def test_captured_densenet_loop_on_new_images():
    torch.manual_seed(0)
    net = DenseNet(densenet_bc(depth=10, growth_rate=4)).to(CUDA).eval()
    problem = DenseNetLayers(net, torch.zeros(4, 1, 28, 28, device=CUDA), fused=True)
    for seed in (0, 1):
        x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(seed)).to(CUDA)
        with torch.no_grad():
            problem.set_images(x)
            got = ffsolve.solve(problem, method="jacobi", capture=True)
            eager = ffsolve.solve(DenseNetLayers(net, x, fused=True), capture=False)
        assert got.stats["captured"] and torch.equal(got.value, eager.value)


def test_captured_pixelcnn_forward_is_the_eager_one():
    torch.manual_seed(0)
    cfg = PixelCNNppConfig(channels=1, height=8, width=8, filters=8, resnets=1, mixtures=3)
    net = PixelCNNpp(cfg).to(CUDA).eval()
    g, e = pixelcnn_noise(2, (1, 8, 8), 3, torch.Generator().manual_seed(0), CUDA)
    with torch.no_grad():
        plain = ffsolve.solve(PixelCNNSampling(net, g, e), method="jacobi").value
        fast = ffsolve.solve(PixelCNNSampling(net, g, e, capture=True), method="jacobi").value
    assert torch.equal(plain, fast)


def test_scan_chunk_graphs_and_captured_backward():
    g = torch.Generator().manual_seed(0)
    A = (torch.randn(2, 50, 8, 8, generator=g) / 8).to(CUDA, torch.float64)
    b = torch.randn(2, 50, 8, generator=g).to(CUDA, torch.float64)
    problem = LinearRecurrenceProblem(A, b)
    eager = ffsolve.solve(problem, method="scan", capture_chunks=False).value
    for _ in range(2):
        assert torch.equal(ffsolve.solve(problem, method="scan").value, eager)
    rnn = VanillaRNN(VanillaRNNConfig(hidden=32, seed=0)).to(CUDA)
    params = [rnn.W_h, rnn.W_x, rnn.b_h]
    x = torch.rand(1, 100, 1, device=CUDA)

    def grads(capture):
        hs, info = ffsolve.backprop_through(
            rnn.step, rnn.initial_state(1), x, "scan", params=params, capture=capture
        )
        return torch.autograd.grad(rnn.readout(hs).square().sum(), params), info

    ref, _ = grads(False)
    for _ in range(2):
        got, info = grads(True)
        assert info.solution.stats.get("graphed_backward")
        for a, c in zip(ref, got, strict=True):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compile", [None, "inductor"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_captured_lm_decoding_is_bitwise_the_eager_one(temperature, compile):
    """The static KV cache: the captured sequential loop and the captured sliding window
    (moving on the device, n-gram guesses on the device, stopping after EOS) give the eager
    runs' tokens and counts, twice (capture, then replay of the cached loop); with the layer
    function compiled too (compiled kernels captured in the loop's graphs)."""
    transformers = pytest.importorskip("transformers")
    from ffsolve.problems import LMDecoding, lm_gumbel

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(CUDA).eval()
    prompts = [[1, 2, 3, 4, 5, 1, 2, 3], [7, 8, 9]]
    gumbel = lm_gumbel(2, 40, 64, torch.Generator().manual_seed(1), CUDA) if temperature else None
    problem = LMDecoding(model, prompts, 40, temperature=temperature, gumbel=gumbel,
                         eos_id=11, ngram=4, cache="static", compile=compile)  # fmt: skip
    runs = [("sequential", {}, 0), ("gs_jacobi", {"window": 8}, 0),
            ("gs_jacobi", {"window": 8}, 4), ("jacobi", {}, 4)]  # fmt: skip
    with torch.no_grad():
        for method, opts, ngram in runs:  # a new ngram must not replay the old guesses
            problem.ngram = ngram
            eager = ffsolve.solve(problem, method=method, capture=False, **opts)
            for _ in range(2):
                got = ffsolve.solve(problem, method=method, capture="auto", **opts)
                assert got.stats.get("captured"), (method, got.stats)
                assert got.num_iters == eager.num_iters and torch.equal(got.value, eager.value)
