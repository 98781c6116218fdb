"""Every benchmark in one command; each prints one line per figure, ending in its ratio
(bridgevlm / reference), and one line per equivalence check.

    python benchmarks/run_all.py            # about 12 minutes on 2 cores
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_blip2  # noqa: E402
import bench_generate  # noqa: E402
import bench_preprocess  # noqa: E402
import bench_serve  # noqa: E402
import bench_stage1  # noqa: E402
import bench_train  # noqa: E402
from common import machine  # noqa: E402


def main() -> int:
    start = time.time()
    print(f"machine: {machine()}", flush=True)
    records = []
    # bench_serve's load phases are shortened to keep it near 2 minutes (its default is 40 s a phase).
    for bench, argv in ((bench_preprocess, []), (bench_generate, []), (bench_train, []), (bench_stage1, []),
                        (bench_blip2, []), (bench_serve, ["--seconds", "15"])):
        print(f"--- {bench.__name__}", flush=True)
        records += bench.main(argv)
    failed = [r["check"] for r in records if "check" in r and not r["ok"]]
    print(f"--- {len(records)} lines in {time.time() - start:.0f} s; "
          f"equivalence checks {'all pass' if not failed else 'FAILED: ' + ', '.join(failed)}", flush=True)
    out = Path(__file__).resolve().parent / "last_run.json"
    out.write_text(json.dumps({"machine": machine(), "records": records}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
