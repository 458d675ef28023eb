#!/usr/bin/env bash
# Build the offline Unsloth bundle DEST/site for the GPU machine (see README.md beside this file).
#
#   bash bench/unsloth/make_bundle.sh build-anchor
#
# Needs only pip with access to PyPI; the wheels are for the GPU host (CPython 3.12, x86_64
# manylinux), not for the python running this script. Every wheel is pinned by version and sha256,
# so every run installs the same files; DEST/site is rebuilt from scratch and swapped in at the
# end (nothing else in DEST is touched). PYTHON=... picks the interpreter that runs pip.
set -Eeuo pipefail
trap 'echo "make_bundle.sh: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 DEST   (e.g. build-anchor; creates DEST/site)" >&2
    exit 2
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FILES="$HERE/files"
PY="${PYTHON:-python3}"
DATASETS_STUB_VERSION=4.8.5     # must match __version__ in files/_fallback/datasets/__init__.py
MAX_KIB=$((35 * 1024))

mkdir -p "$1"
DEST="$(cd "$1" && pwd)"
STAGE="$DEST/.site.new"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK" "$STAGE"' EXIT

if ! "$PY" -m pip --version >/dev/null 2>&1; then
    echo "make_bundle.sh: '$PY -m pip' does not work (Debian: apt-get install python3-pip, or set PYTHON=...)" >&2
    exit 1
fi
if ! grep -q "^__version__ = \"$DATASETS_STUB_VERSION\"" "$FILES/_fallback/datasets/__init__.py"; then
    echo "make_bundle.sh: DATASETS_STUB_VERSION does not match files/_fallback/datasets/__init__.py" >&2
    exit 1
fi

# Packages installed into site/ (sha256 of the exact wheels of the bundle verified on the H200).
cat >"$WORK/site.txt" <<'EOF'
unsloth==2026.10.9 --hash=sha256:feb40b99bc4f8c543a36cbd0fe6e1410d6e4ac16bd4d0c731f607adce3d63bb0
unsloth-zoo==2026.10.9 --hash=sha256:f68e0576b0e9bd2ef85f19bf665132c576b52ee4df923fbb16c81538a3cde676
trl==1.15.0 --hash=sha256:9c9a4b68a184a0b6425293e9b152950f817af686f3758f70191fff4ded1391c7
bitsandbytes==0.50.2 --hash=sha256:55348a9a4a21bfd99cf8c7b32fe67b4030ae5c2a05738e03c1747f65fa6ec283
cut-cross-entropy==25.1.1 --hash=sha256:e46f26d348f6a67927d17e65c5a212e795be13dcad5b10a77a200d6b8102d9d1
EOF
# Packages installed into site/_fallback/ (end of sys.path; only used if the host lacks them).
# Pure-python wheels: charset_normalizer's cp312 wheels are mypyc-compiled, the bundle uses py3-none-any.
cat >"$WORK/fallback.txt" <<'EOF'
requests==2.34.2 --hash=sha256:2a0d60c172f83ac6ab31e4554906c0f3b3588d37b5cb939b1c061f4907e278e0
urllib3==2.8.0 --hash=sha256:0cf3cae568d36aa9576b28dfb35f11328f1cb974ca7647d9475ebb86c75ac6e3
charset-normalizer==3.5.3 --hash=sha256:96e268b0cbda016ac519513294fcd17032264085b600abaac58b93049477e132
EOF

PIP=("$PY" -m pip --disable-pip-version-check --no-input)
GPU_HOST=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
PURE=(--only-binary=:all: --python-version 3.12 --implementation py --abi none --platform any)

echo "== downloading wheels"
"${PIP[@]}" download --no-deps "${GPU_HOST[@]}" --require-hashes -r "$WORK/site.txt" -d "$WORK/wheels/site"
"${PIP[@]}" download --no-deps "${PURE[@]}" --require-hashes -r "$WORK/fallback.txt" -d "$WORK/wheels/fallback"

echo "== installing into $STAGE"
rm -rf "$STAGE"
"${PIP[@]}" install --no-deps --no-index --no-compile "${GPU_HOST[@]}" \
    --target "$STAGE" "$WORK"/wheels/site/*.whl
"${PIP[@]}" install --no-deps --no-index --no-compile "${GPU_HOST[@]}" \
    --target "$STAGE/_fallback" "$WORK"/wheels/fallback/*.whl

echo "== stripping"
# Console scripts, Unsloth Studio (web UI, ~82 MB) and its CLI: not imported by training.
rm -rf "$STAGE/bin" "$STAGE/_fallback/bin" "$STAGE/studio" "$STAGE/unsloth_cli"
# bitsandbytes: keep only the CUDA 13.0 and CPU libraries (the GPU host has torch +cu130).
for lib in "$STAGE"/bitsandbytes/libbitsandbytes_*.so; do
    case "$(basename "$lib")" in
        libbitsandbytes_cuda130.so | libbitsandbytes_cpu.so) ;;
        *) rm -f "$lib" ;;
    esac
done
for lib in libbitsandbytes_cuda130.so libbitsandbytes_cpu.so; do
    [ -f "$STAGE/bitsandbytes/$lib" ] || { echo "make_bundle.sh: bitsandbytes/$lib missing" >&2; exit 1; }
done

echo "== adding sitecustomize.py and import stubs"
cp -R "$FILES/." "$STAGE/"
DI="$STAGE/_fallback/datasets-$DATASETS_STUB_VERSION.dist-info"
mkdir -p "$DI"
printf 'stub\n' >"$DI/INSTALLER"
printf 'Metadata-Version: 2.1\nName: datasets\nVersion: %s\nSummary: %s\n' "$DATASETS_STUB_VERSION" \
    "Import-time stub of HF datasets for the offline Unsloth bundle (no pyarrow)." >"$DI/METADATA"
: >"$DI/RECORD"
printf 'datasets\n' >"$DI/top_level.txt"
find "$STAGE" -name __pycache__ -type d -prune -exec rm -rf {} +

rm -rf "$DEST/site"
mv "$STAGE" "$DEST/site"

kib=$(du -sk "$DEST/site" | cut -f1)
files=$(find "$DEST/site" -type f | wc -l)
printf 'bundle: %s/site  %d.%d MiB (%d KiB, %d files)\n' "$DEST" $((kib / 1024)) $((kib % 1024 * 10 / 1024)) "$kib" "$files"
if [ "$kib" -ge "$MAX_KIB" ]; then
    echo "make_bundle.sh: bundle is over 35 MiB" >&2
    exit 1
fi
