"""qforge.chunked_linear (generic per-chunk autograd) against the unchunked computation."""
import pytest
import torch
import torch.nn.functional as F

from qforge.loss import ChunkedLinearLoss, chunked_linear

CUDA = torch.cuda.is_available()


def rel(a, r):
    a, r = a.double().cpu(), r.double().cpu()
    n = r.norm()
    return ((a - r).norm() / (n if n > 0 else 1.0)).item()


def ce_fn(h, w, y):
    return F.cross_entropy((h @ w.T).float(), y, ignore_index=-100)  # keeps the fp32 upcast


def kl_fn(h, w, y, teacher_h, *, teacher_w):
    """KL(teacher || student) per token, mean over the chunk's valid tokens."""
    s = (h @ w.T).float().log_softmax(-1)
    with torch.no_grad():
        t = (teacher_h @ teacher_w.T).float().log_softmax(-1)
    kl = (t.exp() * (t - s)).sum(-1)
    m = y != -100
    return (kl * m).sum() / m.sum()


def grpo_fn(h, w, y, old_logp, ref_logp, adv, mask, eps=0.2, beta=0.04):
    """GRPO per-token loss: clipped surrogate with advantages + k3 KL to a reference policy."""
    logp = (h @ w.T).float().log_softmax(-1).gather(-1, y.clamp(min=0)[:, None])[:, 0]
    ratio = torch.exp(logp - old_logp)
    surr = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    d = ref_logp - logp
    kl = torch.exp(d) - d - 1
    per_tok = -(surr - beta * kl)
    m = mask.float()
    return (per_tok * m).sum() / m.sum()


def data(n=45, d=16, v=73, seed=0, ignore=0.5, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) * 0.3).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore] = -100
    y[: n // 5] = -100  # a run of ignored tokens: whole chunks with nothing valid
    return h.to(device), w.to(device), y.to(device), g


def compare(loss_fn, h, w, y, extras, chunk, reduction="mean", valid=None, upstream=1.7, tol=1e-5):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = chunked_linear(hh, ww, y, loss_fn, chunk, *extras, reduction=reduction, valid=valid)
    (out * upstream).backward()
    H, W = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = loss_fn(H, W, y, *extras)
    (ref * upstream).backward()
    assert rel(out, ref) < tol, (out, ref)
    assert rel(hh.grad, H.grad) < tol * 5
    assert rel(ww.grad, W.grad) < tol * 5
    return out


@pytest.mark.parametrize("chunk", [1, 4, 7, 16, 45, 100, [10, 1, 20, 14], None])
def test_cross_entropy_equals_unchunked(chunk):
    h, w, y, _ = data(seed=1)
    compare(ce_fn, h, w, y, (), chunk)


def test_chunk_means_are_weighted_by_valid_counts():
    h, w, y, _ = data(n=40, seed=2, ignore=0.0)
    y[:9] = -100
    y[22:37] = -100  # chunks of 10 hold 1, 10, 2 and 3 valid tokens
    out = compare(ce_fn, h, w, y, (), 10)
    naive = torch.stack([ce_fn(h[i:i + 10], w, y[i:i + 10]) for i in range(0, 40, 10)]).mean()
    assert rel(out, naive) > 1e-3  # averaging chunk means would be wrong


def test_kl_to_teacher():
    h, w, y, g = data(seed=3, ignore=0.3)
    th = torch.randn(h.shape[0], 8, generator=g)
    tw = torch.randn(w.shape[0], 8, generator=g) * 0.5
    # per-token extras are split with the tokens; anything else is closed over
    compare(lambda h, w, y, th: kl_fn(h, w, y, th, teacher_w=tw), h, w, y, (th,), 6)


def test_grpo_loss():
    h, w, y, g = data(seed=4, ignore=0.0)
    n = h.shape[0]
    with torch.no_grad():
        logp = (h @ w.T).log_softmax(-1).gather(-1, y.clamp(min=0)[:, None])[:, 0]
    old = logp + 0.1 * torch.randn(n, generator=g)
    ref = logp + 0.2 * torch.randn(n, generator=g)
    adv = torch.randn(n, generator=g)
    mask = torch.rand(n, generator=g) < 0.7
    compare(grpo_fn, h, w, y, (old, ref, adv, mask), 5, valid=mask)


def test_sum_reduction_and_module():
    h, w, y, _ = data(seed=5)

    def ce_sum(h, w, y):
        return F.cross_entropy((h @ w.T).float(), y, reduction="sum")

    compare(ce_sum, h, w, y, (), 8, reduction="sum")
    mod = ChunkedLinearLoss(ce_fn, chunk_size=9)
    assert rel(mod(h, w, y), ce_fn(h, w, y)) < 1e-5


def test_bf16_keeps_fp32_upcast():
    h, w, y, _ = data(seed=6, dtype=torch.bfloat16)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = chunked_linear(hh, ww, y, ce_fn, 7, fp32_grad_weight=True)
    out.backward()
    H, W = h.double().requires_grad_(), w.double().requires_grad_()
    ref = F.cross_entropy(H @ W.T, y)
    ref.backward()
    assert out.dtype == torch.float32 and rel(out, ref) < 1e-2
    assert hh.grad.dtype == torch.bfloat16 and ww.grad.dtype == torch.bfloat16
    assert rel(hh.grad, H.grad) < 2e-2 and rel(ww.grad, W.grad) < 2e-2


def test_generic_errors():
    h, w, y, _ = data()
    with pytest.raises(ValueError, match="sum to N"):
        chunked_linear(h, w, y, ce_fn, [10, 10])
    with pytest.raises(ValueError, match="scalar"):
        chunked_linear(h.requires_grad_(), w, y, lambda h, w, y: (h @ w.T).sum(-1), 5)
    with pytest.raises(ValueError, match=r"\[V, D\]"):
        chunked_linear(h, w[:, :3], y, ce_fn, 5)


def test_generic_peak_memory_at_least_half_below_eager():
    from test_loss import cpu_peak_bytes
    n, d, v = 1024, 64, 8192
    h, w, y, _ = data(n=n, d=d, v=v, seed=7, ignore=0.1)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    gen = cpu_peak_bytes(lambda: chunked_linear(hh, ww, y, ce_fn, 64).backward())
    eager = cpu_peak_bytes(lambda: ce_fn(hh, ww, y).backward())
    assert gen < 0.5 * eager, (gen, eager)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_generic_cuda_memory_and_values():
    n, d, v = 4096, 512, 32000
    h, w, y, _ = data(n=n, d=d, v=v, seed=8, ignore=0.2, dtype=torch.bfloat16, device="cuda")

    def peak(fn):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn(hh, ww)
        out.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, out, hh.grad, ww.grad

    pg, og, ghg, gwg = peak(lambda a, b: chunked_linear(a, b, y, ce_fn, 512))
    pe, oe, ghe, gwe = peak(lambda a, b: ce_fn(a, b, y))
    assert pg < 0.5 * pe, (pg, pe)
    assert rel(og, oe) < 1e-3 and rel(ghg, ghe) < 2e-2 and rel(gwg, gwe) < 2e-2
