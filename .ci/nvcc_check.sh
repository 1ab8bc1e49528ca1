#!/usr/bin/env bash
# Compile-check every CUDA source under csrc/ with plain nvcc (no torch, no GPU needed) for sm_80 and sm_90.
# Fails on any compile error and on any register spill (ptxas "spill stores" / "spill loads" > 0); prints a
# summary line per kernel and architecture: registers, spill stores, spill loads.
# Prints "nvcc not found: skipping CUDA compile check" and exits 0 where no nvcc is installed.
# Usage: .ci/nvcc_check.sh   (from anywhere; NVCC=/path/to/nvcc to pick a compiler)
set -euo pipefail

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" ]]; then
  echo "nvcc not found: skipping CUDA compile check"
  exit 0
fi

cd "$(dirname "$0")/.."
mapfile -t SOURCES < <(find csrc -name '*.cu' | sort)
if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "no .cu sources under csrc/"
  exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$NVCC" --version | tail -n 1

# Kernel names as "name<template args>" where c++filt is available, mangled otherwise.
demangle() {
  if command -v c++filt >/dev/null; then
    c++filt | sed -E 's/void ([a-z_]+::)*(\(anonymous namespace\)::)?//; s/>\(.*\)$/>/'
  else
    cat
  fi
}

status=0
for src in "${SOURCES[@]}"; do
  for arch in 80 90; do
    log="$WORK/$(basename "$src").sm_$arch.log"
    if ! "$NVCC" -c -std=c++17 -O3 -Xptxas -v -gencode "arch=compute_$arch,code=sm_$arch" \
         -o "$WORK/out.o" "$src" >"$log" 2>&1; then
      echo "FAIL: $src (sm_$arch) does not compile:"
      cat "$log"
      status=1
      continue
    fi
    # ptxas -v prints, per kernel: "Compiling entry function '<mangled>' for 'sm_XX'", then a line with
    # "N bytes spill stores, M bytes spill loads" and one with "Used R registers".
    awk -v src="$src" -v arch="sm_$arch" '
      /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); kernel = substr($0, RSTART + 1, RLENGTH - 2) }
      /spill stores/ { for (i = 1; i <= NF; i++) { if ($(i+3) == "stores,") st = $i; if ($(i+3) == "loads") ld = $i } }
      /Used [0-9]+ registers/ {
        for (i = 1; i <= NF; i++) if ($i == "Used") regs = $(i+1)
        printf "%-6s %-8s regs %3d  spill stores %4d  spill loads %4d  %s\n", arch, (st + ld > 0 ? "SPILL" : "ok"), regs, st, ld, kernel
        st = 0; ld = 0
      }' "$log" | demangle | tee -a "$WORK/summary"
    if grep -Eq '[1-9][0-9]* bytes spill (stores|loads)' "$log"; then
      echo "FAIL: $src (sm_$arch) spills registers"
      status=1
    fi
  done
done

kernels=$(grep -c . "$WORK/summary" || true)
if [[ $status -ne 0 ]]; then
  echo "nvcc check FAILED"
else
  echo "nvcc check passed: ${#SOURCES[@]} source(s), $kernels kernel build(s), no spills"
fi
exit $status
