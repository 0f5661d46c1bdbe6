"""The CUDA kernels' Numba cache keys are the same in every process, so a worker's second start loads its
kernels from the disk cache instead of compiling them again.

Numba keys a kernel's cache entry on the hash of its closure, pickled (numba-cuda's Cache._index_key); a
device function that a kernel factory makes pickles with its dispatcher's uuid, random in each process
unless named (device.made_device). The keys are computed in fresh processes without the simulator, as a
worker on a GPU computes them; no GPU is needed to make the kernels' dispatchers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

# The kernels of the 8B's and the 0.5B's shapes in the Q4_K_M mix, one of each factory and kind of closure.
_SCRIPT = """
import hashlib, json
from numba.cuda.serialize import dumps
from rbees_workerd.kernels.cuda import formats as F, gemm, gemv, hmma, mma, ops, repack, rows
from rbees_workerd.kernels.cuda.outputs import MODE_ROWS

kernels = {
    "mma Q4_K 4": mma.mma_kernel(F.Q4_K, 4, True), "mma Q5_0 8": mma.mma_kernel(F.Q5_0, 8, False),
    "hmma Q4_K 8": hmma.hmma_kernel(F.Q4_K, 8, True), "hmma Q6_K 4": hmma.hmma_kernel(F.Q6_K, 4, True),
    "prep_q8": mma.prep_q8_kernel(F.Q4_K), "prep_f16": hmma.prep_f16_kernel(F.Q6_K),
    "vec": gemv.vec_kernel(F.Q4_K, 4096, MODE_ROWS, 0, (4096, 1024, 1024)),
    "rows": rows.rows_kernel(F.F16, MODE_ROWS, 0), "gemm": gemm.gemm_kernel(F.F16, 0), "prep": gemm.prep_kernel(0),
    "attention 128": ops.attention_kernel(128, 1), "attention 64x2": ops.attention_kernel(64, 2),
    "attention_seq 128": ops.attention_seq_kernel(128), "embed": ops.embed_kernel(F.Q6_K),
    "repack": repack.repack_kernel(F.Q4_K),
}
print(json.dumps({name: hashlib.sha256(dumps(tuple(c.cell_contents for c in k.py_func.__closure__ or ()))).hexdigest()
                  for name, k in kernels.items()}))
"""


def _keys() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_kernel_keys_its_cache_alike_in_every_process():
    first, second = _keys(), _keys()
    assert len(first) == 15
    assert first == second, [name for name in first if first[name] != second[name]]
