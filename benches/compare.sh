#!/usr/bin/env bash
# vmdkit against qemu-img and open-vmdk on the same input, in one run, alternating, medians
# of N runs, with each tool's peak RSS (one extra run under /usr/bin/time, when present).
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
if [ ! -f text-flat.vmdk ]; then
  python3 "$OLDPWD/benches/mkdisk.py" text-flat.vmdk "$SIZE" 2 text
  printf '# Disk DescriptorFile\nversion=1\nCID=2b3c4d5e\nparentCID=ffffffff\ncreateType="vmfs"\n\n# Extent description\nRW %d VMFS "text-flat.vmdk"\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = "lsilogic"\n' \
    $(( SIZE * 2048 )) > text.vmdk
fi
if [ ! -f other-flat.vmdk ]; then
  python3 "$OLDPWD/benches/mkdisk.py" other-flat.vmdk "$SIZE" 3 other
  printf '# Disk DescriptorFile\nversion=1\nCID=3c4d5e6f\nparentCID=ffffffff\ncreateType="vmfs"\n\n# Extent description\nRW %d VMFS "other-flat.vmdk"\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = "lsilogic"\n' \
    $(( SIZE * 2048 )) > other.vmdk
fi
cat src-flat.vmdk sparse-src.vmdk text-flat.vmdk other-flat.vmdk > /dev/null   # warm the page cache for both tools

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

OV=${OPEN_VMDK:-$OLDPWD/../shared/bench/open-vmdk/vmdk-convert}
printf '\n%-34s %-9s %9s %9s %7s %12s %12s %7s %8s %8s\n' case peer vmdkit_s peer_s speedup vmdkit_bytes peer_bytes size% v_rssMiB p_rssMiB
rss() { # outputs -- cmd: peak RSS in MiB of one run, or - without /usr/bin/time
  local outs=()
  while [ "$1" != "--" ]; do outs+=("$1"); shift; done; shift
  rm -f "${outs[@]}"
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -f %M -o rss.txt bash -c "exec $*" > /dev/null 2>&1 || true
    echo $(( $(tail -1 rss.txt) / 1024 ))
  else
    echo -
  fi
}
row() { # name peer vmdkit-outs peer-outs vmdkit-cmd peer-cmd
  local name=$1 peer=$2 vo=$3 qo=$4 vc=$5 qc=$6 tv=() tq=()
  for _ in $(seq "$RUNS"); do
    tv+=("$(time_cmd $vo -- bash -c "$vc")")
    tq+=("$(time_cmd $qo -- bash -c "$qc")")
  done
  local mv mq sv sq rv rq
  mv=$(printf '%s\n' "${tv[@]}" | median); mq=$(printf '%s\n' "${tq[@]}" | median)
  sv=$(size_of $vo); sq=$(size_of $qo)
  rv=$(rss $vo -- "$vc"); rq=$(rss $qo -- "$qc")
  printf '%-34s %-9s %9.2f %9.2f %6.2fx %12d %12d %+6.1f%% %8s %8s\n' "$name" "$peer" "$mv" "$mq" "$(echo "$mq / $mv" | bc -l)" "$sv" "$sq" "$(echo "($sv - $sq) * 100 / $sq" | bc -l)" "$rv" "$rq"
}

row "export streamOptimized (level 6)" qemu-img "v.vmdk" "q.vmdk" \
  "$V export src.vmdk v.vmdk --format stream -q" \
  "qemu-img convert -O vmdk -o subformat=streamOptimized src.vmdk q.vmdk"
row "export stream, mix with other text" qemu-img "v.vmdk" "q.vmdk" \
  "$V export other.vmdk v.vmdk --format stream -q" \
  "qemu-img convert -O vmdk -o subformat=streamOptimized other.vmdk q.vmdk"
row "export stream, text-heavy disk" qemu-img "v.vmdk" "q.vmdk" \
  "$V export text.vmdk v.vmdk --format stream -q" \
  "qemu-img convert -O vmdk -o subformat=streamOptimized text.vmdk q.vmdk"
# A cold source, as a backup reads it: the page cache dropped before each command (the
# drop is inside the timing of both tools; only where this user may drop it).
if [ -w /proc/sys/vm/drop_caches ]; then
  printf '#!/bin/sh\necho 3 > /proc/sys/vm/drop_caches\nexec "$@"\n' > cold.sh; chmod +x cold.sh
  row "export stream, cold cache" qemu-img "v.vmdk" "q.vmdk" \
    "./cold.sh $V export src.vmdk v.vmdk --format stream -q" \
    "./cold.sh qemu-img convert -O vmdk -o subformat=streamOptimized src.vmdk q.vmdk"
  cat src-flat.vmdk sparse-src.vmdk text-flat.vmdk other-flat.vmdk > /dev/null
fi
if [ -x "$OV" ]; then
  [ -f stream-src.vmdk ] || "$V" export src.vmdk stream-src.vmdk --format stream -q
  row "export streamOptimized (level 6)" open-vmdk "v.vmdk" "o.vmdk" \
    "$V export src.vmdk v.vmdk --format stream -q" \
    "$OV -c 6 -n $(nproc) src-flat.vmdk o.vmdk"
  row "stream -> raw file (restore)" open-vmdk "v.raw" "o.raw" \
    "$V cat stream-src.vmdk -o v.raw -q" \
    "$OV stream-src.vmdk o.raw"
fi
[ -f stream-src.vmdk ] || "$V" export src.vmdk stream-src.vmdk --format stream -q
row "stream -> raw file (restore)" qemu-img "v.raw" "q.raw" \
  "$V cat stream-src.vmdk -o v.raw -q" \
  "qemu-img convert -O raw stream-src.vmdk q.raw"
row "stream on a pipe -> monolithicSparse" qemu-img "v.vmdk" "q.vmdk" \
  "cat stream-src.vmdk | $V import - v.vmdk --type monolithicSparse -q" \
  "qemu-img convert -O vmdk -o subformat=monolithicSparse stream-src.vmdk q.vmdk"
row "stream on a pipe -> monolithicSparse" vmdk-file "v.vmdk" "q.vmdk" \
  "cat stream-src.vmdk | $V import - v.vmdk --type monolithicSparse -q" \
  "$V import stream-src.vmdk q.vmdk --type monolithicSparse -q"
row "pipe floor: cat | cat" - "v.bin" "q.bin" \
  "cat stream-src.vmdk | cat > v.bin" \
  "cat stream-src.vmdk > q.bin"
row "export monolithicSparse" qemu-img "v.vmdk" "q.vmdk" \
  "$V export src.vmdk v.vmdk --format sparse -q" \
  "qemu-img convert -O vmdk -o subformat=monolithicSparse src.vmdk q.vmdk"
row "export monolithicSparse" cp-floor "v.vmdk" "c.raw" \
  "$V export src.vmdk v.vmdk --format sparse -q" \
  "cp --sparse=always src-flat.vmdk c.raw"
row "export streamOptimized --threads 1" qemu-img "v.vmdk" "q.vmdk" \
  "$V export src.vmdk v.vmdk --format stream -q --threads 1" \
  "qemu-img convert -O vmdk -o subformat=streamOptimized src.vmdk q.vmdk"
row "export twoGbMaxExtentSparse" qemu-img "v.vmdk v-s*.vmdk" "q.vmdk q-s*.vmdk" \
  "$V export src.vmdk v.vmdk --format split -q" \
  "qemu-img convert -O vmdk -o subformat=twoGbMaxExtentSparse src.vmdk q.vmdk"
row "cat sparse disk -> raw file" qemu-img "v.raw" "q.raw" \
  "$V cat sparse-src.vmdk -o v.raw -q" \
  "qemu-img convert -O raw sparse-src.vmdk q.raw"
# Incremental backup: a snapshot child of the sparse disk holding 5% of it in new data
# (1 MiB of the same incompressible-and-text mix every 20 MiB, copied from the source).
# vmdkit writes only the child's grains (export --delta, a stream); qemu-img's nearest
# is convert -B (an overlay of what the child holds, as monolithicSparse: qemu-img has
# no compressed overlay).
if [ ! -f child.vmdk ]; then
  qemu-img create -q -f vmdk -b sparse-src.vmdk -F vmdk child.vmdk
  for i in $(seq 0 $(( SIZE / 20 - 1 ))); do
    dd if=src-flat.vmdk bs=1M skip=$(( (i * 37) % SIZE )) count=1 status=none > piece.bin
    "$V" write child.vmdk --offset $(( i * 20 + 3 ))M piece.bin -q
  done
  rm -f piece.bin
fi
row "increment of a 5% child" qemu-img "v.vmdk" "q.vmdk" \
  "$V export child.vmdk v.vmdk --delta -q" \
  "qemu-img convert -O vmdk -o subformat=monolithicSparse -B sparse-src.vmdk -F vmdk child.vmdk q.vmdk"
# Guest-aware shrink: a reused disk (the mixed disk's bytes as old data) holding one
# ext4 file system with 40% of the disk written as files (slices of the other mix) and
# half of them deleted. Guest-aware against plain, both by vmdkit, same output type.
PATH=$PATH:/usr/sbin:/sbin
if command -v sgdisk mkfs.ext4 debugfs > /dev/null 2>&1 && [ "$(command -v sgdisk mkfs.ext4 debugfs | wc -l)" = 3 ]; then
  if [ ! -f guest.vmdk ]; then
    cp src-flat.vmdk guest.raw
    sgdisk -o -n1:2048:0 -t1:8300 guest.raw > /dev/null
    rm -rf gfiles; mkdir gfiles
    n=$(( SIZE * 4 / 10 / 8 ))
    for i in $(seq 1 "$n"); do
      dd if=other-flat.vmdk of=gfiles/f$i bs=1M skip=$(( (i * 8) % (SIZE - 8) )) count=8 status=none
    done
    dd if=guest.raw of=gpart.img bs=1M skip=1 count=$(( SIZE - 2 )) status=none
    mkfs.ext4 -q -F -E nodiscard -d gfiles gpart.img
    for i in $(seq 1 2 "$n"); do echo "rm /f$i"; done > rm.cmd
    debugfs -w -f rm.cmd gpart.img > /dev/null 2>&1
    dd if=gpart.img of=guest.raw bs=1M seek=1 conv=notrunc status=none
    qemu-img convert -O vmdk guest.raw guest.vmdk
    rm -rf gfiles gpart.img guest.raw rm.cmd
  fi
  row "export stream --guest-aware" plain "v.vmdk" "q.vmdk" \
    "$V export guest.vmdk v.vmdk --format stream -q --guest-aware" \
    "$V export guest.vmdk q.vmdk --format stream -q"
  row "export monolithicSparse --guest-aware" plain "v.vmdk" "q.vmdk" \
    "$V export guest.vmdk v.vmdk --format sparse -q --guest-aware" \
    "$V export guest.vmdk q.vmdk --format sparse -q"
fi
if [ "${WITH_COMMIT:-1}" = 1 ] && [ -x "$OLDPWD/benches/commit-bench.sh" ]; then
  bash "$OLDPWD/benches/commit-bench.sh" "$V" "$RUNS"
fi
# serve: nbdcopy (4 connections) from `vmdkit serve` against nbdcopy from `qemu-nbd -r`
# serving the same file, into a raw file (holes skipped by both through base:allocation).
if command -v nbdcopy >/dev/null 2>&1; then
  serve_start() { # tool file -> prints the URI once it listens
    rm -f "$W/$1.sock"
    if [ "$1" = vmdkit ]; then
      "$V" serve "$2" --socket "$W/vmdkit.sock" --json > serve.json 2> /dev/null &
    else
      qemu-nbd -t -r -f vmdk -k "$W/qemu.sock" "$2" 2> /dev/null &
    fi
    echo $! > "$1.pid"
    for _ in $(seq 100); do
      nbdinfo --can connect "nbd+unix:///?socket=$W/$1.sock" 2> /dev/null && break
      sleep 0.05
    done
  }
  serve_stop() { kill "$(cat "$1.pid")" 2> /dev/null; wait "$(cat "$1.pid")" 2> /dev/null || true; }
  for f in stream-src.vmdk sparse-src.vmdk; do
    serve_start vmdkit "$f"; serve_start qemu "$f"
    row "nbdcopy from serve ($f)" qemu-nbd "v.raw" "q.raw" \
      "nbdcopy nbd+unix:///?socket=$W/vmdkit.sock v.raw" \
      "nbdcopy nbd+unix:///?socket=$W/qemu.sock q.raw"
    printf '%-34s server peak RSS: vmdkit %s MiB, qemu-nbd %s MiB\n' "" \
      $(( $(awk '/VmHWM/ {print $2}' /proc/"$(cat vmdkit.pid)"/status) / 1024 )) \
      $(( $(awk '/VmHWM/ {print $2}' /proc/"$(cat qemu.pid)"/status) / 1024 ))
    serve_stop vmdkit; serve_stop qemu
  done
fi

# Cores busy (CPU time / wall time) of the stream export, median of RUNS, per thread
# count and disk: how well the pipeline keeps the cores compressing on this machine.
echo
printf '%-34s %8s %8s %8s %10s\n' "stream export: cores busy" threads wall_s cpu_s cores
for disk in src other text; do
  for t in 1 2; do
    ws=(); cs=()
    for _ in $(seq "$RUNS"); do
      rm -f v.vmdk; sync
      /usr/bin/time -f '%e %U %S' -o cores.txt "$V" export $disk.vmdk v.vmdk --format stream -q --threads $t
      read -r e u s < <(tail -1 cores.txt)
      ws+=("$e"); cs+=("$(echo "$u + $s" | bc)")
    done
    w=$(printf '%s\n' "${ws[@]}" | median); c=$(printf '%s\n' "${cs[@]}" | median)
    printf '%-34s %8s %8.2f %8.2f %10.2f\n' "$disk disk" "$t" "$w" "$c" "$(echo "$c / $w" | bc -l)"
  done
done
# The pipe against the file: the same stream imported from stdin and from the file,
# alternating, 2 x RUNS + 1 times (the difference is small beside this machine's noise);
# vmdkit's own CPU (cat's is not counted) and the wall time with sync.
echo
printf '%-34s %8s %8s %10s %10s\n' "stream -> monolithicSparse" wall_s cpu_s wall/file cpu/file
pw=(); pc=(); fw=(); fc=()
for _ in $(seq $(( 2 * RUNS + 1 ))); do
  rm -f v.vmdk; sync
  t0=$(now)
  cat stream-src.vmdk | /usr/bin/time -f '%U %S' -o cores.txt "$V" import - v.vmdk --type monolithicSparse -q
  sync; pw+=("$(echo "$(now) - $t0" | bc)")
  read -r u s < <(tail -1 cores.txt); pc+=("$(echo "$u + $s" | bc)")
  rm -f v.vmdk; sync
  t0=$(now)
  /usr/bin/time -f '%U %S' -o cores.txt "$V" import stream-src.vmdk v.vmdk --type monolithicSparse -q
  sync; fw+=("$(echo "$(now) - $t0" | bc)")
  read -r u s < <(tail -1 cores.txt); fc+=("$(echo "$u + $s" | bc)")
done
mpw=$(printf '%s\n' "${pw[@]}" | median); mpc=$(printf '%s\n' "${pc[@]}" | median)
mfw=$(printf '%s\n' "${fw[@]}" | median); mfc=$(printf '%s\n' "${fc[@]}" | median)
printf '%-34s %8.2f %8.2f %9.2fx %9.2fx\n' "from a pipe (cat | import -)" "$mpw" "$mpc" "$(echo "$mpw / $mfw" | bc -l)" "$(echo "$mpc / $mfc" | bc -l)"
printf '%-34s %8.2f %8.2f %9.2fx %9.2fx\n' "from the file" "$mfw" "$mfc" 1 1

echo
echo "(bytes: du of the outputs' apparent sizes; size%: vmdkit relative to the peer; rss: peak resident MiB of one run)"
