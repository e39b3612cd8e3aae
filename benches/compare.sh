#!/usr/bin/env bash
# vmdkit against qemu-img on the same input, in one run, alternating, medians of N runs.
# Run by hand (not by CI): bash benches/compare.sh [SIZE_MIB=1024] [RUNS=3] [WORKDIR]
# Each timed command includes a final `sync`, so both tools pay for durable output.
set -euo pipefail
SIZE=${1:-1024}
RUNS=${2:-3}
W=${3:-$(mktemp -d /var/tmp/vmdkit-bench.XXXXXX)}
cd "$(dirname "$0")/.."
cargo build --release -q
V=$PWD/target/release/vmdkit
mkdir -p "$W"; cd "$W"
echo "workdir $W; disk ${SIZE} MiB; $RUNS runs each; $(nproc) cores; $(qemu-img --version | head -1)"

if [ ! -f src-flat.vmdk ]; then
  python3 "$OLDPWD/benches/mkdisk.py" src-flat.vmdk "$SIZE"
  # Standard layout with the section comments: qemu 10.0.2 counts an extent twice when a
  # blank line alone separates it from the header (see tests/it/read_qemu.rs).
  printf '# Disk DescriptorFile\nversion=1\nCID=1a2b3c4d\nparentCID=ffffffff\ncreateType="vmfs"\n\n# Extent description\nRW %d VMFS "src-flat.vmdk"\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = "lsilogic"\n' \
    $(( SIZE * 2048 )) > src.vmdk
  qemu-img convert -O vmdk -o subformat=monolithicSparse src.vmdk sparse-src.vmdk
fi
cat src-flat.vmdk sparse-src.vmdk > /dev/null   # warm the page cache for both tools

now() { date +%s.%N; }
# time_cmd OUTFILES... -- CMD...: remove outputs, run, sync, print seconds
time_cmd() {
  local outs=()
  while [ "$1" != "--" ]; do outs+=("$1"); shift; done; shift
  rm -f "${outs[@]}"; sync
  local t0; t0=$(now)
  "$@" > /dev/null
  sync
  echo "$(now) - $t0" | bc
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
size_of() { du -cb "$@" | tail -1 | cut -f1; }

printf '\n%-34s %9s %9s %7s %12s %12s %7s\n' case vmdkit_s qemu_s speedup vmdkit_bytes qemu_bytes size%
row() { # name vmdkit-outs qemu-outs vmdkit-cmd qemu-cmd
  local name=$1 vo=$2 qo=$3 vc=$4 qc=$5 tv=() tq=()
  for _ in $(seq "$RUNS"); do
    tv+=("$(time_cmd $vo -- bash -c "$vc")")
    tq+=("$(time_cmd $qo -- bash -c "$qc")")
  done
  local mv mq sv sq
  mv=$(printf '%s\n' "${tv[@]}" | median); mq=$(printf '%s\n' "${tq[@]}" | median)
  sv=$(size_of $vo); sq=$(size_of $qo)
  printf '%-34s %9.2f %9.2f %6.2fx %12d %12d %+6.1f%%\n' "$name" "$mv" "$mq" "$(echo "$mq / $mv" | bc -l)" "$sv" "$sq" "$(echo "($sv - $sq) * 100 / $sq" | bc -l)"
}

row "export streamOptimized" "v.vmdk" "q.vmdk" \
  "$V export src.vmdk v.vmdk --format stream -q" \
  "qemu-img convert -O vmdk -o subformat=streamOptimized src.vmdk q.vmdk"
row "export monolithicSparse" "v.vmdk" "q.vmdk" \
  "$V export src.vmdk v.vmdk --format sparse -q" \
  "qemu-img convert -O vmdk -o subformat=monolithicSparse src.vmdk q.vmdk"
row "export twoGbMaxExtentSparse" "v.vmdk v-s*.vmdk" "q.vmdk q-s*.vmdk" \
  "$V export src.vmdk v.vmdk --format split -q" \
  "qemu-img convert -O vmdk -o subformat=twoGbMaxExtentSparse src.vmdk q.vmdk"
row "cat sparse disk -> raw file" "v.raw" "q.raw" \
  "$V cat sparse-src.vmdk -o v.raw -q" \
  "qemu-img convert -O raw sparse-src.vmdk q.raw"
if [ "${WITH_COMMIT:-1}" = 1 ] && [ -x "$OLDPWD/benches/commit-bench.sh" ]; then
  bash "$OLDPWD/benches/commit-bench.sh" "$V" "$RUNS"
fi
echo
echo "(bytes: du of the outputs' apparent sizes; size%: vmdkit relative to qemu-img)"
