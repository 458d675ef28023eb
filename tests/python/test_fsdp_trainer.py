"""transformers' Trainer and TRL's SFTTrainer train a qforge-loaded QLoRA model
unchanged under torchrun (two processes) with the challenge's FSDP2
configuration: full_shard auto_wrap on LlamaDecoderLayer, fsdp_version 2,
activation checkpointing, parameter offload.

accelerate applies FSDP only on accelerators: on two CPU processes the same
arguments give DistributedDataParallel (``cpu-ddp``: it must skip the frozen
NF4 weights when it broadcasts parameters). ``cpu-fsdp2`` lifts that one gate
(accelerate's device-type check; the process group is gloo) so that
accelerate's own FSDP2 preparation (fully_shard per LlamaDecoderLayer, embeddings,
tail and root, activation checkpointing, CPUOffloadPolicy) runs in CI; ``cuda``
is the real thing on two GPUs (run on the GPU machine)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qforge

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

HERE = Path(__file__).resolve()
FSDP_CONFIG = {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
               "activation_checkpointing": True, "offload_params": True}
STEPS = 4


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from qforge.data import builtin_dataset, render_texts
    from qforge.chat import ChatTemplate, llama3_template
    from qforge.models.tiny import write_default_model

    texts = render_texts(builtin_dataset(seed=0), ChatTemplate(llama3_template("3.1")),
                         {"bos_token": "<|begin_of_text|>"})
    return write_default_model(tmp_path_factory.mktemp("tiny") / "model", texts, seed=0)


def _torchrun(kind: str, device: str, model_dir: Path, out: Path) -> dict:
    root = str(Path(qforge.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(HERE), kind,
           device, str(model_dir), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return json.loads((out / "result.json").read_text())


def _check(result: dict, fsdp: bool) -> None:
    if fsdp:
        assert result["nf4_shard"] == ["DTensor", "NF4Weight"]  # the 4-bit codes are sharded, as uint8
        assert result["nf4_packed_dtype"] == "torch.uint8"
        assert result["layer_is_fsdp"] and result["root_is_fsdp"] and result["checkpointed"]
        assert result["offloaded"]  # offload_params: the shards live in CPU memory
    else:
        assert result["wrapper"] == "DistributedDataParallel"
    losses = result["losses"]
    assert len(losses) == STEPS and all(l == l and 0 < l < 20 for l in losses)
    assert result["lora_changed"] > 0  # the adapter trained
    assert result["frozen_unchanged"]  # the NF4 codes did not


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, two_gpus])


@pytest.mark.parametrize("device", ["cpu-ddp", "cpu-fsdp2", CUDA])
def test_trainer_with_the_fsdp2_config(tiny_model_dir, tmp_path, device):
    _check(_torchrun("trainer", device, tiny_model_dir, tmp_path), fsdp=device != "cpu-ddp")


@pytest.mark.parametrize("device", ["cpu-fsdp2", CUDA])
def test_trl_sft_trainer_with_the_fsdp2_config(tiny_model_dir, tmp_path, device):
    pytest.importorskip("trl")
    _check(_torchrun("sft", device, tiny_model_dir, tmp_path), fsdp=True)


# ------------------------------------------------------------------ the worker (one per rank)
def _worker(kind: str, device: str, model_dir: str, out: str) -> None:
    from transformers import Trainer, TrainingArguments

    from qforge import add_lora, hf, load, load_tokenizer
    from qforge.nn import NF4Linear, lora_state_dict

    torch.manual_seed(0)
    cuda = device == "cuda"
    if device == "cpu-fsdp2":
        _lift_accelerate_cpu_gate()
    where = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    use_cpu = device == "cpu-ddp"
    if cuda:
        torch.cuda.set_device(where)
    model = load(model_dir, dtype=torch.float32, device=where)
    add_lora(model, r=8, lora_alpha=16, seed=0)
    hf.patch_causal_lm(model)
    tok = load_tokenizer(model_dir)
    before = {k: v.detach().clone() for k, v in lora_state_dict(model).items()}
    codes_before = model.model.layers[0].self_attn.q_proj.weight.packed.cpu().clone()
    common = dict(output_dir=out, per_device_train_batch_size=2, max_steps=STEPS, learning_rate=5e-3,
                  logging_steps=1, save_strategy="no", report_to=[], use_cpu=use_cpu, bf16=cuda, dataloader_num_workers=0,
                  fsdp="full_shard auto_wrap", fsdp_config=FSDP_CONFIG, seed=0, disable_tqdm=True)
    g = torch.Generator().manual_seed(0)
    if kind == "trainer":
        rows = []
        for _ in range(16):
            ids = torch.randint(10, len(tok), (32,), generator=g).tolist()
            rows.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * 32})
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=rows)
    else:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        from qforge.data import builtin_dataset

        data = Dataset.from_list([{"messages": r["messages"]} for r in builtin_dataset(16, seed=0)])
        # SFTConfig turns on gradient checkpointing by default; the FSDP config's own
        # activation_checkpointing does it here (transformers refuses both at once)
        config = SFTConfig(**common, max_length=256, gradient_checkpointing=False)
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok)
    trainer.train()
    m = trainer.model_wrapped if hasattr(trainer, "model_wrapped") else trainer.model
    from torch.distributed.fsdp import FSDPModule

    base = trainer.model
    q = next(mod for mod in base.modules() if isinstance(mod, NF4Linear))
    shard = q.weight
    local = shard.to_local() if hasattr(shard, "to_local") else shard
    # the whole LoRA weights (a collective) compared with their initial values
    # (accelerate's activation checkpointing wraps each layer: its names gain "_checkpoint_wrapped_module.")
    after = {k.replace("_checkpoint_wrapped_module.", ""): (v.full_tensor() if hasattr(v, "full_tensor") else v).detach()
             for k, v in lora_state_dict(base).items()}
    assert set(after) == set(before), sorted(set(after) ^ set(before))[:4]
    changed = sum(int(not torch.equal(after[k].cpu(), before[k].cpu())) for k in before)
    q0 = base.model.layers[0].self_attn.q_proj.weight
    result = {"wrapper": type(m).__name__, "nf4_shard": [type(shard).__name__, type(local).__name__],
              "nf4_packed_dtype": str(local.packed.dtype), "offloaded": local.device.type == "cpu",
              "layer_is_fsdp": any(isinstance(x, FSDPModule) for x in base.model.layers[0].modules()),
              "checkpointed": any("CheckpointWrapper" in type(x).__name__ for x in base.modules()),
              "root_is_fsdp": isinstance(m, FSDPModule) or isinstance(base, FSDPModule),
              "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
              "lora_changed": changed, "frozen_unchanged": torch.equal(_whole_codes(q0), codes_before)}
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out, "result.json").write_text(json.dumps(result))


def _lift_accelerate_cpu_gate() -> None:
    """Let accelerate take its FSDP path on CPU processes: it enables FSDP only for
    accelerator device types, so report one (the group is gloo, the device the CPU)."""
    import accelerate.state as state
    import torch.distributed as dist
    from accelerate.utils import DistributedType

    dist.init_process_group("gloo")
    prepare = state.PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        prepare(self, cpu, sagemaker_dp, backend)
        return "gloo", DistributedType.MULTI_GPU

    def set_device(self):
        self.device = torch.device("cpu")

    state.PartialState._prepare_backend = prepare_backend
    state.PartialState.set_device = set_device


def _whole_codes(weight) -> torch.Tensor:
    """The packed codes of an NF4 weight, its ranks' shards gathered when it is sharded."""
    import torch.distributed as dist

    if not hasattr(weight, "to_local"):
        return weight.packed.cpu()
    local = weight.to_local()
    packed = local.packed.to(torch.device("cuda") if dist.get_backend() == "nccl" else "cpu")
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, packed.contiguous())
    return torch.cat([p.cpu() for p in parts])


if __name__ == "__main__":
    _worker(*sys.argv[1:5])
    from qforge.distributed import exit_worker

    exit_worker()  # results written; skip the teardown that can abort on gloo
