import pytest
import torch


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
