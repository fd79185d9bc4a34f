# The kernel floor of a durable group commit on this machine (docs/benchmarks.md, issue 17):
# append SIZE bytes to a file and fdatasync, COUNT times at about 200 commits a second (the
# default store.group_commit_ms = 5), and print this process's CPU per commit.
#
#   python3 loadtest/scripts/fsync_floor.py SIZE COUNT [prealloc]
#
# `prealloc` writes and syncs the whole file first, so the commits overwrite blocks instead of
# growing the file. DIR=path picks the volume (default /tmp); the file is removed at the end.
import os
import resource
import shutil
import sys
import tempfile
import time

size, count = int(sys.argv[1]), int(sys.argv[2])
prealloc = len(sys.argv) > 3
d = tempfile.mkdtemp(dir=os.environ.get("DIR", "/tmp"))
try:
    fd = os.open(os.path.join(d, "log"), os.O_WRONLY | os.O_CREAT)
    if prealloc:
        os.write(fd, b"\0" * (size * count))
        os.fsync(fd)
    buf = b"x" * size
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    for i in range(count):
        os.pwrite(fd, buf, i * size)
        os.fdatasync(fd)
        time.sleep(0.004)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    os.close(fd)
finally:
    shutil.rmtree(d)
cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
sys_cpu = r1.ru_stime - r0.ru_stime
print(
    f"{size} B x {count} commits{' (preallocated)' if prealloc else ''}: "
    f"{cpu / count * 1e6:.0f} us CPU per commit (sys {sys_cpu / count * 1e6:.0f}), "
    f"{(time.time() - t0) / count * 1e3:.2f} ms wall each"
)
