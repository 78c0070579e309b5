#!/usr/bin/env bash
# Fuzzes jointdiff's readers with libFuzzer (cargo-fuzz, nightly): the safetensors model reader, the npy
# reader, the C ABI's jd_model_load_buffer, the CLI's PNG, IDX and mnist-json readers and its --noise and
# --operator parsers. Each target runs SECONDS (default 60) from the committed seeds
# (fuzz/seeds/TARGET) and its growing corpus (fuzz/corpus/TARGET, not committed), with a 512 MB RSS limit;
# a crash, timeout, leak or out-of-memory stops it and leaves the input in fuzz/artifacts/TARGET/.
# FUZZ_RUNS=N stops a target after N executions when that comes first (issue 15's long runs:
# FUZZ_RUNS=10000000 bash tools/fuzz.sh 3600).
# ASan's quarantine (freed memory it holds back, 256 MB by default) counts against the RSS limit, and with the
# corpus held in memory it pushed the model targets past 512 MB on inputs that take 48 MB alone; it is set
# to 64 MB here unless ASAN_OPTIONS is given.
#
#   bash tools/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT/fuzz"
SECS="${1:-60}"
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(model_file npy capi_load_buffer png idx mnist_json cli_specs)
export ASAN_OPTIONS="${ASAN_OPTIONS:-quarantine_size_mb=64}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
for t in "${TARGETS[@]}"; do
  mkdir -p "corpus/$t"
  echo "== $t (${SECS} s)"
  cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$SECS" -runs="${FUZZ_RUNS:--1}" -rss_limit_mb=512 -max_len=262144 -timeout=10 -print_final_stats=1 2>&1 |
    grep -E "stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb|ERROR|SUMMARY|Done" || true
done
