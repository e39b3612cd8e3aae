#!/usr/bin/env python3
"""Write a sparse raw test disk with a realistic mix, in runs of 64 KiB to 4 MiB:
about 40% incompressible data, 20% compressible text, 15% written zeros, 25% holes.
With MIX=text, a text-heavy disk instead (a file server of logs and source): 10%
incompressible, 60% text (JSON records and source lines, another kind than the mixed
disk's log words), 10% written zeros, 20% holes. With MIX=other, the mixed disk's
proportions with the text-heavy disk's kind of text (the shape of issue 23's held-out
disk: 40% random, 20% text of another kind, 15% written zeros, 25% holes).
Usage: mkdisk.py PATH SIZE_MIB [SEED] [MIX]"""
import json, os, random, sys

path, size_mib = sys.argv[1], int(sys.argv[2])
rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
mix = sys.argv[4] if len(sys.argv) > 4 else "mixed"
size = size_mib << 20
words = ("the quick brown fox jumps over lazy dog backup storage vmware disk "
         "export commit grain table sector kernel log error warning info user "
         "2026-11-22 12:00:01 request id=%d status=200 bytes=%d path=/var/lib/x").split()
text = bytearray()
while len(text) < (8 << 20):
    line = " ".join(rng.choice(words) for _ in range(rng.randint(5, 14)))
    line = line.replace("%d", str(rng.randint(0, 1 << 20)))
    text += line.encode() + b"\n"
if mix in ("text", "other"):
    text = bytearray()
    names = ["id", "user", "path", "size", "mtime", "owner", "tags", "status", "checksum"]
    code = ["fn main() {", "    let x = vec![0u8; 4096];", "    for i in 0..n {", "        total += i * 3;",
            "    }", "    return Ok(());", "}", "#include <stdio.h>", "int main(void) {",
            "    printf(\"%d\\n\", argc);", "// TODO: handle errors", "import os, sys"]
    while len(text) < (8 << 20):
        if rng.random() < 0.5:
            rec = {k: (rng.randint(0, 1 << 30) if k in ("id", "size", "mtime")
                       else "".join(rng.choice("abcdefghij0123456789/") for _ in range(rng.randint(4, 24))))
                   for k in rng.sample(names, rng.randint(3, len(names)))}
            text += json.dumps(rec).encode() + b"\n"
        else:
            text += "\n".join(rng.choice(code) for _ in range(rng.randint(3, 12))).encode() + b"\n"
text = bytes(text)
if mix == "text":
    kinds = ["random"] * 10 + ["text"] * 60 + ["zeros"] * 10 + ["hole"] * 20
else:
    kinds = ["random"] * 40 + ["text"] * 20 + ["zeros"] * 15 + ["hole"] * 25
with open(path, "wb") as f:
    f.truncate(size)
    pos = 0
    while pos < size:
        n = min(rng.choice([64, 128, 256, 512, 1024, 2048, 4096]) << 10, size - pos)
        k = rng.choice(kinds)
        if k == "random":
            f.seek(pos); f.write(os.urandom(n))
        elif k == "text":
            o = rng.randrange(0, len(text) - n)
            f.seek(pos); f.write(text[o:o + n])
        elif k == "zeros":
            f.seek(pos); f.write(bytes(n))
        pos += n
