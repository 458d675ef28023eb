"""qforge.attention.attention: every backend against an fp64 reference on packed rows, and the
"qforge" transformers attention implementation training packed rows of each model family."""
import pytest
import torch
from conftest import LargestAllocation

from qforge import attention as A


def random_cu_seqlens(batch, tokens, gen):
    """Document boundaries for `batch` rows of `tokens`: random lengths, each row with a length-1 doc."""
    bounds = [0]
    for row in range(batch):
        lengths = [1]
        while sum(lengths) < tokens:
            lengths.append(min(int(torch.randint(1, 12, (1,), generator=gen)), tokens - sum(lengths)))
        perm = torch.randperm(len(lengths), generator=gen).tolist()
        for i in perm:
            bounds.append(bounds[-1] + lengths[i])
    return torch.tensor(bounds, dtype=torch.int32)


def reference(q, k, v, cu, causal, window, softcap, scale):
    """fp64 attention with the whole mask spelled out: same document, causal, |i - j| < window."""
    B, H, T, D = q.shape
    n = B * T
    q, k, v = (x.double().permute(1, 0, 2, 3).reshape(x.shape[1], n, D) for x in (q, k, v))
    k, v = k.repeat_interleave(H // k.shape[0], 0), v.repeat_interleave(H // v.shape[0], 0)
    doc = torch.searchsorted(cu[1:].long(), torch.arange(n), right=True)
    i = torch.arange(n)
    allowed = doc[:, None] == doc[None, :]
    if causal:
        allowed &= i[:, None] >= i[None, :]
    if window is not None:
        allowed &= (i[:, None] - i[None, :]).abs() < window
    scores = q @ k.transpose(-1, -2) * (D ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    return out.reshape(H, B, T, D).permute(1, 0, 2, 3)


CASES = [  # causal, sliding_window, softcap, scale
    (True, None, None, None),
    (False, None, None, None),
    (True, 4, None, None),
    (True, None, 2.0, None),
    (True, 3, 1.5, 0.3),
    (False, 5, 2.0, None),
]


def inputs(seed, batch=2, tokens=40, hq=4, hkv=2, d=16, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, tokens, d, generator=gen, dtype=dtype).requires_grad_()
    k = torch.randn(batch, hkv, tokens, d, generator=gen, dtype=dtype).requires_grad_()
    v = torch.randn(batch, hkv, tokens, d, generator=gen, dtype=dtype).requires_grad_()
    return q, k, v, random_cu_seqlens(batch, tokens, gen), gen


def check_against_reference(backend, case, seed, grads):
    causal, window, softcap, scale = case
    q, k, v, cu, gen = inputs(seed)
    if not grads:
        q, k, v = q.detach(), k.detach(), v.detach()
    expected = reference(q, k, v, cu, causal, window, softcap, scale)
    out = A.attention(q, k, v, cu_seqlens=cu, causal=causal, sliding_window=window, softcap=softcap,
                      scale=scale, backend=backend)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    if grads:
        go = torch.randn(expected.shape, generator=gen, dtype=expected.dtype)
        want = torch.autograd.grad(expected, (q, k, v), go)
        got = torch.autograd.grad(out, (q, k, v), go)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_documents_backend_matches_fp64_reference_forward_and_gradients(case, seed):
    check_against_reference("documents", case, seed, grads=True)


@pytest.mark.parametrize("case", CASES)
def test_auto_on_cpu_matches_fp64_reference_forward_and_gradients(case):
    check_against_reference("auto", case, 2, grads=True)


@pytest.mark.parametrize("case", CASES)
def test_flex_backend_matches_fp64_reference(case):
    # torch runs FlexAttention's backward on CUDA only; on CPU the forward is what can be checked.
    check_against_reference("flex", case, 3, grads=False)


def packed_bounds(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def random_lengths(seed):
    """One packed row of a random token count (1 to 1000, mostly not a multiple of 128): documents
    of length 1, short ones and ones spanning several 128-token blocks."""
    gen = torch.Generator().manual_seed(seed)
    tokens = int(torch.randint(1, 1001, (1,), generator=gen))
    lengths = []
    while sum(lengths) < tokens:
        kind = int(torch.randint(0, 3, (1,), generator=gen))
        longest = (1, 20, 400)[kind]
        lengths.append(min(int(torch.randint(1, longest + 1, (1,), generator=gen)), tokens - sum(lengths)))
    return lengths


BLOCK_MASK_LAYOUTS = {  # document lengths of the packed tokens
    "one document": [300],
    "one document of two whole blocks": [256],
    "fewer than 128 tokens": [1, 30, 2, 40],
    "one token": [1],
    "length-1 documents between long ones": [1, 200, 1, 1, 140, 257, 1],
    **{f"random {seed}": random_lengths(seed) for seed in range(8)},
}
MASK_KINDS = [(True, None), (True, 1), (True, 100), (True, 128), (True, 300), (False, None), (False, 100)]


@pytest.mark.parametrize("causal, window", MASK_KINDS)
@pytest.mark.parametrize("layout", sorted(BLOCK_MASK_LAYOUTS))
def test_flex_block_mask_from_document_bounds_equals_create_block_mask(layout, causal, window):
    """Every tensor of the block mask classified from the document bounds equals torch's
    create_block_mask over the whole T x T mask (partial blocks, full blocks, both orders)."""
    from torch.nn.attention.flex_attention import create_block_mask

    cu = packed_bounds(BLOCK_MASK_LAYOUTS[layout])
    tokens = int(cu[-1])
    got = A._build_block_mask(cu, tokens, causal, window)
    want = create_block_mask(A._document_mask_mod(cu, tokens, causal, window), 1, None, tokens, tokens,
                             device="cpu", BLOCK_SIZE=A.FLEX_BLOCK)
    assert got.seq_lengths == want.seq_lengths and tuple(got.BLOCK_SIZE) == tuple(want.BLOCK_SIZE)
    for name in A._BLOCK_MASK_TENSORS:
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(got.to_dense(), want.to_dense())


@pytest.mark.parametrize("causal, window", [(True, None), (True, 300), (False, 140)])
def test_compiled_flex_with_the_block_mask_matches_fp64_reference(causal, window):
    """Compiled, flex reads the block mask's blocks (eager flex evaluates mask_mod everywhere):
    two rows of 600 tokens (1200 in all, not a multiple of 128) with documents over several
    blocks, so full and partial blocks both occur; dropping the full blocks changes the result."""
    from torch.nn.attention.flex_attention import flex_attention

    cu = packed_bounds([1, 399, 13, 187, 1, 499, 100])
    gen = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(2, 2, 600, 16, generator=gen) for _ in range(3))
    mask = A._build_block_mask(cu, 1200, causal, window)
    assert int(mask.full_kv_num_blocks.sum()) > 0 and int(mask.kv_num_blocks.sum()) > 0
    flex = torch.compile(flex_attention, dynamic=False)

    def run(block_mask):
        out = flex(A._token_major(q), A._token_major(k), A._token_major(v), block_mask=block_mask)
        return A._batch_major(out, 2, 600).double()

    expected = reference(q, k, v, cu, causal, window, None, None)
    torch.testing.assert_close(run(mask), expected, rtol=1e-5, atol=1e-5)
    no_full = [getattr(mask, name) for name in A._BLOCK_MASK_TENSORS]
    no_full[2], no_full[6] = torch.zeros_like(no_full[2]), torch.zeros_like(no_full[6])
    assert not torch.allclose(run(A._as_block_mask(no_full, cu, 1200, causal, window)), expected, atol=1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("causal, window", [(True, None), (True, 300), (False, 140)])
def test_flex_on_cuda_with_full_blocks_matches_fp64_reference_and_gradients(causal, window):
    cu = packed_bounds([1, 399, 13, 187, 1, 499, 100])
    gen = torch.Generator().manual_seed(22)
    cpu = [torch.randn(2, h, 600, 64, generator=gen, dtype=torch.float64).requires_grad_() for h in (4, 2, 2)]
    q, k, v = (x.detach().float().cuda().requires_grad_() for x in cpu)
    expected = reference(*cpu, cu, causal, window, None, None)
    out = A.attention(q, k, v, cu_seqlens=cu.cuda(), causal=causal, sliding_window=window, backend="flex")
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-4, atol=1e-4)
    go = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad(expected, cpu, go)
    got = torch.autograd.grad(out, (q, k, v), go.float().cuda())
    for w, g in zip(want, got):
        torch.testing.assert_close(g.double().cpu(), w, rtol=1e-4, atol=1e-4)


def test_flex_block_mask_at_64k_tokens_allocates_nothing_tokens_by_tokens():
    """At 64k packed tokens the block mask's largest tensor is (64k / 128)^2 elements, and all it
    allocates is far below T^2 bytes (torch's create_block_mask: ~10 bytes a pair, 40 GiB)."""
    from torch.nn.attention.flex_attention import create_block_mask

    tokens = 65536
    gen = torch.Generator().manual_seed(23)
    lengths = [1]
    while sum(lengths) < tokens:
        lengths.append(min(int(torch.randint(1, 8193, (1,), generator=gen)), tokens - sum(lengths)))
    cu = packed_bounds(lengths)
    for causal, window in ((True, None), (True, 4096), (False, None)):
        with LargestAllocation() as watch:
            mask = A._block_mask(cu, tokens, causal, window)
        assert mask.kv_indices.shape == (1, 1, 512, 512)
        assert watch.largest <= (tokens // A.FLEX_BLOCK) ** 2
        assert watch.total_bytes < 2 ** 27, watch.total_bytes  # 128 MiB, against T^2 bytes = 4 GiB
    # The watch sees a T x T tensor where there is one: create_block_mask's (at 2k tokens).
    small = 2048
    cu = packed_bounds([1, 1000, 1047])
    with LargestAllocation() as watch:
        create_block_mask(A._document_mask_mod(cu, small, True, None), 1, None, small, small, device="cpu")
    assert watch.largest >= small * small


def test_flex_block_mask_op_passes_opcheck_and_checks_its_inputs():
    cu = packed_bounds([1, 199, 100])
    for causal, window in MASK_KINDS[:3] + MASK_KINDS[-1:]:
        torch.library.opcheck(torch.ops.qforge.flex_block_mask.default, (cu, 300, causal, window))
    for bad, tokens, window, match in ((packed_bounds([1, 199, 100]), 301, None, "rise strictly"),
                                       (torch.tensor([0, 5, 3, 300]), 300, None, "rise strictly"),
                                       (cu.float(), 300, None, "int32/int64"),
                                       (cu, 300, 0, "sliding_window")):
        with pytest.raises(ValueError, match=match):
            torch.ops.qforge.flex_block_mask(bad, tokens, True, window)


def test_document_attention_ops_pass_torch_opcheck_and_check_their_inputs():
    """The documents backend as torch ops: fake kernels, autograd registration and schema agree
    with the real kernels (torch.library.opcheck), and each op names bad inputs itself."""
    q, k, v, cu, gen = inputs(14, tokens=24)
    for causal, window, softcap, scale in CASES:
        torch.library.opcheck(torch.ops.qforge.document_attention.default,
                              (q, k, v, cu, causal, window, softcap, scale))
    go = torch.randn(q.shape, generator=gen, dtype=q.dtype)
    torch.library.opcheck(torch.ops.qforge.document_attention_backward.default,
                          (go, q.detach(), k.detach(), v.detach(), cu, True, 5, 2.0, None))
    with pytest.raises(ValueError, match="rise strictly"):
        torch.ops.qforge.document_attention(q, k, v, cu.flip(0), True, None, None, None)
    with pytest.raises(ValueError, match="not a multiple"):
        torch.ops.qforge.document_attention(q[:, :3], k, v, cu, True, None, None, None)
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.qforge.document_attention_backward(go[:, :, :5], q, k, v, cu, True, None, None, None)


def test_flex_backward_on_cpu_is_a_clear_error():
    q, k, v, cu, gen = inputs(3)
    with pytest.raises(ValueError, match="backward on CUDA only"):
        A.attention(q, k, v, cu_seqlens=cu, backend="flex")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["flex", "varlen", "flash_attn", "auto"])
@pytest.mark.parametrize("case", CASES)
def test_cuda_backends_match_reference_in_bf16(backend, case):
    if backend not in A.available_backends("cuda") and backend != "auto":
        pytest.skip(f"{backend} is not installed here")
    causal, window, softcap, scale = case
    if backend == "varlen" and softcap is not None:
        pytest.skip("torch's varlen attention has no softcap")
    q, k, v, cu, gen = inputs(4, tokens=256, d=64)
    q, k, v = (x.detach().cuda().bfloat16().requires_grad_() for x in (q, k, v))
    expected = reference(q.cpu(), k.cpu(), v.cpu(), cu, causal, window, softcap, scale)
    out = A.attention(q, k, v, cu_seqlens=cu.cuda(), causal=causal, sliding_window=window, softcap=softcap,
                      scale=scale, backend=backend)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=2e-2, atol=2e-2)
    out.float().square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def flash_convention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size, scale=None, softmax_scale=None,
                            causal=False, enable_gqa=True, softcap=0.0):
    """A CPU stand-in for flash-style varlen kernels, by their documented contract: tokens [N, H, D],
    window_size (left, right) lets query i see keys i-left..i+right (-1: unbounded), causal caps right at 0."""
    assert cu_q.dtype == torch.int32 and cu_q is cu_k and max_q == max_k >= int((cu_q[1:] - cu_q[:-1]).max())
    left, right = window_size
    right = 0 if causal else right
    n, h, d = q.shape
    doc = torch.searchsorted(cu_q[1:].long(), torch.arange(n), right=True)
    i = torch.arange(n)
    allowed = doc[:, None] == doc[None, :]
    if left >= 0:
        allowed &= i[None, :] >= i[:, None] - left
    if right >= 0:
        allowed &= i[None, :] <= i[:, None] + right
    k, v = (x.repeat_interleave(h // x.shape[1], 1).transpose(0, 1) for x in (k, v))
    scores = q.transpose(0, 1) @ k.transpose(-1, -2) * (scale or softmax_scale or d ** -0.5)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(0, 1)


@pytest.mark.parametrize("backend", ["varlen", "flash_attn"])
@pytest.mark.parametrize("case", CASES)
def test_varlen_backends_hand_kernels_their_layout_offsets_and_windows(backend, case, monkeypatch):
    """The CUDA kernels' plumbing, on CPU: the kernel is a stand-in that follows their contract."""
    if backend == "varlen" and case[2] is not None:
        pytest.skip("torch's varlen attention has no softcap")
    monkeypatch.setattr(A, "_varlen_attn", lambda: flash_convention_varlen)
    monkeypatch.setattr(A, "_flash_attn_varlen", lambda: flash_convention_varlen)
    monkeypatch.setattr(A, "available_backends", lambda device: [backend])
    check_against_reference(backend, case, 10, grads=True)


def test_varlen_of_a_torch_without_gqa_gets_the_kv_heads_repeated(monkeypatch):
    def kernel(q, k, v, *args, **options):
        assert "enable_gqa" not in options and k.shape[1] == v.shape[1] == q.shape[1]
        return flash_convention_varlen(q, k, v, *args, **options)

    monkeypatch.setattr(A, "_varlen_attn", lambda: kernel)
    monkeypatch.setattr(A, "_VARLEN_TAKES_GQA", False)
    monkeypatch.setattr(A, "available_backends", lambda device: ["varlen"])
    check_against_reference("varlen", CASES[2], 15, grads=True)


def test_varlen_takes_the_callers_longest_document_and_refuses_a_short_one(monkeypatch):
    seen = []

    def kernel(*args, **options):
        seen.append(args[5])
        return flash_convention_varlen(*args, **options)

    monkeypatch.setattr(A, "_varlen_attn", lambda: kernel)
    monkeypatch.setattr(A, "available_backends", lambda device: ["varlen"])
    q, k, v, cu, gen = inputs(13)
    longest = int((cu[1:] - cu[:-1]).max())
    expected = reference(q, k, v, cu, True, None, None, None)
    torch.testing.assert_close(A.attention(q, k, v, cu_seqlens=cu, backend="varlen"), expected)
    torch.testing.assert_close(A.attention(q, k, v, cu_seqlens=cu, backend="varlen", max_seqlen=longest + 5), expected)
    assert seen == [longest, longest + 5]
    with pytest.raises(ValueError, match="max_seqlen"):
        A.attention(q, k, v, cu_seqlens=cu, backend="varlen", max_seqlen=longest - 1)


def test_dense_sdpa_backend_matches_reference_and_refuses_packed_rows():
    q, k, v, cu, gen = inputs(5)
    rows = torch.tensor([0, 40, 80], dtype=torch.int32)
    torch.testing.assert_close(A.attention(q, k, v, backend="sdpa"), reference(q, k, v, rows, True, None, None, None))
    torch.testing.assert_close(A.attention(q, k, v, sliding_window=6, backend="sdpa"),
                               reference(q, k, v, rows, True, 6, None, None))
    with pytest.raises(ValueError, match="dense batches"):
        A.attention(q, k, v, cu_seqlens=cu, backend="sdpa")
    with pytest.raises(ValueError, match="no softcap"):
        A.attention(q, k, v, softcap=3.0, backend="sdpa")


def test_cu_seqlens_from_position_ids_and_padding():
    pos = torch.tensor([[0, 1, 2, 0, 0, 1], [5, 6, 7, 8, 0, 1]])
    assert A.cu_seqlens_from_position_ids(pos).tolist() == [0, 3, 4, 6, 10, 12]
    pad = torch.tensor([[True] * 6, [True, True, True, True, False, False]])
    assert A.cu_seqlens_from_position_ids(pos, pad).tolist() == [0, 3, 4, 6, 10, 11, 12]
    with pytest.raises(ValueError, match="position_ids"):
        A.cu_seqlens_from_position_ids(pos.float())
    with pytest.raises(ValueError, match="padding mask"):
        A.cu_seqlens_from_position_ids(pos, pad[:, :3])


def test_packer_cu_seqlens_are_the_position_ids_boundaries():
    from qforge.data import Example, PackedBatches

    gen = torch.Generator().manual_seed(11)
    examples = [Example([1] * n, [1] * n) for n in torch.randint(1, 30, (40,), generator=gen).tolist()]
    batches = PackedBatches(examples, 64, seed=3)
    for i in range(batches.batches_per_epoch):
        b = batches.batch(i)
        assert b["cu_seqlens"].dtype == torch.int32
        assert torch.equal(b["cu_seqlens"], A.cu_seqlens_from_position_ids(b["position_ids"]))


@pytest.mark.parametrize("bad, match", [
    (dict(cu_seqlens=torch.tensor([0, 50, 80], dtype=torch.int32)), "crossing a row end"),
    (dict(cu_seqlens=torch.tensor([0, 40, 40, 80], dtype=torch.int32)), "rise strictly"),
    (dict(cu_seqlens=torch.tensor([0, 40, 79], dtype=torch.int32)), "rise strictly"),
    (dict(cu_seqlens=torch.tensor([0.0, 80.0])), "int32/int64"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(softcap=-1.0), "softcap"),
    (dict(backend="fast"), "unknown backend"),
    (dict(backend="varlen"), "not available on cpu"),
])
def test_bad_arguments_are_clear_errors(bad, match):
    q, k, v, cu, gen = inputs(6)
    with pytest.raises(ValueError, match=match):
        A.attention(q, k, v, **bad)


def test_cu_seqlens_changed_in_place_is_checked_again():
    q, k, v, cu, gen = inputs(7)
    A.attention(q, k, v, cu_seqlens=cu)  # checked, and remembered as checked
    cu[1] = cu[2]
    with pytest.raises(ValueError, match="rise strictly"):
        A.attention(q, k, v, cu_seqlens=cu)


def test_heads_not_a_multiple_is_a_clear_error():
    q = torch.zeros(1, 3, 8, 4)
    kv = torch.zeros(1, 2, 8, 4)
    with pytest.raises(ValueError, match="not a multiple"):
        A.attention(q, kv, kv)


# --- the "qforge" attention implementation in transformers -----------------------------------------

transformers = pytest.importorskip("transformers")

FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 6}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {}),
    "gemma2": ("Gemma2Config", {"sliding_window": 6, "attn_logit_softcapping": 2.0, "query_pre_attn_scalar": 8}),
    "gemma3": ("Gemma3TextConfig", {"sliding_window": 6, "query_pre_attn_scalar": 8}),
}


def tiny_model(family, attn_implementation, layers=2):
    cls, extra = FAMILIES[family]
    config = getattr(transformers, cls)(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=256, attention_dropout=0.0, use_cache=False,
                                        **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.double().train()


def doc_loss(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_model_trains_packed_with_per_document_losses_of_the_unpacked_run(family):
    name = A.register_with_transformers("auto")
    # The reference runs each document alone, through transformers' SDPA path (fp64 throughout), or for
    # Gemma 2's softcap its eager path. Gemma's RMSNorm and the eager softmax compute in fp32 whatever
    # the model's dtype, hence Gemma's looser tolerance.
    softcapped = "attn_logit_softcapping" in FAMILIES[family][1]
    reference_model = tiny_model(family, "eager" if softcapped else "sdpa")
    tol = dict(rtol=1e-5, atol=1e-6) if family.startswith("gemma") else dict(rtol=1e-9, atol=1e-11)
    packed_model = tiny_model(family, name)
    packed_model.load_state_dict(reference_model.state_dict())
    gen = torch.Generator().manual_seed(7)
    lengths = [9, 1, 14, 3, 20, 2]  # longer than the sliding window of 6, and a length-1 document
    docs = [torch.randint(0, 64, (n,), generator=gen) for n in lengths]

    unpacked = [doc_loss(reference_model(input_ids=d[None]).logits[0], d) for d in docs]
    torch.stack(unpacked).sum().backward()

    ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    logits = packed_model(input_ids=ids, position_ids=position_ids).logits[0]
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    packed = [doc_loss(logits[s:e], ids[0, s:e]) for s, e in zip(bounds[:-1], bounds[1:])]
    torch.stack(packed).sum().backward()

    torch.testing.assert_close(torch.stack(packed), torch.stack(unpacked), **tol)
    for (pname, p), q in zip(packed_model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m: f"{pname}: {m}")


def largest_allocation_of_packed_step(attn_implementation, tokens):
    model = tiny_model("llama", attn_implementation).float()
    gen = torch.Generator().manual_seed(8)
    lengths, pos = [], []
    while sum(lengths) < tokens:
        lengths.append(min(int(torch.randint(1, 48, (1,), generator=gen)), tokens - sum(lengths)))
        pos.append(torch.arange(lengths[-1]))
    ids = torch.randint(0, 64, (1, tokens), generator=gen)
    with LargestAllocation() as watch:
        model(input_ids=ids, position_ids=torch.cat(pos)[None], labels=ids).loss.backward()
    return watch.largest


def test_packed_batch_allocates_no_tokens_by_tokens_tensor():
    tokens = 512
    name = A.register_with_transformers("auto")
    assert largest_allocation_of_packed_step(name, tokens) < tokens * tokens
    # The watch sees such a tensor where there is one: transformers' SDPA path builds the mask.
    assert largest_allocation_of_packed_step("sdpa", tokens) >= tokens * tokens


def test_flex_block_mask_is_built_once_per_batch():
    name = A.register_with_transformers("flex")
    try:
        model = tiny_model("llama", name)
        ids = torch.randint(0, 64, (1, 30))
        position_ids = torch.cat([torch.arange(10), torch.arange(20)])[None]
        before = A.stats["block_masks_built"]
        with torch.no_grad():  # torch runs flex's backward on CUDA only
            packed = model(input_ids=ids, position_ids=position_ids).logits
        assert A.stats["block_masks_built"] == before + 1  # two layers, one block mask
        A.register_with_transformers("documents")
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids, position_ids=position_ids).logits, packed)
    finally:
        A.register_with_transformers("auto")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "each layer compiled"])
def test_flex_block_masks_are_built_once_per_batch_for_all_layers(compiled):
    """Gemma 2's four layers alternate sliding-window and global attention: two block masks a
    batch, however many layers, eager and with each layer's forward compiled (as under FSDP2),
    where the layers' graphs get the batch's cu_seqlens and the op hands them the cached masks."""
    name = A.register_with_transformers("flex")
    try:
        model = tiny_model("gemma2", name, layers=4).eval()
        reference_model = tiny_model("gemma2", "eager", layers=4).eval()
        reference_model.load_state_dict(model.state_dict())
        if compiled:
            torch._dynamo.reset()
            for layer in model.model.layers:
                layer.forward = torch.compile(layer.forward, fullgraph=True, dynamic=True, backend="aot_eager")
        gen = torch.Generator().manual_seed(24)
        for tokens in (37, 150, 200):
            cu = random_cu_seqlens(1, tokens, gen)
            lengths = (cu[1:] - cu[:-1]).tolist()
            ids = torch.randint(0, 64, (1, tokens), generator=gen)
            position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
            before = A.stats["block_masks_built"]
            with torch.no_grad():  # torch runs flex's backward on CUDA only
                got = model(input_ids=ids, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu).logits
                want = torch.cat([reference_model(input_ids=d).logits for d in ids.split(lengths, dim=1)], dim=1)
            assert A.stats["block_masks_built"] == before + 2
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    finally:
        A.register_with_transformers("auto")
        torch._dynamo.reset()


def test_kv_cache_and_dropout_are_clear_errors():
    name = A.register_with_transformers("auto")
    model = tiny_model("llama", name)
    with pytest.raises(ValueError, match="KV cache"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False, use_cache=True)
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="attention dropout"):
        model(input_ids=torch.tensor([[1, 2, 3]]))


def test_whole_model_compiles_once_or_twice_over_varied_packed_lengths():
    """fullgraph=True (no graph break) and dynamic lengths: 8 packed rows of varied lengths and
    document counts compile at most 3 times (flex's 128-token blocks cost one recompilation), and
    match each document run alone. cu_seq_lens_q comes with the batch, as a packer gives it, so the
    graph derives nothing from data. Forward only: torch runs flex's backward on CUDA only."""
    graphs = []

    def counting_backend(graph_module, example_inputs):  # Dynamo's graphs, run as traced
        graphs.append(graph_module)
        return graph_module.forward

    name = A.register_with_transformers("flex")
    try:
        model = tiny_model("llama", name).float().eval()
        reference_model = tiny_model("llama", "sdpa").float().eval()
        reference_model.load_state_dict(model.state_dict())
        compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counting_backend)
        torch._dynamo.reset()
        gen = torch.Generator().manual_seed(9)
        for tokens in (37, 64, 91, 128, 150, 200, 230, 97):
            cu = random_cu_seqlens(1, tokens, gen)
            lengths = (cu[1:] - cu[:-1]).tolist()
            ids = torch.randint(0, 64, (1, tokens), generator=gen)
            position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
            before = A.stats["block_masks_built"]
            with torch.no_grad():
                got = compiled(input_ids=ids, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu).logits
                want = torch.cat([reference_model(input_ids=d).logits for d in ids.split(lengths, dim=1)], dim=1)
            assert A.stats["block_masks_built"] == before + 1  # in the graph too: one block mask for both layers
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert 1 <= len(graphs) <= 3, f"{len(graphs)} compilations"
    finally:
        A.register_with_transformers("auto")
        torch._dynamo.reset()


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_each_row_alone(side):
    """Padding arrives as transformers' 2D mask; each padding token is a document of its own."""
    name = A.register_with_transformers("auto")
    model = tiny_model("mistral", name)
    reference_model = tiny_model("mistral", "sdpa")
    reference_model.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(12)
    rows = [torch.randint(1, 64, (n,), generator=gen) for n in (17, 9)]
    ids = torch.zeros(2, 17, dtype=torch.long)
    mask = torch.zeros(2, 17, dtype=torch.long)
    for r, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(17 - len(row), 17)
        ids[r, span], mask[r, span] = row, 1
    # Positions run on through the padding (left padding counts up to 0 at the first token), so
    # only the padding mask keeps the padding out of the rows' documents.
    pads_before = 17 - mask.sum(1, keepdim=True) if side == "left" else torch.zeros(2, 1, dtype=torch.long)
    position_ids = torch.arange(17) - pads_before
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    for r, row in enumerate(rows):
        want = reference_model(input_ids=row[None]).logits[0]
        torch.testing.assert_close(logits[r][mask[r].bool()], want, rtol=1e-9, atol=1e-11)


def test_backend_choice_for_cuda_traces_without_a_graph_break():
    # The CUDA choice once imported flash_attn inside the traced forward; where the package is
    # absent that import fails, which Dynamo turns into "Unsupported: Import failure" (seen on an
    # H200 with torch 2.11: whole-model --compile failed). The choice must trace cleanly anywhere.
    def cuda_choice(x):
        return x + len(A.available_backends("cuda"))

    compiled = torch.compile(cuda_choice, fullgraph=True, backend="eager")
    x = torch.zeros(3)
    assert torch.equal(compiled(x), cuda_choice(x))
