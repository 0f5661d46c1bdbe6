"""Where the seconds of a model's load go: Engine.load (the file, the weights on the backend, the kernels
compiled or loaded from Numba's cache, the warm-up) under cProfile, with the load's own phase times.

    python bench/load_profile.py MODEL.gguf --backend cuda --slots 4 [--top 30]

Run it twice on the same NUMBA_CACHE_DIR: the second run is a warm start's load.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

from rbees_workerd.engine.engine import Engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    t0 = time.perf_counter()
    phases: dict[str, float] = {}

    def progress(phase: str, fraction: float) -> None:
        phases.setdefault(phase, round(time.perf_counter() - t0, 2))

    prof = cProfile.Profile()
    prof.enable()
    Engine.load(a.model, backend=a.backend, slots=a.slots, on_progress=progress)
    prof.disable()
    print(f"load {time.perf_counter() - t0:.2f} s; phases start at (s): {phases}")
    for key in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(a.top)
        print(out.getvalue())


if __name__ == "__main__":
    main()
