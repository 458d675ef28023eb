"""qforge.attention.prefer_cudnn_attention: same attention result as torch's default choice;
cudnn_takes_gqa asks cuDNN's kernel once per device, and where it refuses grouped-query K/V
transformers repeats the heads inside the context (on the CPU, with the kernel stood in for)."""
import pytest
import torch
import torch.nn.functional as F

from qforge import attention


def cudnn_kernel(monkeypatch, takes_gqa: bool) -> list:
    """Stands in for aten._scaled_dot_product_cudnn_attention (forward only) and a fresh probe
    cache; returns the (q heads, k heads) of every call."""
    calls = []

    def kernel(q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask, scale=None):
        calls.append((q.shape[1], k.shape[1]))
        if k.shape[1] != q.shape[1] and not takes_gqa:
            raise RuntimeError("cuDNN Frontend error: no grouped-query attention here")
        return (F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True),)

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", kernel)
    monkeypatch.setattr(attention, "_cudnn_gqa", {})
    return calls


@pytest.mark.parametrize("takes_gqa", [True, False])
def test_cudnn_takes_gqa_asks_the_kernel_once_per_device(monkeypatch, takes_gqa):
    calls = cudnn_kernel(monkeypatch, takes_gqa)
    assert attention.cudnn_takes_gqa("cpu") is takes_gqa
    assert calls == [(4, 2)]  # grouped-query inputs
    assert attention.cudnn_takes_gqa(torch.device("cpu")) is takes_gqa
    assert len(calls) == 1  # cached
    assert attention.cudnn_takes_gqa("meta") is takes_gqa
    assert len(calls) == 2  # another device, asked again


def test_cudnn_takes_gqa_without_a_cudnn_kernel_is_false(monkeypatch):
    monkeypatch.setattr(attention, "_cudnn_gqa", {})
    assert attention.cudnn_takes_gqa("cpu") is False  # aten has no CPU kernel for it: NotImplementedError


@pytest.mark.parametrize("takes_gqa", [True, False])
def test_prefer_cudnn_attention_repeats_kv_heads_only_where_cudnn_refuses_gqa(monkeypatch, takes_gqa):
    pytest.importorskip("transformers")
    from transformers.integrations import sdpa_attention

    calls = cudnn_kernel(monkeypatch, takes_gqa)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = sdpa_attention.use_gqa_in_sdpa
    kv = torch.zeros(1, 2, 8, 64)
    for _ in range(2):
        with attention.prefer_cudnn_attention("cpu"):
            assert sdpa_attention.use_gqa_in_sdpa(None, kv, kv) is takes_gqa  # False: transformers repeats
            assert (sdpa_attention.use_gqa_in_sdpa is before) is takes_gqa
        assert sdpa_attention.use_gqa_in_sdpa is before  # restored
    assert len(calls) == 1  # asked once, not on every entry


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
