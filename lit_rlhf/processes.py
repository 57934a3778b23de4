"""A pipeline stage in a fresh Python process: its memory goes back to the system when it ends.

Standard library only, so that a spawned process imports no more than its stage needs.
"""

import multiprocessing
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor


def in_own_process(function, *args):
    """`function(*args)` in a fresh Python process (spawned), its result returned and its errors raised here; prints
    the process's time and peak memory. The demo runs each stage so: the memory a stage freed goes back to the
    system when its process ends, where one process kept glibc's freed blocks from stage to stage and peaked well
    above its largest stage (docs/results.md)."""
    start = time.time()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        result, peak_kib = pool.submit(with_peak_memory, function, *args).result()
    print(f"[demo] done in {(time.time() - start) / 60:.1f} min, peak memory {peak_kib / 2**20:.2f} GiB", file=sys.stderr)
    return result


def with_peak_memory(function, *args):
    """`function(*args)` and this process's peak resident memory so far (KiB)."""
    result = function(*args)
    return result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
