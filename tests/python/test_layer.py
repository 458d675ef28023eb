"""The fused layer kernels (qforge.layer) against eager PyTorch and transformers:
forward and gradients on fresh random inputs, odd sizes included, against a
float64 reference and against the eager op in the same dtype; the ops'
registrations (opcheck, torch.compile) and their input checks."""
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

import qforge.layer as L

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative error (norm of the difference over the norm of the float64 reference)
# of one rounding to the dtype, with room for a few more
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def rel_err(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def randn(*shape, dtype, device, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


# ------------------------------------------------------------------ RMSNorm
def rms_ref(x, w, eps):
    x = x.double()
    return w.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7), (2, 5, 64), (9, 4096), (3, 4097), (2, 40000)])
def test_rms_norm_matches_llama_rmsnorm_and_float64(device, dtype, shape, rng):
    d, eps = shape[-1], 1e-5
    x = randn(*shape, dtype=dtype, device=device, gen=rng, scale=3.0)
    hf = LlamaRMSNorm(d, eps=eps).to(device=device, dtype=dtype)
    with torch.no_grad():
        hf.weight.copy_(randn(d, dtype=dtype, device=device, gen=rng))
    w = hf.weight.detach()
    gy = randn(*shape, dtype=dtype, device=device, gen=rng)

    xq = x.clone().requires_grad_()
    y = L.rms_norm(xq, w, eps)
    y.backward(gy)
    x64 = x.double().requires_grad_()
    ref = rms_ref(x64, w, eps)
    ref.backward(gy.double())
    xh = x.clone().requires_grad_()
    y_hf = hf(xh)
    y_hf.backward(gy)

    assert y.dtype == dtype and y.shape == x.shape
    # forward: the same roundings as transformers; a row's rstd may differ in its
    # last bit (another summation order), moving a few elements by an ulp of the
    # normalized value (times the weight)
    ulp = {torch.float32: 2**-18, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(y.float(), y_hf.float(), rtol=2 * ulp, atol=1e-5)
    if dtype != torch.float32:  # where rounding to the dtype hides that last bit: nearly all equal
        assert (y != y_hf).float().mean().item() < 0.01
    assert rel_err(y, ref) < TOL[dtype]
    # gradient: fp32 arithmetic rounded once, at least as close to float64 as the eager one
    assert rel_err(xq.grad, x64.grad) < max(TOL[dtype], 1.05 * rel_err(xh.grad, x64.grad))
    _, rstd = L.rms_norm_forward(x, w, eps)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(x.double().pow(2).mean(-1) + eps), rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_fp32_weight_and_raw_backward(device, rng):
    x = randn(6, 96, dtype=torch.bfloat16, device=device, gen=rng)
    w = randn(96, dtype=torch.float32, device=device, gen=rng)
    y, rstd = L.rms_norm_forward(x, w, 1e-6)
    # Llama's order: the normalized row is rounded to bf16, then the weight multiplies it
    normed = (x.float() * rstd[:, None]).to(torch.bfloat16)
    assert torch.equal(y, (w * normed.float()).to(torch.bfloat16))
    dy = randn(6, 96, dtype=torch.bfloat16, device=device, gen=rng)
    x64 = x.double().requires_grad_()
    rms_ref(x64, w, 1e-6).backward(dy.double())
    assert rel_err(L.rms_norm_backward(dy, x, w, rstd), x64.grad) < TOL[torch.bfloat16]


# ------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (5, 13), (3, 1000, 11), (64, 14336)])
def test_swiglu_matches_eager_and_float64(device, dtype, shape, rng):
    g = randn(*shape, dtype=dtype, device=device, gen=rng, scale=3.0)
    u = randn(*shape, dtype=dtype, device=device, gen=rng)
    dout = randn(*shape, dtype=dtype, device=device, gen=rng)
    gq, uq = g.clone().requires_grad_(), u.clone().requires_grad_()
    out = L.swiglu(gq, uq)
    out.backward(dout)
    ge, ue = g.clone().requires_grad_(), u.clone().requires_grad_()
    eager = F.silu(ge) * ue
    eager.backward(dout)
    g64, u64 = g.double().requires_grad_(), u.double().requires_grad_()
    ref = F.silu(g64) * u64
    ref.backward(dout.double())

    ulp = {torch.float32: 2**-21, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(out.float(), eager.float(), rtol=ulp, atol=1e-6)
    assert rel_err(out, ref) < TOL[dtype]
    for ours, theirs, exact in ((gq.grad, ge.grad, g64.grad), (uq.grad, ue.grad, u64.grad)):
        assert rel_err(ours, exact) < max(TOL[dtype], 1.05 * rel_err(theirs, exact))
    # raw and in-place backward give the same gradients
    dg, du = L.swiglu_backward(dout, g, u)
    assert torch.equal(dg, gq.grad) and torch.equal(du, uq.grad)
    g2, u2 = g.clone(), u.clone()
    rg, ru = L.swiglu_backward_(dout, g2, u2)
    assert rg is g2 and ru is u2 and torch.equal(g2, dg) and torch.equal(u2, du)
    assert torch.equal(L.swiglu_forward(g, u), out.detach())


# --------------------------------------------------------------------- RoPE
def rope_inputs(batch, seq, heads, head_dim, dtype, device, gen, cos_batch):
    config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, head_dim=head_dim,
                         max_position_embeddings=4096)
    rotary = LlamaRotaryEmbedding(config).to(device)
    # packed rows: positions restart per row, so per-batch cos/sin differ
    pos = torch.stack([torch.randperm(seq + 5, generator=gen)[:seq] for _ in range(cos_batch)]).to(device)
    x = randn(batch, seq, heads, head_dim, dtype=dtype, device=device, gen=gen)
    cos, sin = rotary(x, pos)
    return x, cos, sin


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 33, 4, 128), (1, 7, 3, 6), (3, 17, 5, 64), (2, 9, 2, 18)])
@pytest.mark.parametrize("cos_batch", ["one", "batch", "2d"])
def test_rope_matches_apply_rotary_pos_emb(device, dtype, shape, cos_batch, rng):
    batch, seq, heads, head_dim = shape
    x, cos, sin = rope_inputs(*shape, dtype, device, rng, 1 if cos_batch != "batch" else batch)
    k = randn(batch, seq, 1, head_dim, dtype=dtype, device=device, gen=rng)  # one kv head (GQA)
    if cos_batch == "2d":
        cos, sin = cos[0], sin[0]
    cos_b, sin_b = (cos[None], sin[None]) if cos.dim() == 2 else (cos, sin)
    dq, dk = randn(*x.shape, dtype=dtype, device=device, gen=rng), randn(*k.shape, dtype=dtype, device=device, gen=rng)

    xq, kq = x.clone().requires_grad_(), k.clone().requires_grad_()
    q_out, k_out = L.apply_rope(xq, kq, cos, sin)
    (q_out.float() * dq.float()).sum().add((k_out.float() * dk.float()).sum()).backward()
    # transformers works on [B, H, T, Dh] and unsqueezes cos/sin at dim 1
    xe, ke = x.clone().requires_grad_(), k.clone().requires_grad_()
    qe, kee = apply_rotary_pos_emb(xe.transpose(1, 2), ke.transpose(1, 2), cos_b, sin_b)
    qe, kee = qe.transpose(1, 2), kee.transpose(1, 2)
    (qe.float() * dq.float()).sum().add((kee.float() * dk.float()).sum()).backward()
    x64, k64 = x.double().requires_grad_(), k.double().requires_grad_()
    q64, k64o = apply_rotary_pos_emb(x64.transpose(1, 2), k64.transpose(1, 2), cos_b.double(), sin_b.double())
    (q64.transpose(1, 2) * dq.double()).sum().add((k64o.transpose(1, 2) * dk.double()).sum()).backward()

    ulp = {torch.float32: 2**-21, torch.float16: 2**-9, torch.bfloat16: 2**-6}[dtype]
    torch.testing.assert_close(q_out.float(), qe.float(), rtol=ulp, atol=ulp)
    torch.testing.assert_close(k_out.float(), kee.float(), rtol=ulp, atol=ulp)
    assert rel_err(q_out, q64.transpose(1, 2)) < TOL[dtype]
    for ours, theirs, exact in ((xq.grad, xe.grad, x64.grad), (kq.grad, ke.grad, k64.grad)):
        assert rel_err(ours, exact) < max(TOL[dtype], 1.05 * rel_err(theirs, exact))

    # in place: forward then backward (the transpose) gives x back up to rounding
    y = x.clone()
    assert L.rope_forward_(y, cos, sin) is y
    torch.testing.assert_close(y, q_out.detach(), rtol=0, atol=0)
    assert L.rope_backward_(y, cos, sin) is y
    assert rel_err(y, x) < 4 * TOL[dtype]


# ------------------------------------------------------- registration, compile
def test_opcheck(rng):
    x = torch.randn(4, 24, generator=rng, dtype=torch.float32)
    w = torch.randn(24, generator=rng)
    torch.library.opcheck(torch.ops.qforge.rms_norm_forward, (x.requires_grad_(), w, 1e-6))
    rstd = torch.rand(4, generator=rng) + 0.5
    torch.library.opcheck(torch.ops.qforge.rms_norm_backward, (torch.randn(4, 24, generator=rng), x.detach(), w, rstd))
    g, u = torch.randn(3, 10, generator=rng), torch.randn(3, 10, generator=rng)
    torch.library.opcheck(torch.ops.qforge.swiglu_forward, (g.requires_grad_(), u.requires_grad_()))
    torch.library.opcheck(torch.ops.qforge.swiglu_backward, (torch.randn(3, 10, generator=rng), g.detach(), u.detach()))
    torch.library.opcheck(torch.ops.qforge.swiglu_backward_,
                          (torch.randn(3, 10, generator=rng), g.detach().clone(), u.detach().clone()))
    q = torch.randn(2, 5, 3, 8, generator=rng)
    cos, sin = torch.randn(5, 8, generator=rng), torch.randn(5, 8, generator=rng)
    torch.library.opcheck(torch.ops.qforge.rope, (q.requires_grad_(), cos, sin, False))
    torch.library.opcheck(torch.ops.qforge.rope_, (q.detach().clone(), cos, sin, True))


def test_compiled_block_matches_eager(rng):
    def block(x, w, g_w, u_w, cos, sin):
        h = L.rms_norm(x, w, 1e-6)
        q, k = L.apply_rope(h.view(2, 5, 4, 8), h.view(2, 5, 4, 8) * 0.5, cos, sin)
        y = (q + k).view(2, 5, 32)
        return L.swiglu(y @ g_w, y @ u_w).sum()

    args = [torch.randn(2, 5, 32, generator=rng), torch.randn(32, generator=rng),
            torch.randn(32, 48, generator=rng), torch.randn(32, 48, generator=rng),
            torch.randn(5, 8, generator=rng), torch.randn(5, 8, generator=rng)]
    x1, x2 = args[0].clone().requires_grad_(), args[0].clone().requires_grad_()
    eager = block(x1, *args[1:])
    eager.backward()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(x2, *args[1:])
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(x2.grad, x1.grad)


# ------------------------------------------------------------------- errors
def test_bad_inputs_are_named():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match="rms_norm_forward: x must be float32, float16 or bfloat16, got int64"):
        L.rms_norm_forward(torch.ones(4, 8, dtype=torch.int64), w)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\) for x of shape \(4, 8\), got \(7,\)"):
        L.rms_norm_forward(x, torch.randn(7))
    with pytest.raises(ValueError, match="weight must be bfloat16 \\(as x\\) or float32, got float16"):
        L.rms_norm_forward(x.bfloat16(), w.half())
    with pytest.raises(ValueError, match="must be contiguous"):
        L.rms_norm_forward(torch.randn(8, 4).t(), w)
    with pytest.raises(ValueError, match="last \\(normalized\\) dimension of size > 0"):
        L.rms_norm_forward(torch.randn(4, 0), torch.randn(0))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        L.rms_norm_forward(x, w, -1.0)
    with pytest.raises(ValueError, match="rstd must be float32 of shape \\(4,\\)"):
        L.rms_norm_backward(x, x, w, torch.ones(3))
    with pytest.raises(ValueError, match="weight must be frozen"):
        L.rms_norm(x, w.clone().requires_grad_())
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        L.rms_norm_forward(x, torch.empty(8, device="meta"))
    with pytest.raises(ValueError, match=r"swiglu_forward: up has shape \(4, 7\) but gate has \(4, 8\)"):
        L.swiglu_forward(x, torch.randn(4, 7))
    with pytest.raises(ValueError, match="swiglu_backward: gate is bfloat16 but dout is float32"):
        L.swiglu_backward(x, x.bfloat16(), x.bfloat16())
    with pytest.raises(ValueError, match="gate and up must be different tensors"):
        L.swiglu_backward_(x, x, x)
    q = torch.randn(2, 5, 3, 8)
    with pytest.raises(ValueError, match="x must be \\[batch, seq, heads, head_dim\\]"):
        L.rope_forward_(q[0], torch.randn(5, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"cos/sin must be \[5, 8\] or \[1 or 2, 5, 8\]"):
        L.rope_forward_(q, torch.randn(3, 5, 8), torch.randn(3, 5, 8))
    with pytest.raises(ValueError, match="head_dim must be even"):
        L.rope_forward_(torch.randn(1, 2, 1, 5), torch.randn(2, 5), torch.randn(2, 5))
    with pytest.raises(ValueError, match="cos/sin must be bfloat16 \\(as x\\) or float32, got float16"):
        L.rope_backward_(q.bfloat16(), torch.randn(5, 8).half(), torch.randn(5, 8).half())
    with pytest.raises(ValueError, match="sin is float16 but cos is float32"):
        L.rope_forward_(q, torch.randn(5, 8), torch.randn(5, 8).half())
    cos = torch.randn(5, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="cos and sin have no gradient"):
        L.apply_rope(q.clone().requires_grad_(), q.clone(), cos, cos.detach())[0].sum().backward()
