"""Training through qforge.attention: every family the loader supports (NF4 + LoRA, loaded by
qforge.load) trains on a packed row with per-document losses and LoRA gradients equal to each
document run alone through transformers' own attention; the packer's cu_seqlens reach attention
so no T x T tensor exists; `--attention` choices and their errors."""
from __future__ import annotations

import pytest
import torch
from conftest import LargestAllocation

transformers = pytest.importorskip("transformers")

import qforge  # noqa: E402
from qforge.models import SUPPORTED_MODEL_TYPES  # noqa: E402
from qforge import attention as A, hf  # noqa: E402
from qforge import train as T  # noqa: E402

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=256, attention_dropout=0.0,
             initializer_range=0.1)
WINDOW = 6  # shorter than most documents below
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**SHAPE),
    "mistral": lambda: transformers.MistralConfig(**SHAPE, sliding_window=WINDOW),
    "qwen2": lambda: transformers.Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=WINDOW,
                                              max_window_layers=1),
    "qwen3": lambda: transformers.Qwen3Config(**SHAPE),
    "gemma2": lambda: transformers.Gemma2Config(**SHAPE, sliding_window=WINDOW, attn_logit_softcapping=2.0,
                                                final_logit_softcapping=5.0, query_pre_attn_scalar=8),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**SHAPE, sliding_window=WINDOW, query_pre_attn_scalar=8,
                                                         layer_types=["sliding_attention", "full_attention"]),
}
LENGTHS = [9, 1, 14, 3, 20, 2]  # longer than the window, and a length-1 document


def test_the_families_are_the_loaders():
    assert set(FAMILIES) == set(SUPPORTED_MODEL_TYPES)


def load_with_lora(tmp_path, family, seed=0):
    torch.manual_seed(seed)
    path = tmp_path / family
    transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).save_pretrained(str(path))
    model = qforge.load(path, dtype=torch.float32, device="cpu")
    qforge.add_lora(model, r=4, lora_alpha=8, seed=seed)
    with torch.no_grad():  # LoRA B starts at zero: make the adapters matter
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    hf.patch_causal_lm(model)
    return model.train()


def packed_batch(lengths, gen):
    ids = torch.randint(0, SHAPE["vocab_size"], (1, sum(lengths)), generator=gen)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    return ids, position_ids, cu


def doc_loss(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum")


def lora_grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_trains_packed_with_per_document_losses_of_the_unpacked_run(tmp_path, family):
    model = load_with_lora(tmp_path, family)
    own = model.config._attn_implementation  # transformers' choice: sdpa, or eager for Gemma 2
    ids, position_ids, cu = packed_batch(LENGTHS, torch.Generator().manual_seed(7))
    docs = ids[0].split(LENGTHS)

    unpacked = [doc_loss(model(input_ids=d[None]).logits[0], d) for d in docs]  # each document alone
    torch.stack(unpacked).sum().backward()
    want = lora_grads(model)

    assert A.use_for_training(model, "auto", "cpu") is True
    assert model.config._attn_implementation == "qforge"
    logits = model(input_ids=ids, position_ids=position_ids, **A.packed_inputs(cu, "cpu")).logits[0]
    packed = [doc_loss(part, d) for part, d in zip(logits.split(LENGTHS), docs)]
    torch.stack(packed).sum().backward()
    got = lora_grads(model)
    model.set_attn_implementation(own)

    # Gemma's RMSNorm and eager softmax compute in fp32 whatever the model's dtype (here fp32 too)
    tol = dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(torch.stack(packed), torch.stack(unpacked), **tol)
    assert len(got) == len(want) == 14 * SHAPE["num_hidden_layers"]  # A and B of 7 projections
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol, msg=lambda m: f"{name}: {m}")


def largest_allocation_of_train_step(model, batch):
    """One training micro-step as qforge train runs it: the batch's tensors, plus the packer's
    cu_seqlens when qforge.attention runs the model."""
    inputs = {name: batch[name] for name in ("input_ids", "position_ids", "labels")}
    if model.config._attn_implementation == "qforge":
        inputs.update(A.packed_inputs(batch["cu_seqlens"], "cpu"))
    with LargestAllocation() as watch:
        model(**inputs, num_items_in_batch=int((batch["labels"] != -100).sum()), use_cache=False).loss.backward()
    return watch.largest


def test_packed_train_step_allocates_no_tokens_by_tokens_tensor(tmp_path):
    from qforge.data import Example, PackedBatches

    model = load_with_lora(tmp_path, "llama")
    gen = torch.Generator().manual_seed(8)
    examples = [Example(torch.randint(0, 64, (n,), generator=gen).tolist(), torch.randint(0, 64, (n,)).tolist())
                for n in torch.randint(1, 60, (40,), generator=gen).tolist()]
    batch = PackedBatches(examples, 512, seed=0).batch(0)
    tokens = batch["input_ids"].shape[1]
    assert tokens > 400 and batch["cu_seqlens"].numel() > 8
    A.use_for_training(model, "auto", "cpu")
    assert largest_allocation_of_train_step(model, batch) < tokens * tokens
    # The watch sees such a tensor where there is one: transformers' SDPA path builds the mask.
    A.use_for_training(model, "sdpa", "cpu")
    assert largest_allocation_of_train_step(model, batch) >= tokens * tokens


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's errors")
@pytest.mark.parametrize("choice, match", [("flash", "no variable-length flash kernel on cpu"),
                                           ("flex", "backward on CUDA only"), ("fast", "expected one of")])
def test_attention_choices_that_cannot_train_here_are_clear_errors(tmp_path, choice, match):
    model = load_with_lora(tmp_path, "llama")
    with pytest.raises(ValueError, match=match):
        A.use_for_training(model, choice, "cpu")
    with pytest.raises(ValueError, match=match):  # before the run writes anything
        T.train(output=str(tmp_path / "run"), attention=choice, device="cpu", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's errors")
def test_cli_attention_option(tmp_path, capsys):
    from qforge import cli

    assert cli.main(["train", "--attention", "flash", "--device", "cpu", "--output", str(tmp_path / "run")]) == 2
    assert "--attention flash: no variable-length flash kernel on cpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse names the choices
        cli.main(["train", "--attention", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err
