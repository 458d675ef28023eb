"""Masked-row compaction in linear_cross_entropy: rows labelled ignore_index are dropped before
the GEMMs, and the loss and gradients equal the uncompacted op's, for every reduction."""
import pytest
import torch

from qforge.loss import linear_cross_entropy, valid_rows


def case(seed=0, n=57, d=24, v=41, masked=0.6, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.3
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < masked] = ignore_index
    return h, w, y


def run(h, w, y, compact, reduction, **kw):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, y, reduction=reduction, compact=compact, chunk_size=16, **kw)
    upstream = (torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).reshape(loss.shape)
                if reduction == "none" else 1.7)
    (loss * upstream).sum().backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"z_loss": 1e-3},
                                     {"softcap": 5.0}, {"weight_per_class": "random"},
                                     {"ignore_index": 3}])
def test_compacted_equals_uncompacted(reduction, options):
    options = dict(options)
    ignore = options.get("ignore_index", -100)
    h, w, y = case(ignore_index=ignore)
    if options.get("weight_per_class") == "random":
        options["weight_per_class"] = torch.rand(w.shape[0], generator=torch.Generator().manual_seed(9)) + 0.5
    assert valid_rows(y, ignore) is not None  # the compacted path really runs
    full = run(h, w, y, False, reduction, **options)
    compact = run(h, w, y, True, reduction, **options)
    for a, b in zip(full, compact):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    masked = y == ignore
    assert torch.count_nonzero(compact[1][masked]) == 0  # ignored rows: zero gradient
    if reduction == "none":
        assert torch.count_nonzero(compact[0][masked]) == 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_batched_leading_shape(reduction):
    h, w, y = case(n=2 * 19)
    h3, y3 = h.reshape(2, 19, -1), y.reshape(2, 19)
    full = run(h3, w, y3, False, reduction)
    compact = run(h3, w, y3, True, reduction)
    for a, b in zip(full, compact):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert compact[0].shape == ((2, 19) if reduction == "none" else ())


def test_nothing_or_everything_masked_takes_the_uncompacted_path():
    h, w, y = case(masked=0.0)
    assert valid_rows(y, -100) is None
    y_all = torch.full_like(y, -100)
    assert valid_rows(y_all, -100) is None
    full = linear_cross_entropy(h, w, y_all, reduction="sum", compact=False)
    torch.testing.assert_close(linear_cross_entropy(h, w, y_all, reduction="sum"), full)


def test_valid_rows_are_the_unmasked_indices():
    y = torch.tensor([5, -100, 2, -100, -100, 0])
    assert valid_rows(y, -100).tolist() == [0, 2, 5]


@pytest.mark.cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_compacted_equals_uncompacted(reduction):
    h, w, y = (t.cuda() for t in case(n=300, d=64, v=1000))
    h, w = h.bfloat16(), w.bfloat16()
    full = run(h, w, y, False, reduction)
    compact = run(h, w, y, True, reduction)
    for a, b in zip(full, compact):
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-3)
