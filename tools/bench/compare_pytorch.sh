#!/usr/bin/env bash
# Side-by-side NCSNv2 forward speed: PyTorch CPU (tools/reference, THREADS threads, default 2) vs
# `jointdiff bench forward` (cpu backend, RAYON_NUM_THREADS=THREADS), same configs, same invocation. Writes
# the table into BENCHMARKS.md between the markers <!-- compare_pytorch:begin --> and
# <!-- compare_pytorch:end --> (with THREADS other than 2: compare_pytorch_tN). Not part of CI.
#
#   [THREADS=N] [ISA=avx2] [JOINTDIFF_CPU_KERNEL=avx2] bash tools/bench/compare_pytorch.sh [ITERS] [ROUNDS]
#
# ISA=avx2 holds both sides to 8-lane AVX2 + FMA code on a CPU that has more (an AVX2 machine's figures, taken
# on an AVX-512 one): PyTorch through ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2 and
# MKL_ENABLE_INSTRUCTIONS=AVX2, jointdiff through JOINTDIFF_CPU_KERNEL=avx2; the markers get the suffix _avx2.
#
# Each config runs ROUNDS times (default 3), PyTorch and jointdiff alternating, and the table keeps the best
# round of each: on a shared virtual machine the speed drifts by up to 40% over minutes, and alternating
# rounds with the best of each compares the two under the same conditions.
# Sets up a venv with torch in tools/reference/.venv on first use (a large download; tools/bench/torch_python.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
ITERS="${1:-20}"
ROUNDS="${2:-3}"
THREADS="${THREADS:-2}"
TAG="compare_pytorch"
[ "$THREADS" = 2 ] || TAG="compare_pytorch_t$THREADS"
ISA="${ISA:-}"
ISA_NOTE=""
case "$ISA" in
  "") ;;
  avx2)
    export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 JOINTDIFF_CPU_KERNEL=avx2
    TAG="${TAG}_avx2"
    ISA_NOTE=" Both held to AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 for PyTorch."
    ;;
  *) echo "ISA must be avx2 or unset, not '$ISA'" >&2; exit 2 ;;
esac
# shellcheck source=tools/bench/torch_python.sh
. "$ROOT/tools/bench/torch_python.sh"
cargo build --release -q -p jointdiff-cli
JD="$ROOT/target/release/jointdiff"
CONFIGS=("28 1 32 1" "28 1 64 1" "32 3 128 1" "64 3 128 1" "28 1 32 8" "28 1 32 64")
OUT="$(mktemp)"
{
  echo "Command: \`${ISA:+ISA=$ISA }THREADS=$THREADS bash tools/bench/compare_pytorch.sh $ITERS $ROUNDS\` on $(date -u +%Y-%m-%d), \`nproc\` = $(nproc),"
  echo "CPU: $(lscpu | sed -n 's/^Model name: *//p' | head -1), flags: $(grep -o -w 'avx512f\|avx2\|fma' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  echo "PyTorch $("$PYTHON" -c 'import torch; print(torch.__version__)') with torch.set_num_threads($THREADS); jointdiff cpu backend with RAYON_NUM_THREADS=$THREADS, JOINTDIFF_CPU_KERNEL=${JOINTDIFF_CPU_KERNEL:-unset (16 lanes where the CPU has AVX-512F, else 8)}.$ISA_NOTE"
  echo "Median of $ITERS forwards per round, best of $ROUNDS alternating rounds each, random weights; both in this invocation."
  echo
  echo "| config | batch | GFLOP | PyTorch ms | jointdiff ms | PyTorch images/s | jointdiff images/s | jointdiff GFLOP/s | ratio (images/s) |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for cfg in "${CONFIGS[@]}"; do
    read -r S C G B <<<"$cfg"
    PTS=(); JDS=()
    for _ in $(seq "$ROUNDS"); do
      PTS+=("$("$PYTHON" tools/reference/bench_torch.py --size "$S" --channels "$C" --ngf "$G" --batch "$B" --iters "$ITERS" --threads "$THREADS")")
      JDS+=("$(RAYON_NUM_THREADS="$THREADS" "$JD" bench forward --size "$S" --channels "$C" --ngf "$G" --batch "$B" --iters "$ITERS" --json)")
    done
    python3 - "$S" "$C" "$G" "$B" "${PTS[@]}" "${JDS[@]}" <<'PY'
import json, sys
s, c, g, b = sys.argv[1:5]
runs = [json.loads(a) for a in sys.argv[5:]]
half = len(runs) // 2
pt = min(runs[:half], key=lambda r: r['ms_per_forward'])
jd = min(runs[half:], key=lambda r: r['ms_per_forward'])
print(f"| {s}x{s}x{c} ngf {g} | {b} | {jd['gflop_per_forward']:.2f} | {pt['ms_per_forward']:.1f} | {jd['ms_per_forward']:.1f} | "
      f"{pt['images_per_s']:.1f} | {jd['images_per_s']:.1f} | {jd['gflops']:.1f} | {jd['images_per_s'] / pt['images_per_s']:.2f}x |")
PY
  done
} > "$OUT"
cat "$OUT"
python3 - "$OUT" "$TAG" "$THREADS" <<'PY'
import sys, re
table = open(sys.argv[1]).read()
tag, threads = sys.argv[2], sys.argv[3]
path = "BENCHMARKS.md"
doc = open(path).read()
begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
block = f"{begin}\n{table}{end}"
if begin in doc:
    doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda m: block, doc, flags=re.S)
else:
    doc += f"\n## NCSNv2 forward: jointdiff vs PyTorch, {threads} threads (tools/bench/compare_pytorch.sh)\n{block}\n"
open(path, "w").write(doc)
PY
