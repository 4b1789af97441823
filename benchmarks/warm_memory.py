"""Touch the machine's free memory once, so that later benchmarks do not pay for it.

On a fresh virtual machine (this project's CI and development machines are Firecracker VMs)
the host backs guest memory lazily: the first write to a page the guest has never used costs
a fault on the host, ~2 ms per MB. A benchmark that writes new files (page cache) or makes new
arrays then swings by 5x depending on whether the pages it is handed were touched before:
writing 100 MB to a new file took 18 ms or 230 ms on the same machine, minutes apart. Once
every page has been touched, both sides of a ratio pay the same, as on an ordinary machine.

    python benchmarks/warm_memory.py [--gb N]   # default: 90% of MemAvailable

Run it once after the machine boots, before the other benchmarks. It allocates, touches and
frees memory; nothing else changes.
"""

from __future__ import annotations

import argparse
import mmap
import sys
import time

CHUNK = 256 * 1024 * 1024
PAGE = mmap.PAGESIZE


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=None,
                        help="how much to touch, in GB (default: 90%% of MemAvailable)")
    arguments = parser.parse_args()
    target = int(arguments.gb * 1e9) if arguments.gb else int(available_bytes() * 0.9)
    started = time.perf_counter()
    held = []
    touched = 0
    while touched < target:
        size = min(CHUNK, target - touched)
        populate = getattr(mmap, "MAP_POPULATE", 0)  # Linux: the kernel touches every page
        block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
        if not populate:
            for offset in range(0, size, PAGE):  # one byte per page makes the host back it
                block[offset] = 1
        held.append(block)
        touched += size
    seconds = time.perf_counter() - started
    for block in held:
        block.close()
    print(f"touched {touched / 1e9:.1f} GB in {seconds:.1f} s "
          f"({touched / 1e6 / seconds:.0f} MB/s; memory already backed runs at several GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
