#!/usr/bin/env bash
# Parallel efficiency of the CPU backend beside PyTorch's, thread count by thread count: the NCSNv2 forward of
# `jointdiff bench forward` (RAYON_NUM_THREADS=T) and tools/reference/bench_torch.py (torch.set_num_threads(T))
# for T in THREAD_COUNTS, alternating, both in this invocation. Prints a markdown table: per config and thread
# count, each side's ms (best of ROUNDS rounds, each the median of ITERS forwards), the ratio of images per
# second, and each side's parallel efficiency t1 / (T * tT) against its own one-thread time. Not part of CI.
#
#   [THREAD_COUNTS="1 2 4 8 16"] [ITERS=10] [ROUNDS=2] [JD=path/to/jointdiff] [PYTHON=python-with-torch]
#       bash tools/bench/threads.sh
#
# Thread counts above `nproc` are left out. Where cargo is missing (the GPU machine's host: a release binary
# built elsewhere travels with the tree), JD names the binary; PYTHON names a Python that has torch (default:
# tools/reference/.venv, which this script creates as compare_pytorch.sh does where PYTHON is unset).
#
# On the GPU machine's host (16 cores, its python3 has torch, no cargo, nothing to download): build here,
# copy into an ignored folder that the run carries, and run there in one call, e.g.
#   cargo build --release -p jointdiff-cli && cargo test --release -p jointdiff-cpu --no-run  (note the path)
#   mkdir -p .device && strip -o .device/jointdiff target/release/jointdiff   (27 MB stripped; 92 unstripped)
#   strip -o .device/cpu_tests <that test binary>
#   echo /.device/ >> .git/info/exclude
#   device run, carry [".device"]: lscpu > $OUT/lscpu.txt; .device/cpu_tests > $OUT/cpu_tests.txt 2>&1;
#     JD=.device/jointdiff PYTHON=python3 bash tools/bench/threads.sh | tee $OUT/threads.md
# (the unit tests check the 16-lane kernels against the reference where that CPU has AVX-512F).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
ITERS="${ITERS:-10}"
ROUNDS="${ROUNDS:-2}"
NPROC="$(nproc)"
COUNTS=()
for t in ${THREAD_COUNTS:-1 2 4 8 16}; do
  [ "$t" -le "$NPROC" ] && COUNTS+=("$t")
done
# shellcheck source=tools/bench/torch_python.sh
. "$ROOT/tools/bench/torch_python.sh"
if [ -z "${JD:-}" ]; then
  cargo build --release -q -p jointdiff-cli
  JD="$ROOT/target/release/jointdiff"
fi
CONFIGS=("28 1 32 1" "28 1 64 1" "32 3 128 1" "64 3 128 1" "28 1 32 64")
echo "Command: \`THREAD_COUNTS=\"${COUNTS[*]}\" ITERS=$ITERS ROUNDS=$ROUNDS bash tools/bench/threads.sh\` on $(date -u +%Y-%m-%d), \`nproc\` = $NPROC,"
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p' | head -1), flags: $(grep -o -w 'avx512f\|avx2\|fma' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "PyTorch $("$PYTHON" -c 'import torch; print(torch.__version__)'); jointdiff cpu backend, JOINTDIFF_CPU_KERNEL=${JOINTDIFF_CPU_KERNEL:-unset (16 lanes where the CPU has AVX-512F, else 8)}."
echo "Each side: best of $ROUNDS rounds, each the median of $ITERS forwards, random weights, the two alternating."
echo "Efficiency: t1 / (T * tT), each side against its own one-thread time."
echo
echo "| config | batch | threads | PyTorch ms | jointdiff ms | ratio (images/s) | PyTorch efficiency | jointdiff efficiency |"
echo "|---|---|---|---|---|---|---|---|"
for cfg in "${CONFIGS[@]}"; do
  read -r S C G B <<<"$cfg"
  RUNS=()
  for t in "${COUNTS[@]}"; do
    PTS=(); JDS=()
    for _ in $(seq "$ROUNDS"); do
      PTS+=("$("$PYTHON" tools/reference/bench_torch.py --size "$S" --channels "$C" --ngf "$G" --batch "$B" --iters "$ITERS" --threads "$t")")
      JDS+=("$(RAYON_NUM_THREADS="$t" "$JD" bench forward --size "$S" --channels "$C" --ngf "$G" --batch "$B" --iters "$ITERS" --json)")
    done
    RUNS+=("$t" "$(printf '%s\n' "${PTS[@]}" | python3 -c 'import json,sys; print(min(json.loads(l)["ms_per_forward"] for l in sys.stdin))')" \
      "$(printf '%s\n' "${JDS[@]}" | python3 -c 'import json,sys; print(min(json.loads(l)["ms_per_forward"] for l in sys.stdin))')")
  done
  python3 - "$S" "$C" "$G" "$B" "${RUNS[@]}" <<'PY'
import sys
s, c, g, b = sys.argv[1:5]
v = sys.argv[5:]
rows = [(int(v[i]), float(v[i + 1]), float(v[i + 2])) for i in range(0, len(v), 3)]
one = {t: (pt, jd) for t, pt, jd in rows}.get(1)
for t, pt, jd in rows:
    eff = [f"{t1 / (t * tt):.2f}" for t1, tt in zip(one, (pt, jd))] if one else ["n/a", "n/a"]
    print(f"| {s}x{s}x{c} ngf {g} | {b} | {t} | {pt:.1f} | {jd:.1f} | {pt / jd:.2f}x | {eff[0]} | {eff[1]} |")
PY
done
