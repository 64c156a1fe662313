"""The greedy pick a graphed decode step ends with (runner_cuda.fast.pick): the float32 logits, the
first index of the largest as torch.argmax gives it (also in the host's pinned memory at the step's
position), and the step's position moved on by one. On
the CPU the kernels run in Triton's interpreter; on a GPU compiled (and the decoder's graphed steps
use them: tests/test_cuda_fast_gpu.py, test_cuda_decode_ahead_gpu.py)."""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from fast_kv_helpers import skip_unless_interpreted  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", autouse=True)
def interpreted_or_compiled():
    if DEVICE == "cpu":
        skip_unless_interpreted("")


def picked(out: "torch.Tensor", position: int = 41):
    from runner_cuda.fast.pick import greedy_into

    logits = torch.full((out.numel(),), float("nan"), device=DEVICE)
    token = torch.zeros(1, dtype=torch.long, device=DEVICE)
    at = torch.tensor([position], device=DEVICE)
    host = torch.full((64,), -1, dtype=torch.long, pin_memory=DEVICE == "cuda")
    greedy_into(out, logits, token, at, host)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(logits, out.float())
    assert at.item() == position + 1
    assert host[position].item() == token.item() and (host == -1).sum().item() == 63    # that slot only
    return token.item()


# the 8B's vocabulary (its last part holds fewer values than the others, the one after none), the
# default model's, one smaller than a block, and one of three blocks a part
@pytest.mark.parametrize("vocab", [128256, 49152, 1000, 300000])
def test_the_first_largest_as_torch_argmax(vocab):
    generator = torch.Generator().manual_seed(vocab)
    out = torch.randn(vocab, generator=generator).to(torch.float16).to(DEVICE)
    assert picked(out) == torch.argmax(out.float()).item()
    # the largest value twice, in different parts and within one block: the first wins
    for first, second in ((vocab // 3, vocab - 1), (5, 6), (vocab - 2, vocab - 1), (7, min(7 + 1024, vocab - 1))):
        tied = out.clone()
        tied[first] = tied[second] = 100.0
        assert picked(tied) == first == torch.argmax(tied.float()).item()


def test_a_largest_value_among_negative_logits_and_rejects_a_bad_buffer():
    from runner_cuda.fast.pick import greedy_into

    out = -torch.rand(128256, generator=torch.Generator().manual_seed(1)).to(DEVICE) - 1.0
    out[128255] = -0.5
    assert picked(out) == 128255
    one = torch.zeros(1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="float32 logits"):
        greedy_into(out, torch.zeros(128256, dtype=torch.float16, device=DEVICE), one, one, one)
    with pytest.raises(ValueError, match="int64 pinned host memory"):
        greedy_into(out, torch.zeros(128256, device=DEVICE), one, one, torch.zeros(8, dtype=torch.int32, device=DEVICE))
