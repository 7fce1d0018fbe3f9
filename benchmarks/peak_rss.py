"""Run `ream-lite ARGS...` in this process and print its own peak RSS (VmHWM) as the last line of stderr.

ru_maxrss of a child (wait4, /usr/bin/time) is not usable when the parent is large: Linux carries the parent's
high-water mark over at exec. VmHWM of the process itself is exact.
"""

import atexit
import sys

from ream_lite.report import peak_host_bytes


def _report() -> None:
    print(f"PEAK_RSS_BYTES {peak_host_bytes()}", file=sys.stderr)


atexit.register(_report)

if __name__ == "__main__":
    from ream_lite.cli import main

    main(args=sys.argv[1:], prog_name="ream-lite")
