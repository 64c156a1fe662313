"""How fast can this machine's disk be read? Buffered reads and O_DIRECT, several thread counts and
piece sizes, the page cache dropped before each (root). What bounds the NF4 cache's cold reload.

    python3 bench/disk_read.py [FILE] [GiB]      # default /tmp/cuda-speed/probe.bin, 6 GiB

Writes FILE (random 64 MB blocks), reads all of it once per setting, prints GB/s, removes FILE."""
import mmap
import os
import subprocess
import sys
import threading
import time

path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/cuda-speed/probe.bin"
size = int(float(sys.argv[2]) * 2**30) if len(sys.argv) > 2 else 6 * 2**30
os.makedirs(os.path.dirname(path), exist_ok=True)
print(subprocess.run("df -h /tmp; mount | grep -E ' / | /tmp '; lsblk; cat /sys/block/*/queue/read_ahead_kb /sys/block/*/queue/max_sectors_kb /sys/block/*/queue/nr_requests 2>/dev/null",
                     shell=True, capture_output=True, text=True).stdout)
if not os.path.exists(path) or os.path.getsize(path) != size:
    block = os.urandom(64 << 20)
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    print(f"write {size / 1e9:.1f} GB: {size / (time.perf_counter() - t) / 1e9:.2f} GB/s")


def drop():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def read(direct, threads, piece):
    drop()
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    offsets = list(range(0, size, piece))[::-1]
    lock = threading.Lock()

    def worker():
        buf = mmap.mmap(-1, piece)
        view = memoryview(buf)
        while True:
            with lock:
                if not offsets:
                    return
                off = offsets.pop()
            done = 0
            while done < piece:
                n = os.preadv(fd, [view[done:]], off + done)
                if n <= 0:
                    return
                done += n

    t = time.perf_counter()
    ws = [threading.Thread(target=worker) for _ in range(threads)]
    for w in ws:
        w.start()
    for w in ws:
        w.join()
    s = time.perf_counter() - t
    os.close(fd)
    print(f"{'O_DIRECT' if direct else 'buffered'} threads {threads:2d} piece {piece >> 20:3d} MB: {size / s / 1e9:.2f} GB/s", flush=True)


for direct, threads, piece in [(False, 8, 16 << 20), (True, 8, 16 << 20), (True, 16, 16 << 20), (True, 32, 8 << 20),
                               (True, 4, 64 << 20), (False, 32, 16 << 20), (False, 1, 16 << 20), (True, 64, 4 << 20)]:
    read(direct, threads, piece)
os.remove(path)
