#!/usr/bin/env python3
"""Write a sparse raw test disk with a realistic mix, in runs of 64 KiB to 4 MiB:
about 40% incompressible data, 20% compressible text, 15% written zeros, 25% holes.
Usage: mkdisk.py PATH SIZE_MIB [SEED]"""
import os, random, sys

path, size_mib = sys.argv[1], int(sys.argv[2])
rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
size = size_mib << 20
words = ("the quick brown fox jumps over lazy dog backup storage vmware disk "
         "export commit grain table sector kernel log error warning info user "
         "2026-11-22 12:00:01 request id=%d status=200 bytes=%d path=/var/lib/x").split()
text = bytearray()
while len(text) < (8 << 20):
    line = " ".join(rng.choice(words) for _ in range(rng.randint(5, 14)))
    line = line.replace("%d", str(rng.randint(0, 1 << 20)))
    text += line.encode() + b"\n"
text = bytes(text)
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
