#!/usr/bin/env bash
# Commit benchmark (called by compare.sh, or alone: commit-bench.sh VMDKIT RUNS):
# a 768 MiB hosted sparse parent with some data, a qemu-made hosted child holding ~30% of
# the disk in scattered writes of 64 KiB to 1 MiB; vmdkit commit vs qemu-img commit on
# fresh copies of the same chain, alternating, medians; each timing ends with `sync`.
set -euo pipefail
V=$1; RUNS=${2:-3}
mkdir -p commit-src
if [ ! -f commit-src/c.vmdk ]; then
  ( cd commit-src
    qemu-img create -q -f vmdk p.vmdk 768M
    qemu-io -f vmdk -c 'write -P 0x41 0 64M' -c 'write -P 0x42 300M 64M' p.vmdk >/dev/null
    qemu-img create -q -f vmdk -b p.vmdk -F vmdk c.vmdk
    python3 - <<'PY' > cmds.txt
import random
r = random.Random(7); total = 0; target = int(768 * 2**20 * 0.30); cmds = []
while total < target:
    n = r.choice([64, 128, 256, 512, 1024]) << 10
    off = r.randrange(0, 768 * 2**20 - n) // 65536 * 65536
    cmds.append(f"write -P {r.randrange(1, 255)} {off} {n}"); total += n
print("\n".join(cmds))
PY
    args=(); while read -r c; do args+=(-c "$c"); done < cmds.txt
    qemu-io -f vmdk "${args[@]}" c.vmdk > /dev/null )
fi
fresh() { rm -rf "$1"; mkdir "$1"; cp --sparse=always commit-src/p.vmdk commit-src/c.vmdk "$1/"; sync; }
now() { date +%s.%N; }
tv=(); tq=()
for _ in $(seq "$RUNS"); do
  fresh cv; t0=$(now); (cd cv && "$V" commit c.vmdk -q); sync; tv+=("$(echo "$(now) - $t0" | bc)")
  fresh cq; t0=$(now); (cd cq && qemu-img commit -q c.vmdk); sync; tq+=("$(echo "$(now) - $t0" | bc)")
done
cmp <(qemu-img convert -O raw cv/p.vmdk /dev/stdout 2>/dev/null | sha256sum) <(qemu-img convert -O raw cq/p.vmdk /dev/stdout 2>/dev/null | sha256sum) >/dev/null 2>&1 || true
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
mv=$(printf '%s\n' "${tv[@]}" | median); mq=$(printf '%s\n' "${tq[@]}" | median)
child=$(du -b commit-src/c.vmdk | cut -f1)
printf '%-34s %9.2f %9.2f %6.2fx %12d %12d %7s\n' "commit 30% child into sparse" "$mv" "$mq" "$(echo "$mq / $mv" | bc -l)" "$(du -b cv/p.vmdk | cut -f1)" "$(du -b cq/p.vmdk | cut -f1)" "(child $((child >> 20)) MiB)"
if ! cmp -s <(qemu-img convert -O raw cv/p.vmdk /tmp/.cv.raw && sha256sum < /tmp/.cv.raw) <(qemu-img convert -O raw cq/p.vmdk /tmp/.cq.raw && sha256sum < /tmp/.cq.raw); then
  echo "WARNING: the two committed parents differ"; fi
rm -f /tmp/.cv.raw /tmp/.cq.raw
