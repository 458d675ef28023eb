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


def leave_process(code: int = 0) -> None:
    """End a gloo child process once its results are written. Interpreter teardown can
    meet a gloo worker thread still holding tensors and abort ("terminate called
    without an active exception", pytorch#190489; seen once in CI after a passing run)."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
