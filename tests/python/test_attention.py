"""qforge.attention.prefer_cudnn_attention: same attention result as torch's default choice."""
import pytest
import torch
import torch.nn.functional as F

from qforge import attention


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        with attention.prefer_cudnn_attention():
            pass


@pytest.mark.cuda
def test_cudnn_first_matches_default_forward_and_backward():
    transformers = pytest.importorskip("transformers")
    from transformers.integrations import sdpa_attention

    before = sdpa_attention.use_gqa_in_sdpa
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 8, 1024, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    go = torch.randn(1, 8, 1024, 128, device="cuda", dtype=torch.bfloat16, generator=g)

    def run():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        grads = torch.autograd.grad(out, (q, k, v), go)
        return (out, *grads)

    expected = run()
    with attention.prefer_cudnn_attention():
        got = run()
    for a, b in zip(expected, got):
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)
    assert sdpa_attention.use_gqa_in_sdpa is before  # restored
