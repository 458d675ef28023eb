"""qforge.linear_cross_entropy (fused, C++ core) against an fp64 PyTorch reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from qforge.loss import LinearCrossEntropyLoss, auto_chunk_size, linear_cross_entropy

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
cuda_mark = pytest.mark.cuda


def dev_params():
    return [pytest.param("cpu")] + [pytest.param("cuda", marks=[pytest.mark.cuda,
                                     pytest.mark.skipif(not CUDA, reason="needs CUDA")])]


def reference(h, w, y, b=None, ignore_index=-100, label_smoothing=0.0, weight_per_class=None,
              reduction="mean", softcap=None, logit_scale=1.0, z_loss=0.0):
    """fp64 PyTorch: the unfused computation."""
    z = h @ w.T
    if b is not None:
        z = z + b
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, y, weight=weight_per_class, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction="none")
    valid = y != ignore_index
    lse = z.logsumexp(-1)
    loss = loss + z_loss * lse.pow(2) * valid
    if reduction == "none":
        return loss, lse
    if reduction == "sum":
        return loss.sum(), lse
    denom = weight_per_class[y[valid]].sum() if weight_per_class is not None else valid.sum()
    return loss.sum() / denom, lse


def rel(a, r):
    a, r = a.double().cpu(), r.double().cpu()
    n = r.norm()
    return ((a - r).norm() / (n if n > 0 else 1.0)).item()


TOL = {torch.float32: 2e-5, torch.bfloat16: 2.5e-2, torch.float16: 4e-3}


def make(n, d, v, dtype, device, ignore_frac=0.3, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * scale).to(dtype)
    w = (torch.randn(v, d, generator=g) / math.sqrt(d) * 2).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore_frac] = -100
    return h.to(device), w.to(device), b.to(device), y.to(device)


def check_case(device, dtype, n, d, v, chunk, reduction, use_bias, opts, seed=0, ignore_frac=0.3):
    h, w, b, y = make(n, d, v, dtype, device, ignore_frac, seed)
    if "ignore_index" in opts:
        y[y == -100] = opts["ignore_index"]
    if not use_bias:
        b = None
    ropts = dict(opts)
    if "weight_per_class" in opts:
        cw = torch.rand(v, generator=torch.Generator().manual_seed(seed + 7)) + 0.1
        opts = dict(opts, weight_per_class=cw.to(device))
        ropts = dict(opts, weight_per_class=cw.double())
    # reference on the very same (rounded) inputs, in fp64 on the CPU
    H, W = h.double().cpu().requires_grad_(), w.double().cpu().requires_grad_()
    B = b.double().cpu().requires_grad_() if b is not None else None
    ref, ref_lse = reference(H, W, y.cpu(), B, reduction=reduction, **ropts)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ref.backward(g)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    bb = b.clone().requires_grad_() if b is not None else None
    out, lse = linear_cross_entropy(hh, ww, y, bb, reduction=reduction, chunk_size=chunk,
                                    return_lse=True, **opts)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    out.backward(g.to(device=device, dtype=torch.float32))
    tol = TOL[dtype]
    assert rel(out, ref) < tol, (rel(out, ref), "loss")
    assert rel(lse, ref_lse) < tol
    assert hh.grad.dtype == dtype and ww.grad.dtype == dtype
    assert rel(hh.grad, H.grad) < tol * 2, (rel(hh.grad, H.grad), "grad_hidden")
    assert rel(ww.grad, W.grad) < tol * 2, (rel(ww.grad, W.grad), "grad_weight")
    if b is not None:
        assert bb.grad.dtype == dtype
        assert rel(bb.grad, B.grad) < tol * 2, (rel(bb.grad, B.grad), "grad_bias")


OPTIONS = [
    {},
    {"label_smoothing": 0.15},
    {"weight_per_class": True},
    {"weight_per_class": True, "label_smoothing": 0.3},
    {"softcap": 4.0},
    {"logit_scale": 0.6, "z_loss": 1e-3},
    {"softcap": 2.5, "logit_scale": 1.7, "label_smoothing": 0.1, "z_loss": 1e-2},
    {"ignore_index": 5},
]


@pytest.mark.parametrize("device", dev_params())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(sorted(o)) or "plain")
def test_options_fp32(device, reduction, opts):
    check_case(device, torch.float32, 41, 19, 157, 6, reduction, True, opts, seed=len(opts))


@pytest.mark.parametrize("device", dev_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_half_dtypes(device, dtype, reduction):
    check_case(device, dtype, 53, 40, 203, 16, reduction, True,
               {"label_smoothing": 0.1, "z_loss": 1e-3}, seed=3)


@pytest.mark.parametrize("device", dev_params())
@pytest.mark.parametrize("seed", range(6))
def test_random_shapes_and_chunks(device, seed):
    g = torch.Generator().manual_seed(100 + seed)
    n = int(torch.randint(1, 70, (1,), generator=g))
    d = int(torch.randint(1, 48, (1,), generator=g))
    v = int(torch.randint(2, 300, (1,), generator=g))
    chunk = int(torch.randint(1, n + 3, (1,), generator=g))
    red = ["mean", "sum", "none"][seed % 3]
    check_case(device, torch.float32, n, d, v, chunk, red, seed % 2 == 0, {}, seed=seed,
               ignore_frac=0.8 if seed % 2 else 0.2)


@pytest.mark.parametrize("device", dev_params())
def test_every_chunk_size(device):
    n, d, v = 13, 8, 29
    for chunk in list(range(1, n + 2)) + [None]:
        check_case(device, torch.float32, n, d, v, chunk, "mean", True, {"label_smoothing": 0.2})


@pytest.mark.parametrize("device", dev_params())
def test_all_ignored_and_empty(device):
    h, w, b, y = make(9, 8, 31, torch.float32, device)
    y[:] = -100
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(hh, ww, y)
    assert torch.isnan(loss)  # 0/0, like F.cross_entropy
    ref = F.cross_entropy((h @ w.T).double(), y)
    assert torch.isnan(ref)
    loss.backward()
    assert torch.all(hh.grad == 0) and torch.all(ww.grad == 0)
    s = linear_cross_entropy(h, w, y, reduction="sum")
    assert s.item() == 0.0
    # no tokens at all
    h0 = torch.zeros(0, 8, device=device, requires_grad=True)
    w0 = w.clone().requires_grad_()
    y0 = torch.zeros(0, dtype=torch.long, device=device)
    s0 = linear_cross_entropy(h0, w0, y0, reduction="sum")
    s0.backward()
    assert s0.item() == 0.0 and h0.grad.shape == (0, 8) and torch.all(w0.grad == 0)
    assert linear_cross_entropy(h0, w0, y0, reduction="none").shape == (0,)


@pytest.mark.parametrize("device", dev_params())
def test_batched_shape_module_and_fp32_grad_weight(device):
    h, w, b, y = make(2 * 11, 16, 45, torch.float32, device)
    h3, y2 = h.reshape(2, 11, 16), y.reshape(2, 11)
    mod = LinearCrossEntropyLoss(reduction="none", chunk_size=4)
    out = mod(h3, w, y2)
    ref, _ = reference(h.double(), w.double(), y, reduction="none")
    assert out.shape == (2, 11) and rel(out.reshape(-1), ref) < 1e-5
    ww = w.clone().requires_grad_()
    linear_cross_entropy(h, ww, y, chunk_size=3, fp32_grad_weight=True).backward()
    W = w.double().requires_grad_()
    reference(h.double(), W, y)[0].backward()
    assert ww.grad.dtype == torch.float32 and rel(ww.grad, W.grad) < 1e-5


@pytest.mark.parametrize("device", dev_params())
def test_no_grad_and_partial_grads(device):
    h, w, b, y = make(17, 12, 33, torch.float32, device)
    with torch.no_grad():
        l1 = linear_cross_entropy(h.requires_grad_(), w, y, b)
    ref, _ = reference(h.double(), w.double(), y, b.double())
    assert rel(l1, ref) < 1e-5 and not l1.requires_grad
    h.requires_grad_(False)
    ww = w.clone().requires_grad_()
    linear_cross_entropy(h, ww, y, b).backward()
    W = w.double().requires_grad_()
    reference(h.double(), W, y, b.double())[0].backward()
    assert rel(ww.grad, W.grad) < 1e-5


@pytest.mark.parametrize("device", dev_params())
def test_errors(device):
    h, w, b, y = make(8, 6, 20, torch.float32, device)
    with pytest.raises(ValueError, match="disagree on D"):
        linear_cross_entropy(h[:, :5], w, y)
    with pytest.raises(ValueError, match="leading shape"):
        linear_cross_entropy(h, w, y[:7])
    with pytest.raises(ValueError, match="integer"):
        linear_cross_entropy(h, w, y.float())
    with pytest.raises(ValueError, match=r"weight \(hidden's dtype\) must be float32, got float16"):
        linear_cross_entropy(h, w.half(), y)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        linear_cross_entropy(h.double(), w.double(), y)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="bias"):
        linear_cross_entropy(h, w, y, b[:3])
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(h, w, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy(h, w, y, softcap=-1.0)
    bad = y.clone()
    bad[0] = 0
    bad[5] = 20
    with pytest.raises(ValueError, match=r"labels\[5\] = 20 is out of range \[0, 20\)"):
        linear_cross_entropy(h, w, bad)
    bad[5] = -3
    with pytest.raises(ValueError, match=r"labels\[5\] = -3"):
        linear_cross_entropy(h, w, bad)


@pytest.mark.parametrize("device", dev_params())
def test_nan_propagates(device):
    h, w, b, y = make(10, 6, 20, torch.float32, device, ignore_frac=0.0)
    h[3, 2] = float("nan")
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(hh, ww, y)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.isnan(hh.grad[3]).all() and torch.isnan(ww.grad).any()
    per_tok = linear_cross_entropy(h, w, y, reduction="none")
    assert torch.isnan(per_tok[3]) and torch.isfinite(per_tok[torch.arange(10) != 3]).all()


def test_autocast_cpu():
    h, w, b, y = make(12, 16, 40, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, y)
    ref, _ = reference(h.bfloat16().double(), w.bfloat16().double(), y)
    assert rel(loss, ref) < 2e-2


def test_opcheck():
    h, w, b, y = make(9, 8, 21, torch.float32, "cpu")
    op = torch.ops.qforge.linear_cross_entropy.default
    for red in (0, 1, 2):
        args = (h.requires_grad_(), w.requires_grad_(), y, b.requires_grad_(), None, -100, 0.1,
                0.0, 1.0, 0.0, red, 4, True, True, True, True, True, False)
        torch.library.opcheck(op, args)
    g = torch.randn(9)
    torch.library.opcheck(torch.ops.qforge.linear_cross_entropy_backward.default,
                          (h.detach(), w.detach(), y, b.detach(), None, g, -100, 0.0, 0.0, 1.0,
                           0.0, 0, 4, True, True, True, False))


def test_compile_fullgraph_cpu():
    h, w, b, y = make(20, 16, 50, torch.float32, "cpu")

    def f(h, w, y, b):
        return linear_cross_entropy(h, w, y, b, label_smoothing=0.1, chunk_size=7) * 2.0

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
    out = cf(hh, ww, y, bb)
    out.backward()
    H, W, B = (t.double().requires_grad_() for t in (h, w, b))
    ref = reference(H, W, y, B, label_smoothing=0.1)[0] * 2
    ref.backward()
    assert rel(out, ref) < 1e-5 and rel(hh.grad, H.grad) < 1e-5 and rel(ww.grad, W.grad) < 1e-5


def cpu_peak_bytes(fn):
    """Peak CPU bytes allocated through torch's allocator while fn runs: the
    profiler's per-allocation records carry the running total."""
    import json
    import os
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    assert totals, "the profiler recorded no CPU allocation"
    return max(0, max(totals))


def test_cpu_peak_memory_bound():
    n, d, v = 512, 64, 4096
    h, w, b, y = make(n, d, v, torch.float32, "cpu")
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    chunk = 32

    def fused():
        linear_cross_entropy(hh, ww, y, chunk_size=chunk).backward()

    def eager():
        F.cross_entropy((hh @ ww.T).float(), y).backward()

    grads = (n * d + v * d) * 4
    peak_fused = cpu_peak_bytes(fused)
    peak_eager = cpu_peak_bytes(eager)
    logits = n * v * 4
    # fused: gradient buffers + one chunk's logits + small vectors
    ws = (chunk * v + 2 * chunk * d) * 4
    bound = grads + ws + 64 * n + (1 << 16)
    assert grads + ws <= peak_fused <= bound, (peak_fused, bound)  # the workspace is seen
    assert peak_eager > logits  # the eager path materialises the logits (at least)
    assert peak_fused < 0.5 * peak_eager


def test_auto_chunk_size():
    """The core's chunk (qf_lce_chunk_size): all tokens when they fit, else the largest
    128 * 2^k whose workspace fits the budget."""
    cpu = torch.device("cpu")
    assert auto_chunk_size(0, 8, 10, torch.float32, cpu) == 1
    assert auto_chunk_size(100, 8, 10, torch.float32, cpu) == 100
    budget = 448 << 20
    c = auto_chunk_size(16384, 4096, 128256, torch.bfloat16, cpu, budget_bytes=budget)
    workspace = (c * 128256 + 2 * c * 4096) * 4  # on the CPU: fp32 logits and two [chunk, D] rows
    assert workspace <= budget < 2 * workspace and c % 128 == 0
    c = auto_chunk_size(1000, 16, 50000, torch.float32, cpu, budget_bytes=10 * 50000 * 4)
    assert 1 <= c <= 10
    with pytest.raises(ValueError, match="float32, float16, bfloat16, got float64"):
        auto_chunk_size(100, 8, 10, torch.float64, cpu)


# ---------------------------------------------------------------- CUDA only
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu_twin(dtype):
    n, d, v = 77, 64, 1003
    h, w, b, y = make(n, d, v, dtype, "cpu", seed=11)
    outs = {}
    for dev in ("cpu", "cuda"):
        hh, ww, bb = (t.to(dev).clone().requires_grad_() for t in (h, w, b))
        loss = linear_cross_entropy(hh, ww, y.to(dev), bb, chunk_size=32, label_smoothing=0.1,
                                    softcap=20.0, fp32_grad_weight=True)
        loss.backward()
        outs[dev] = (loss, hh.grad, ww.grad, bb.grad)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for a, c in zip(outs["cpu"], outs["cuda"]):
        assert rel(c, a) < tol


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_peak_memory_bound():
    n, d, v = 4096, 1024, 32000
    h, w, b, y = make(n, d, v, torch.bfloat16, "cuda")
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    chunk = 512
    torch.cuda.synchronize()
    linear_cross_entropy(hh, ww, y, chunk_size=chunk).backward()  # warm-up (cuBLASLt handle)
    hh.grad = ww.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linear_cross_entropy(hh, ww, y, chunk_size=chunk).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = (n * d + v * d) * 2
    bound = grads + chunk * v * 2 + (33 << 20) + 8 * n + (4 << 20)
    assert extra <= bound, (extra, bound)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_compile_inductor():
    h, w, b, y = make(300, 64, 777, torch.bfloat16, "cuda")

    def f(h, w, y):
        return linear_cross_entropy(h, w, y, z_loss=1e-4)

    cf = torch.compile(f, fullgraph=True)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    cf(hh, ww, y).backward()
    H, W = h.double().cpu().requires_grad_(), w.double().cpu().requires_grad_()
    reference(H, W, y.cpu(), z_loss=1e-4)[0].backward()
    assert rel(hh.grad, H.grad) < 3e-2 and rel(ww.grad, W.grad) < 3e-2


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [150001, 257003])
def test_cuda_large_vocabularies(dtype, v):
    """Large vocabularies (rows of 150k-257k logits) match the fp64 reference."""
    for red in ("mean", "none"):
        check_case("cuda", dtype, 21, 24, v, 5, red, True, {"label_smoothing": 0.1, "z_loss": 1e-3},
                   seed=v % 97, ignore_frac=0.3)


@pytest.mark.parametrize("device", dev_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_inplace(device, dtype):
    from qforge.ops.loss import scale_inplace_
    x = torch.randn(1003, dtype=torch.float32).to(dtype).to(device)
    g = torch.tensor(0.3, device=device)
    want = (x.float() * 0.3).to(dtype)
    ptr = x.data_ptr()
    scale_inplace_(x, g)
    assert x.data_ptr() == ptr and torch.equal(x, want)
