"""What the query cache costs and saves on the reference task: the same 16-shot, 8000-query soft fit with no
cache, with a fresh cache (every answer written before use), and replayed from a full cache (every answer
read back: what ``--resume`` does for the part already paid). Interleaved repeats, medians; the adapters of
all three must be byte-identical or the run fails.

    .venv/bin/python benchmarks/cache_overhead.py --repeats 3
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from craft_adapter.blackbox.query_cache import QueryCache
from craft_adapter.training.config import FitConfig

# isort: split
from fit_speed import reference_fit, setup  # a sibling script, as serve_common is for the server benchmarks

if TYPE_CHECKING:
    from craft_adapter.vendors.open_clip_backend import OpenClipBackend

RESULTS = Path(__file__).resolve().parent / "results"


def one_fit(backend: OpenClipBackend, cfg: FitConfig, cache: QueryCache | None) -> dict:
    """One fit; its wall time, the adapter bytes and the meter."""
    t = time.perf_counter()
    r = reference_fit(backend, cfg, cache)
    return {"wall_s": time.perf_counter() - t, "bytes": r.adapter.to_bytes(), "meter": r.record.meter}


def main() -> None:
    """Run the three variants side by side and print the medians and ratios."""
    args, backend, cfg = setup()
    times: dict[str, list[float]] = {"no cache": [], "fresh cache": [], "replay": []}
    reference, size, meters = None, 0, {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            runs = {"no cache": one_fit(backend, cfg, None)}
            path = Path(tmp) / f"cache{k}.sqlite"
            with QueryCache(path) as cache:
                runs["fresh cache"] = one_fit(backend, cfg, cache)
                runs["replay"] = one_fit(backend, cfg, cache)
                size = cache.stats()["disk_bytes"]
            for name, r in runs.items():
                reference = reference or r["bytes"]
                if r["bytes"] != reference:
                    raise SystemExit(f"{name}: the adapter differs; the cache changed the result")
                times[name].append(r["wall_s"])
                meters[name] = r["meter"]
    med = {name: statistics.median(v) for name, v in times.items()}
    base = med["no cache"]
    result = {"seed": args.seed, "repeats": args.repeats, "budget_queries": 8000, "median_wall_s": med,
              "fresh_over_none": med["fresh cache"] / base, "replay_over_none": med["replay"] / base,
              "cache_disk_bytes": size, "meters": meters, "identical_adapters": True, "all_wall_s": times}
    for name in times:
        m = meters[name]
        print(f"{name:12s} median {med[name]:6.2f} s  paid {m['paid_calls']:4d}  cached {m['cached_calls']:4d}")
    print(f"fresh cache / no cache = {result['fresh_over_none']:.3f}; replay / no cache = "
          f"{result['replay_over_none']:.3f}; cache file {size / 1e6:.1f} MB; adapters byte-identical")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cache_overhead.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
