"""Run one command and report its wall time and peak RSS as JSON on stdout's last line.

A small stdlib-only launcher: Linux carries a parent's peak RSS into every child it forks, so the
command must be started from a process that is itself small, never from the benchmark driver.
"""

import json
import resource
import subprocess
import sys
import time

if __name__ == "__main__":
    command = sys.argv[1:]
    start = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"returncode": result.returncode, "wall_s": round(wall, 3), "peak_rss_mb": round(peak_kib / 1024, 1),
                      "stderr_tail": result.stderr[-500:]}))
