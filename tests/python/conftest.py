import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


def child_env() -> dict:
    """The environment for a child Python that must import the very qforge
    (package and library) this test process imported, installed or not."""
    import os
    from pathlib import Path

    import qforge
    from qforge import _lib

    package_parent = str(Path(qforge.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, QFORGE_LIBRARY=str(_lib.LIBRARY_PATH))


def free_port() -> int:
    """A TCP port free on this host now (for a process group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(argv: list, world: int, timeout: float, env: dict | None = None) -> list[tuple[int, str]]:
    """Runs ``world`` Pythons of ``argv`` as the ranks of one torch.distributed group on this
    host (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; one OpenMP thread each), in
    ``env`` (default child_env()). Returns each rank's (return code, output); when one outlives
    ``timeout`` all are killed and TimeoutExpired propagates."""
    import subprocess
    import sys

    port, base = free_port(), child_env() if env is None else env
    rendezvous = dict(WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace",
                              env=dict(base, RANK=str(rank), LOCAL_RANK=str(rank), **rendezvous))
             for rank in range(world)]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
        return [(p.returncode, text) for p, text in zip(procs, outputs)]
    finally:
        for p in procs:
            p.kill()  # a no-op for those that ended


def make_qlora(model, seed, targets=None, dropout=0.0):
    """A float transformers causal LM made trainable as qforge trains it: its projections NF4
    with LoRA r=4 (DEFAULT_TARGETS unless targets), every LoRA weight drawn away from B = 0 (which
    would hide every gradient but B's), the fused loss, train mode."""
    from qforge import hf
    from qforge.nn import DEFAULT_TARGETS, add_lora, lora_parameters, replace_linears

    targets = DEFAULT_TARGETS if targets is None else targets
    replace_linears(model, targets, blocksize=64)
    add_lora(model, r=4, lora_alpha=8, lora_dropout=dropout, seed=seed, target_modules=targets)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.05)
    hf.patch_causal_lm(model)
    model.train()
    return model


class LargestAllocation(TorchDispatchMode):
    """Records the element count of the largest tensor any op creates (a T x T mask shows up) and
    the bytes of all the tensors ops create (views included, so an upper bound)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.total_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.total_bytes += t.numel() * t.element_size()
        return out
