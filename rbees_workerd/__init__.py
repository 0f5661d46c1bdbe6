"""rbees-workerd: the worker daemon and its inference engine.

Numba caches compiled kernels beside their source (`__pycache__` inside the installed package) unless
NUMBA_CACHE_DIR says otherwise, and reads that variable once, when it is first imported: so the default, the
user's cache folder (e.g. ~/.cache/rbees/numba), is set here, before any module of this package imports Numba.
"""

import os

if not os.environ.get("NUMBA_CACHE_DIR"):
    from platformdirs import user_cache_dir

    os.environ["NUMBA_CACHE_DIR"] = os.path.join(user_cache_dir("rbees"), "numba")
