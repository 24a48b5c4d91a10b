#!/usr/bin/env bash
# GPU readiness check (issue 7): on a machine with an NVIDIA GPU and no network, install
# segattr-onnx's GPU stack from the wheels benchmarks/fetch_gpu_wheels.sh fetched, prove the CUDA
# provider is really used, run the tests marked `gpu` (CUDA results equal the CPU's with TF32
# off) and the benchmark table on CUDA. Ends within 10 minutes; exits non-zero if a step fails.
#
#   benchmarks/gpu_check.sh WHEEL_DIR [WHEEL_DIR...]     the check, from the repository root
#   benchmarks/gpu_check.sh --collect WHEEL_DIR [STASH]  only gather wheels that arrive over
#                                                         several transfers, then run the check
#                                                         on STASH (default /tmp/segattr_wheels)
#
# Wheels over 60 MiB come split as NAME.whl.part-aa, -ab, ... with NAME.whl.sha256 (or, from
# fetch_gpu_wheels.sh --xz, as NAME.whl.xz.part-*); they are joined, verified and unpacked here.
# Logs and the benchmark table go to ${OUT:-./gpu_check_out}.
# The repository is used in place (on PYTHONPATH), so nothing needs the network.
#
# Where things go, and why:
# - onnxruntime-gpu and the pure-Python wheels -> $SITE (/tmp/site), first on PYTHONPATH, ahead
#   of the image's CPU onnxruntime;
# - the CUDA 12 library wheels (nvidia_*) -> $CUDA_LIBS (/tmp/cuda12), which is NOT on
#   PYTHONPATH: their `nvidia.*` packages would shadow the CUDA 13 ones torch imports. Their lib
#   folders go on LD_LIBRARY_PATH instead, which is how ONNX Runtime finds libcudart.so.12 and
#   the rest (its CUDA provider has no RUNPATH; onnxruntime.preload_dlls() would only look
#   beside onnxruntime itself). Sonames the CUDA 12 wheels do not provide (libcudnn.so.9 and
#   libcurand.so.10 under fetch_gpu_wheels.sh --lean) are taken from the image's own CUDA 13
#   wheels, after them on the path.
set -euo pipefail

STASH_DEFAULT=/tmp/segattr_wheels
SITE=${SITE:-/tmp/site}
CUDA_LIBS=${CUDA_LIBS:-/tmp/cuda12}
PYTHON=${PYTHON:-python3}
TOTAL_SECONDS=${GPU_CHECK_SECONDS:-570}  # the 10 minutes, less a margin for the caller
export LC_ALL=C                          # part-aa, part-ab, ... in byte order

say() { printf '[gpu_check %3ds] %s\n' "$SECONDS" "$*"; }
die() {
    say "FAILED: $*"
    exit 1
}

# ----------------------------------------------------------------------------- wheel handling
# Copy whole wheels, pieces and checksums from the given folders into $1.
gather() {
    local into=$1
    shift
    mkdir -p "$into"
    local dir file found=0
    for dir in "$@"; do
        [[ -d $dir ]] || die "wheel folder $dir does not exist"
        for file in "$dir"/*.whl "$dir"/*.whl.xz "$dir"/*.whl*.part-* "$dir"/*.whl*.sha256; do
            [[ -e $file ]] || continue
            cp -f "$file" "$into"/
            found=1
        done
    done
    ((found)) || die "no wheels, wheel pieces or checksums in: $*"
}

# Join split wheels (NAME.whl or NAME.whl.xz) and check every checksum in folder $1; prints one
# line per wheel. Returns non-zero if a wheel is incomplete or corrupt.
assemble() {
    local dir=$1 status=0 part artifact sums name count
    for part in "$dir"/*.whl.part-aa "$dir"/*.whl.xz.part-aa; do
        [[ -e $part ]] || continue
        artifact=${part%.part-aa}
        cat "$artifact".part-* >"$artifact.joining"
        mv "$artifact.joining" "$artifact"
    done
    for sums in "$dir"/*.whl.sha256 "$dir"/*.whl.xz.sha256; do
        [[ -e $sums ]] || continue
        artifact=${sums%.sha256}
        name=$(basename "$artifact")
        count=$(find "$dir" -maxdepth 1 -name "$name.part-*" | wc -l)
        if [[ ! -e $artifact ]]; then
            say "missing: $name (no wheel and no pieces yet)"
            status=1
        elif (cd "$dir" && sha256sum --quiet -c "$name.sha256" >/dev/null 2>&1); then
            say "ok:      $name"
        else
            say "corrupt or incomplete: $name ($count pieces so far)"
            status=1
        fi
    done
    for artifact in "$dir"/*.whl "$dir"/*.whl.xz; do
        [[ -e $artifact && ! -e $artifact.sha256 ]] || continue
        name=$(basename "$artifact")
        count=$(find "$dir" -maxdepth 1 -name "$name.part-*" | wc -l)
        if ((count)); then
            say "unchecked: $name joined from $count pieces, no .sha256 to tell if all came"
        else
            say "unchecked (no .sha256): $name"
        fi
    done
    return "$status"
}

# Turn every NAME.whl.xz in folder $1 back into NAME.whl (xz, or Python's lzma without it).
unpack_xz() {
    local packed
    for packed in "$1"/*.whl.xz; do
        [[ -e $packed ]] || continue
        say "unpacking $(basename "$packed")"
        if command -v xz >/dev/null; then
            xz -d -T0 -c "$packed" >"${packed%.xz}"
        else
            "$PYTHON" -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 24)' "$packed" "${packed%.xz}"
        fi
        rm "$packed"
    done
}

if [[ ${1:-} == --collect ]]; then
    [[ $# -ge 2 ]] || die "usage: $0 --collect WHEEL_DIR [STASH]"
    stash=${3:-$STASH_DEFAULT}
    gather "$stash" "$2"
    if assemble "$stash"; then
        say "every wheel in $stash is complete: run $0 $stash"
    else
        say "some wheels in $stash are not complete yet; send the remaining pieces"
    fi
    exit 0
fi

[[ $# -ge 1 ]] || die "usage: $0 WHEEL_DIR [WHEEL_DIR...]  (or --collect WHEEL_DIR [STASH])"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
OUT_DIR=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/*.log "$OUT_DIR"/peers.* "$OUT_DIR"/summary.txt
SUMMARY=$OUT_DIR/summary.txt
: >"$SUMMARY"

# Seconds a step may take: its own cap, or what is left of the total if that is less.
allowance() {
    local cap=$1 left=$((TOTAL_SECONDS - SECONDS))
    ((left < cap)) && cap=$left
    ((cap < 1)) && cap=1
    echo "$cap"
}

# run_step NAME CAP LOG COMMAND...: run a program under `timeout`, append its output to LOG and
# show it; records the outcome in the summary and returns the program's exit status.
failures=()
run_step() {
    local name=$1 cap limit status
    cap=$2
    local log=$3
    shift 3
    limit=$(allowance "$cap")
    say "$name (at most ${limit}s) -> $log"
    set +e
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    set -e
    if ((status == 124 || status == 137)); then
        echo "$name: TIMED OUT after ${limit}s" | tee -a "$SUMMARY"
    elif ((status != 0)); then
        echo "$name: FAILED (exit $status)" | tee -a "$SUMMARY"
    else
        echo "$name: ok" | tee -a "$SUMMARY"
    fi
    ((status == 0)) || failures+=("$name")
    return "$status"
}

# ------------------------------------------------------------------------------- 1. install
STAGE=$(mktemp -d /tmp/segattr_stage.XXXXXX)
say "joining and checking the wheels of $* in $STAGE"
gather "$STAGE" "$@"
assemble "$STAGE" || die "wheels are missing or corrupt (see above); send all pieces first"
rm -f "$STAGE"/*.part-* "$STAGE"/*.sha256
unpack_xz "$STAGE"
ls "$STAGE"/onnxruntime_gpu-*.whl >/dev/null 2>&1 || die "no onnxruntime_gpu wheel among $*"

python_wheels=()
library_wheels=()
for wheel in "$STAGE"/*.whl; do
    case $(basename "$wheel") in
        nvidia_*) library_wheels+=("$wheel") ;;
        *) python_wheels+=("$wheel") ;;
    esac
done
pip_args=(-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade)
run_step install-python 120 "$OUT_DIR/install.log" \
    "$PYTHON" "${pip_args[@]}" --target "$SITE" "${python_wheels[@]}" ||
    die "installing the Python wheels failed"
if ((${#library_wheels[@]})); then
    run_step install-cuda12 120 "$OUT_DIR/install.log" \
        "$PYTHON" "${pip_args[@]}" --target "$CUDA_LIBS" "${library_wheels[@]}" ||
        die "installing the CUDA 12 library wheels failed"
fi
rm -rf "$STAGE"

export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
library_path=""
for dir in "$CUDA_LIBS"/nvidia/*/lib; do
    [[ -d $dir ]] && library_path+="$dir:"
done
# Then the image's own CUDA 13 library folders, for what the CUDA 12 wheels do not provide: only
# libcudnn.so.9 and libcurand.so.10 keep their sonames across 12 and 13, and a CUDA 12 wheel of
# either comes first. Without those two wheels (--lean), cuDNN's CUDA 13 build also needs its
# libcublasLt.so.13 and libnvrtc.so.13 from here.
image_site=$(env -u PYTHONPATH "$PYTHON" -c \
    'import sysconfig; print(sysconfig.get_paths()["purelib"])')
while IFS= read -r dir; do
    library_path+="$dir:"
done < <(find "$image_site/nvidia" -mindepth 2 -maxdepth 3 -type d -name lib 2>/dev/null | sort)
export LD_LIBRARY_PATH="${library_path}${LD_LIBRARY_PATH:-}"
export SEGATTR_REQUIRE_GPU=1
unset SEGATTR_ALLOW_TF32 NVIDIA_TF32_OVERRIDE  # the check is of segattr-onnx's own settings
say "PYTHONPATH=$PYTHONPATH"
say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

# ------------------------------------------------------------- 2. versions, GPU and provider
run_step gpu 30 "$OUT_DIR/provider.log" nvidia-smi -L || die "nvidia-smi sees no GPU"
# Diagnostics only: an older driver may not know a field, which must not fail the check.
timeout 30 nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,memory.free \
    --format=csv 2>&1 | tee -a "$OUT_DIR/provider.log" || true
run_step provider 90 "$OUT_DIR/provider.log" "$PYTHON" - "$SITE" <<'PY' ||
import platform
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi import build_and_package_info

import segattr_onnx
from segattr_onnx.runtime.chunks import default_memory_budget
from segattr_onnx.runtime.providers import CUDA, cuda_works, requested_providers

site = sys.argv[1]
print(f"python {platform.python_version()}, numpy {np.__version__}, onnx {onnx.__version__}")
build = getattr(build_and_package_info, "cuda_version", "?")
print(f"onnxruntime {ort.__version__} (CUDA build {build}) from {ort.__file__}")
print(f"segattr_onnx from {segattr_onnx.__file__}")
if not ort.__file__.startswith(site):
    sys.exit(f"onnxruntime comes from {ort.__file__}, not the onnxruntime-gpu wheel in {site}")
available = ort.get_available_providers()
print("available providers:", ", ".join(available))
if CUDA not in available:
    sys.exit("this onnxruntime has no CUDA provider")
if not cuda_works():
    sys.exit(f"the CUDA provider is built in but a session falls back to the CPU: check that the "
             f"CUDA {build} and cuDNN 9 libraries are on LD_LIBRARY_PATH")

rng = np.random.default_rng(0)
weight = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3), np.float32), "w")
graph = helper.make_graph(
    [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "probe",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 16, 16])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 16, 16])], [weight])
opset = [helper.make_opsetid("", 17)]
model = helper.make_model(graph, opset_imports=opset, ir_version=8).SerializeToString()
x = rng.standard_normal((2, 4, 16, 16), np.float32)
gpu = ort.InferenceSession(model, providers=requested_providers("cuda"))
cpu = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
print("session providers:", gpu.get_providers())
options = gpu.get_provider_options().get(CUDA, {})
shown = ("device_id", "use_tf32", "cudnn_conv_algo_search", "arena_extend_strategy")
print("CUDA options:", {k: options.get(k) for k in shown})
if gpu.get_providers()[0] != CUDA:
    sys.exit("the session did not get the CUDA provider")
difference = float(np.abs(gpu.run(None, {"x": x})[0] - cpu.run(None, {"x": x})[0]).max())
print(f"Conv on CUDA vs CPU: max abs difference {difference:.2e}")
libraries = ("libcudnn", "libcublas", "libcudart", "libcufft", "libcurand")
with open("/proc/self/maps") as maps:
    loaded = sorted({line.split()[-1] for line in maps if any(n in line for n in libraries)})
print("CUDA libraries loaded:\n  " + "\n  ".join(loaded))
print(f"default memory budget on cuda: {default_memory_budget('cuda') / 2**30:.1f} GiB")
if difference > 1e-4:
    sys.exit("CUDA and CPU disagree on a small Conv")
PY
    die "the CUDA provider is not usable"

# --------------------------------------------------------------------------- 3. the gpu tests
run_step tests 240 "$OUT_DIR/pytest.log" \
    "$PYTHON" -m pytest -q -m gpu tests/gpu -p no:cacheprovider -o addopts=-ra || true

# ----------------------------------------------------------------- 4. benchmark table on CUDA
bench_args=(--provider cuda --quick)
bench_help=$("$PYTHON" benchmarks/peers.py --help 2>&1 || true)
if grep -qE -- '(^|[[:space:]])--out([[:space:]=]|$)' <<<"$bench_help"; then
    bench_args+=(--out "$OUT_DIR/peers.md")
else
    grep -q -- "--json" <<<"$bench_help" && bench_args+=(--json "$OUT_DIR/peers.json")
    grep -q -- "--markdown" <<<"$bench_help" && bench_args+=(--markdown "$OUT_DIR/peers.md")
fi
run_step benchmark 300 "$OUT_DIR/peers.log" \
    env PYTHONUNBUFFERED=1 "$PYTHON" benchmarks/peers.py "${bench_args[@]}" || true

# -------------------------------------------------------------------------------- the verdict
say "summary ($OUT_DIR):"
cat "$SUMMARY"
if ((${#failures[@]})); then
    say "FAILED: ${failures[*]}"
    exit 1
fi
say "all steps passed in ${SECONDS}s"
