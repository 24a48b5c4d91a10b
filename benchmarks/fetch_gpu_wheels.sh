#!/usr/bin/env bash
# Fetch, where PyPI is reachable, every wheel benchmarks/gpu_check.sh installs on a GPU machine
# without network, and split the large ones so each piece fits one 64 MiB transfer.
#
#   benchmarks/fetch_gpu_wheels.sh [--lean | --cuda13] [--xz] OUT_DIR
#
# What the GPU image lacks (it has Python 3.12, torch cu130, onnx, numpy, scipy, pytest, click):
# - onnxruntime-gpu 1.23.2, the pinned minor (it holds the CPU provider too);
# - the CUDA 12 libraries that build links against: `readelf -d` of its
#   libonnxruntime_providers_cuda.so needs libcudart.so.12, libcublas.so.12, libcublasLt.so.12,
#   libcufft.so.11, libcurand.so.10 and libcudnn.so.9 (build info: CUDA 12.2; nvrtc is not
#   linked, so it is not fetched). The image has the CUDA 13 ones only;
# - pure-Python packages: onnx-graphsurgeon (a declared dependency), and pytorch-grad-cam with
#   ttach for benchmarks/peers.py (grad-cam is published as an sdist only, so it is built here).
# Versions: the smallest wheel of each library at or above the CUDA 12.2 build (CUDA's minor
# version compatibility lets 12.2-built code use any 12.x library), and a cuDNN 9 minor newer
# than any ONNX Runtime 1.23 was built with.
#
# --lean leaves out cuDNN and cuRAND (600 MiB of the 1.3 GiB): libcudnn.so.9 and libcurand.so.10
# keep their sonames across CUDA 12 and 13, and the image's CUDA 13 builds of both sit in torch's
# site-packages, where gpu_check.sh looks for them when the wheel folder has none. Untested:
# whether ONNX Runtime's CUDA 12 build runs with cuDNN's CUDA 13 build; the GPU tests tell.
#
# --cuda13 fetches onnxruntime-gpu 1.30.0 instead, built for CUDA 13.0 (its CUDA provider needs
# libcudart.so.13, libcublas(Lt).so.13 and libcurand.so.10, all in the image's torch cu130
# wheels, and loads cuDNN 9 at run time), and no CUDA library at all: 235 MiB in 4 pieces. It is
# the same onnxruntime minor as the image's CPU onnxruntime, but not the 1.23 minor pyproject
# pins (1.30 needs Python >= 3.11), so it checks segattr-onnx on CUDA, not the pinned build.
#
# --xz rewrites each wheel over 60 MiB as an uncompressed zip (the same files, so the same
# RECORD) compressed with xz -9 into NAME.whl.xz, which gpu_check.sh turns back into the wheel.
# The wheels deflate each file alone, in 32 KiB windows; xz's 64 MiB window also finds the
# repeats between the kernels built for each GPU architecture. Measured (MiB, wheel -> xz):
# onnxruntime-gpu 287 -> 145, cuBLAS 347 -> 208, cuFFT 94 -> 48, cuDNN 545 -> ~366 (estimated
# from 92% of it). The price: compression here runs at under 1 MB/s on two cores (half an hour
# for the set; run it where long jobs are not cut off), decompression there takes under a minute.
set -euo pipefail

lean=0
cuda13=0
use_xz=0
while [[ ${1:-} == --* ]]; do
    case $1 in
        --lean) lean=1 ;;
        --cuda13) cuda13=1 ;;
        --xz) use_xz=1 ;;
        *)
            echo "unknown option $1" >&2
            exit 2
            ;;
    esac
    shift
done
if [[ $# -ne 1 ]]; then
    echo "usage: $0 [--lean | --cuda13] [--xz] OUT_DIR" >&2
    exit 2
fi
out_dir=$1
mkdir -p "$out_dir"

piece_bytes=$((60 * 1024 * 1024))  # one piece plus the ~2 MiB working tree fit a 64 MiB transfer
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }

binary_wheels=(onnx-graphsurgeon==0.6.1 ttach==0.0.3)
if ((cuda13)); then
    binary_wheels+=(onnxruntime-gpu==1.30.0)
else
    binary_wheels+=(
        onnxruntime-gpu==1.23.2
        nvidia-cuda-runtime-cu12==12.4.127
        nvidia-cublas-cu12==12.4.5.8
        nvidia-cufft-cu12==11.0.8.103
    )
    if ((lean == 0)); then
        binary_wheels+=(nvidia-curand-cu12==10.3.5.147 nvidia-cudnn-cu12==9.12.0.46)
    fi
fi

python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any \
    -d "$out_dir" "${binary_wheels[@]}"
# Pure Python, so the wheel built here installs on the GPU machine's Python 3.12 as it is.
python3 -m pip wheel --no-deps -w "$out_dir" grad-cam==1.5.7

cd "$out_dir"
# Rewrite a wheel as an uncompressed zip holding the same members, for xz to compress.
store_wheel() {
    python3 - "$1" "$2" <<'PY'
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as src, zipfile.ZipFile(sys.argv[2], "w") as dst:
    for info in src.infolist():
        data = src.read(info)
        info.compress_type = zipfile.ZIP_STORED
        dst.writestr(info, data)
PY
}

total_bytes=0
pieces=0
for wheel in *.whl; do
    artifact=$wheel
    if ((use_xz)) && (($(stat -c %s "$wheel") > piece_bytes)); then
        store_wheel "$wheel" "$wheel.stored"
        xz -9 -T0 -c "$wheel.stored" >"$wheel.xz"
        rm "$wheel.stored" "$wheel"
        artifact=$wheel.xz
    fi
    size=$(stat -c %s "$artifact")
    total_bytes=$((total_bytes + size))
    sha256sum "$artifact" >"$artifact.sha256"
    if ((size > piece_bytes)); then
        rm -f "$artifact".part-*
        split -b "$piece_bytes" -a 2 "$artifact" "$artifact.part-"
        rm "$artifact"
        count=$(find . -maxdepth 1 -name "$artifact.part-*" | wc -l)
        pieces=$((pieces + count))
        printf '%-87s %7s MiB in %d pieces\n' "$artifact" "$(mib "$size")" "$count"
    else
        printf '%-87s %7s MiB\n' "$artifact" "$(mib "$size")"
    fi
done
# How many device transfers carry it all: each takes 64 MiB with the ~2 MiB working tree, so up
# to 62 MiB of these files; packed first-fit, largest first (small wheels ride with pieces).
capacity=$((62 * 1024 * 1024))
transfers=$(find . -maxdepth 1 -type f -printf '%s\n' | sort -rn | awk -v cap="$capacity" '
    { for (i = 1; i <= n; i++) if (free[i] >= $1) { free[i] -= $1; next }
      free[++n] = cap - $1 }
    END { print n }')
printf 'total %s MiB in %d files: %d transfers of 64 MiB' "$(mib "$total_bytes")" \
    "$(find . -maxdepth 1 -type f | wc -l)" "$transfers"
printf ' (%d of the files are pieces of at most 60 MiB)\n' "$pieces"
