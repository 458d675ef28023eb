"""The Python side of the C ABI, one module per capability: `nf4`, `loss`, `chat`, `layer`.

Each module holds its capability's ctypes declarations (over `qforge._lib`), and
for tensor capabilities its `torch.library` ops with their fake kernels, built on
the shared tensor helpers of `qforge._torch`. The public API lives in
`qforge.nf4`, `qforge.loss`, `qforge.chat` and `qforge.layer`, which import from here.

Nothing is imported eagerly: `qforge.chat` stays usable without importing torch.
Importing `qforge.ops.nf4` (or `qforge.nf4`) registers the NF4 ops, importing
`qforge.ops.loss` (or `qforge.loss`) the loss ops, `qforge.ops.layer` (or
`qforge.layer`) the layer-kernel ops.
"""
