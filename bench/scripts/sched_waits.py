#!/usr/bin/env python3
"""Where a 2-vCPU machine's idle time goes, from `perf sched timehist -V`.

Usage (during a flat-out row, e.g. `--rows ingest --events 400000 --duration 12s`):

    perf sched record -a -o /tmp/sched.data -- sleep 1
    perf sched timehist -i /tmp/sched.data -V > /tmp/timehist.txt
    python3 bench/scripts/sched_waits.py /tmp/timehist.txt

Prints the idle time, how much of it had both vCPUs idle at once, and, for
threads that were runnable (waiting in a run queue) while the other vCPU
was idle, whom they waited behind. Written for two vCPUs (0 and 1).
"""

import bisect
import collections
import re
import sys

LINE = re.compile(r"\s*([\d.]+)\s+\[(\d+)\]\s+\S*\s+(.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")


def name(task):
    """`tokio-rt-worker[123/100]` -> `tokio-rt-worker 100` (thread name, pid)."""
    base = re.sub(r"\[.*", "", task)
    pid = task.split("/")[-1].rstrip("]") if "/" in task else ""
    return f"{base} {pid}".strip()


def overlaps(spans, keys, start, end):
    """(overlap start, overlap end, item) of sorted `spans` that meet [start, end]."""
    k = max(bisect.bisect_left(keys, start) - 1, 0)
    while k < len(spans) and spans[k][0] < end:
        a, b = max(start, spans[k][0]), min(end, spans[k][1])
        if b > a:
            yield a, b, spans[k]
        k += 1


def main(path):
    runs = []  # (start, end, cpu, task, scheduling delay before start)
    for line in open(path):
        m = LINE.match(line)
        if not m:
            continue
        end, cpu, task = float(m[1]), int(m[2]), m[3].strip()
        delay, ran = float(m[5]) / 1000, float(m[6]) / 1000
        runs.append((end - ran, end, cpu, task, delay))
    runs.sort()
    if not runs:
        sys.exit("no runs found: was the timehist made with -V?")
    span = runs[-1][1] - runs[0][0]
    per_cpu = {c: sorted((s, e, t) for s, e, cc, t, _ in runs if cc == c) for c in (0, 1)}
    cpu_keys = {c: [r[0] for r in per_cpu[c]] for c in per_cpu}
    idle = {c: [(s, e, t) for s, e, t in per_cpu[c] if t.startswith("<idle>")] for c in per_cpu}
    idle_keys = {c: [r[0] for r in idle[c]] for c in idle}

    idle_total = sum(e - s for c in idle for s, e, _ in idle[c])
    both = sum(b - a for s, e, _ in idle[0] for a, b, _ in overlaps(idle[1], idle_keys[1], s, e))
    print(f"{span * 1e3:.0f} ms: idle {idle_total / span:.2f} vCPUs on average; "
          f"both idle at once {both * 1e3:.1f} ms")

    waited = collections.Counter()
    behind = collections.Counter()
    for start, _, cpu, task, delay in runs:
        if task.startswith("<idle>") or delay <= 0:
            continue
        other = 1 - cpu
        for a, b, _ in overlaps(idle[other], idle_keys[other], start - delay, start):
            waited[name(task)] += b - a
            for x, y, run in overlaps(per_cpu[cpu], cpu_keys[cpu], a, b):
                behind[(name(task), name(run[2]))] += y - x
    print(f"runnable while the other vCPU was idle: {sum(waited.values()) * 1e3:.1f} ms")
    for who, t in waited.most_common(8):
        print(f"  {who:32s} {t * 1e3:8.1f} ms")
    print("of that, waiting behind:")
    for (who, whom), t in behind.most_common(10):
        print(f"  {who:32s} behind {whom:32s} {t * 1e3:8.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1])
