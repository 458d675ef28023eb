"""`qforge` command line. With no arguments it runs the main job on its embedded default:
`qforge train` with a tiny random Llama model and a built-in tool-calling dataset."""
from __future__ import annotations

import argparse
import sys
import time


def _demo(args) -> int:
    """Quantize a Llama-shaped weight to NF4, dequantize it on the GPU if there is one
    (else the CPU), check it against the CPU reference, and print the figures."""
    import torch

    from . import nf4
    from ._lib import built_with_cuda

    device = "cuda" if torch.cuda.is_available() and built_with_cuda() else "cpu"
    rows, cols = args.shape
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    weight = (torch.randn(rows, cols, generator=gen) * 0.02).to(dtype)
    print(f"qforge NF4 demo: weight {rows}x{cols} {args.dtype}, blocksize {args.blocksize}, "
          f"double-quantized absmax, on {device}")

    t0 = time.perf_counter()
    packed, state = nf4.quantize(weight.to(device), blocksize=args.blocksize, compress_statistics=True)
    out = nf4.dequantize(packed, state)
    if device == "cuda":
        torch.cuda.synchronize()
        reps, start = 20, time.perf_counter()
        for _ in range(reps):
            nf4.dequantize(packed, state, out=out)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / reps
    else:
        reps, start = 3, time.perf_counter()
        for _ in range(reps):
            nf4.dequantize(packed, state, out=out)
        seconds = (time.perf_counter() - start) / reps
    elapsed = time.perf_counter() - t0

    reference = nf4.dequantize(packed.cpu(), state.to("cpu"))  # the CPU twin defines the result
    identical = torch.equal(out.cpu().view(torch.int16 if out.element_size() == 2 else torch.int32),
                            reference.view(torch.int16 if reference.element_size() == 2 else torch.int32))
    err = (reference.float() - weight.float()).abs()
    moved = packed.numel() + out.numel() * out.element_size()
    stored = packed.numel() + state.absmax.numel() + 4 * (state.state2.absmax.numel() + 256 + 16 + 1)
    print(f"  storage        {stored / 2**20:8.2f} MiB  ({8 * stored / weight.numel():.3f} bits/weight, "
          f"{weight.numel() * weight.element_size() / stored:.2f}x smaller than {args.dtype})")
    print(f"  dequantize     {seconds * 1e6:8.1f} us per call  ({moved / seconds / 1e9:.1f} GB/s moved)")
    print(f"  error vs {args.dtype}  max {err.max().item():.5f}  mean {err.mean().item():.6f}  "
          f"(relative mean {(err.mean() / weight.float().abs().mean()).item():.4f})")
    print(f"  {device} result vs CPU reference: {'bit-identical' if identical else 'DIFFERENT'}")
    print(f"  total {elapsed:.2f} s")
    return 0 if identical else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qforge", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="NF4 quantize/dequantize demo with a correctness check")
    demo.add_argument("--shape", type=int, nargs=2, default=(4096, 4096), metavar=("ROWS", "COLS"))
    demo.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    demo.add_argument("--blocksize", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    from .chat import add_cli as add_chat_cli
    from .evaluate import add_cli as add_eval_cli
    from .train import add_cli as add_train_cli

    add_train_cli(sub)
    add_eval_cli(sub)
    add_chat_cli(sub)
    from .gguf import add_cli as add_gguf_cli

    add_gguf_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # the embedded default main job
        args = parser.parse_args(["train"])
    try:
        return args.func(args)
    except ValueError as e:
        print(f"qforge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
