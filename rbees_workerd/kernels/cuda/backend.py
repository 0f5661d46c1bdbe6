"""CudaBackend: the Backend interface on one NVIDIA GPU through Numba CUDA kernels.

Each op of the interface is lowered to its launches directly (`_Lowering`): a group of products
over one input becomes one launch a weight type (up to three matrices: q/k/v, gate/up) that also
normalizes its input and, for one or two tokens, rotates q/k and stores k/v in the cache
(MODE_QKV) or applies SwiGLU (MODE_SWIGLU); for more tokens the input is rounded once and the
tensor cores take the product. The kernel families are gemv (1-2 tokens), rows (a few), mma and
gemm (many; quantized and float weights). Launches queue on one stream; inside `run_step` they are
recorded instead, launched once (which also compiles them) and captured into a CUDA graph
through cuda.core's graph builder; later steps of the same key replay the graph, a few
microseconds of host time for the whole forward instead of one launch per op. In the graphs of
decode steps each kernel launches while the one before it runs (_programmatic_edges).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import cuda
from numba.cuda.cudadrv import driver

from rbees_workerd.errors import CudaError, InvalidParams, ModelLoadError, VramOOM
from rbees_workerd.kernels import backend
from rbees_workerd.kernels.cuda import dense, formats, gemm, gemv, hmma, mma, ops, repack, rows, sample
from rbees_workerd.kernels.cuda.device import SIM, address
from rbees_workerd.kernels.cuda.outputs import ACCUMULATE, BIAS, MODE_QKV, MODE_ROWS, MODE_SWIGLU, NORM

if not SIM:
    from cuda.bindings import driver as cu

# The small grids are deliberate (a decode step's kernels are graph nodes that overlap one another), and
# numba-cuda would warn of each one at its first launch, in every worker's log.
warnings.filterwarnings("ignore", message=r"(\x1b\[1m)?Grid size \d+ will likely result in GPU under-utilization")

MAX_GRAPHS = 64  # captured graphs kept of each kind, steps and samplings (least recently used dropped)
MAX_SEEN = 256  # keys of each kind run once and remembered, to be captured if they come again
PROGRAMMATIC = True  # graphs' kernels launch while the one before runs (see _programmatic_edges)
GEMM_MIN_TOKENS = 16 if SIM else 32  # float weights: steps of this many tokens take the tiled GEMM (see _many_tokens)
_STAGING = 1 << 20  # pinned bytes through which small uploads go asynchronously
_OOM = 2  # CUDA_ERROR_OUT_OF_MEMORY
# the simulator's driver module defines only some of these
_DRIVER_ERRORS = tuple(getattr(driver, n) for n in ("CudaAPIError", "CudaDriverError", "CudaSupportError")
                       if hasattr(driver, n))  # fmt: skip


@dataclass
class QWeight:
    """An [N, K] matrix of GGML type qt in VRAM, in the layout of `formats`."""

    qt: int
    words: Any
    gs: Any
    sb: Any
    shape: tuple[int, int]


@dataclass
class _Launch:
    kernel: Any
    grid: tuple[int, ...]
    block: tuple[int, ...]
    args: tuple[Any, ...]
    overlap: bool = True  # False: not a decode kernel that loads its weights before grid_ready (see _replay)


@dataclass
class _ArgmaxBufs:
    """Per row count: argmax_kernel's row maxima and block counters (reset by each launch), the ids
    on the device, a params stand-in for launches that read none, and how many samplings have
    written those ids (so that a feed of older picks notices)."""

    acc: Any
    count: Any
    ids: Any
    dummy: Any
    ids_addr: int
    samplings: int = 0


@dataclass
class _ParamsBufs:
    """Per (rows, vocabulary, history width): packed params on the host and the device, and
    sample_kernel's work rows."""

    dev: Any
    work: Any
    host: np.ndarray


class _DevicePicks(backend.Picks):
    """Sampled ids on their way to the host: copied into a pinned buffer behind an event, while the
    device's copy can still feed the next step (until the next sampling of as many rows)."""

    def __init__(self, be: CudaBackend, ab: _ArgmaxBufs, n: int) -> None:
        self._be, self._ab, self._n, self._sampling = be, ab, n, ab.samplings
        self._host, self._event = be._pinned_ids(n)
        _check(cu.cuMemcpyDtoHAsync(self._host.ctypes.data, ab.ids_addr, 4 * n, be._stream_handle))
        _check(cu.cuEventRecord(self._event, be._stream_handle))
        self._got: np.ndarray | None = None

    def __len__(self) -> int:
        return self._n

    def ids(self) -> np.ndarray:
        if self._got is None:
            with _cuda_errors("reading sampled tokens"):
                _check(cu.cuEventSynchronize(self._event))
            self._got = self._host.copy()
            self._be._free_ids.setdefault(self._n, []).append((self._host, self._event))
        return self._got

    def on_device(self) -> int | None:
        """The address of the device's ids while they are still these picks', else None."""
        return self._ab.ids_addr if self._ab.samplings == self._sampling else None


def _ptr(a: Any) -> tuple[int, tuple[int, ...]]:
    """Identity of a device array view: its address and shape."""
    return address(a), tuple(a.shape)


_ELEMENTWISE = (1, 32) if SIM else (4, 64)


def _grid2(rows: int, cols: int) -> tuple[tuple[int, int], tuple[int, int]]:
    block = _ELEMENTWISE
    return (math.ceil(rows / block[0]), math.ceil(cols / block[1])), block


@contextlib.contextmanager
def _cuda_errors(what: str) -> Iterator[None]:
    """Turn the driver's exceptions into CudaError (VramOOM for out-of-memory)."""
    try:
        yield
    except _DRIVER_ERRORS as e:
        if getattr(e, "code", None) == _OOM:
            raise VramOOM(f"out of GPU memory while {what}") from e
        raise CudaError(f"CUDA failed while {what}: {e}") from e


class CudaBackend(backend.Backend):
    name = "cuda"
    queues_ahead = not SIM  # (the simulator runs each kernel as it is launched)
    pads_steps = not SIM
    kv_dtype = np.uint16
    # (1 token, each token-tile count of mma_kernel, hmma_kernel: the simulator's warm-up leaves out its 65 tokens)
    warm_sizes = (1, *(8 * nj for nj in mma.TOKEN_TILES),
                  *(() if SIM else sorted({hmma.MIN_TOKENS, hmma.LARGE_MIN_TOKENS})))  # fmt: skip

    def __init__(self, gpu: int = 0) -> None:
        with _cuda_errors(f"opening GPU {gpu}"):
            if not SIM and not cuda.is_available():
                raise CudaError("no usable CUDA GPU (driver or device missing)")
            if gpu < 0 or gpu >= len(cuda.gpus):
                raise InvalidParams(f"GPU {gpu} does not exist ({len(cuda.gpus)} visible)")
            cuda.select_device(gpu)
            name = getattr(cuda.get_current_device(), "name", "simulator")
            self.sms = 4 if SIM else cuda.get_current_device().MULTIPROCESSOR_COUNT  # (mma.plan sizes grids by it)
            self.device = f"cuda:{gpu} {name.decode() if isinstance(name, bytes) else name}"
            self._core_stream = None
            if SIM:
                self._stream = cuda.stream()
            else:
                from cuda.core import Device

                dev = Device(gpu)
                dev.set_current()
                self._core_stream = dev.create_stream()
                self._stream = cuda.external_stream(int(self._core_stream.handle))
                self._stream_handle = int(self._core_stream.handle)
                self._staging = cuda.pinned_array(_STAGING, np.uint8)
        self._bytes = 0
        self._staged = 0  # bytes of the pinned staging buffer in use since the last synchronization
        self._recording: list[Any] | None = None
        self._repeats = False  # whether the step being built came before (and is captured now): see _replay
        self._graphs = {kind: _Graphs() for kind in ("step", "sample")}  # see _replay
        self._sample_bufs: dict[tuple[Any, ...], Any] = {}
        self._ptrs: dict[int, tuple[Any, tuple[int, tuple[int, ...]]]] = {}  # see _array_ptr
        self._free_ids: dict[int, list[tuple[np.ndarray, Any]]] = {}  # see _pinned_ids
        self._act_bufs: dict[tuple[Any, ...], Any] = {}
        self._dummy_mats: dict[int, tuple[Any, ...]] = {}  # see _dummy_mat
        self._raw: Any = None  # the device copy of a matrix's GGUF bytes while it is repacked
        self._dummy_f = self._to_device(np.zeros((1, 1), np.float32))
        self._dummy_v = self._to_device(np.zeros(1, np.float32))
        self._dummy_part = self._to_device(np.zeros((1, 1, 1), np.float32))
        self._dummy_count = self._to_device(np.zeros(1, np.int32))
        dummy_c = self._to_device(np.zeros((1, 1, 1, 1), np.float32))
        self._no_rope = (dummy_c, dummy_c, self._dummy_count, self._dummy_count, self._dummy_f, self._dummy_f,
                         np.float32(1.0))  # fmt: skip
        self._rope_tables: dict[tuple[Any, ...], tuple[Any, Any]] = {}
        self._scratch_bufs: dict[str, Any] = {}  # see _scratch
        self._gemm = dense.Gemm(0 if SIM else self._stream_handle, self.zeros)

    # ---- memory
    def check_fits(self, needed_bytes: int) -> None:
        """Raise VramOOM unless `needed_bytes` more fit in the GPU's free memory."""
        with _cuda_errors("reading free memory"):
            free, total = cuda.current_context().get_memory_info()
        if needed_bytes > free:
            raise VramOOM(
                f"the model needs {needed_bytes / 2**20:.0f} MiB of GPU memory but {self.device} has "
                f"{free / 2**20:.0f} MiB free of {total / 2**20:.0f} MiB ({needed_bytes} > {free} bytes)"
            )

    def _to_device(self, a: np.ndarray) -> Any:
        with _cuda_errors(f"allocating {a.nbytes} bytes"):
            d = cuda.to_device(np.ascontiguousarray(a), stream=self._stream)
        self._bytes += a.nbytes
        return d

    def weight(self, qtype: int, shape: tuple[int, int], raw: np.ndarray) -> QWeight:
        """Copy the matrix's GGUF bytes to the GPU as they are and repack them there (repack)."""
        qt, (n, k) = int(qtype), (int(shape[0]), int(shape[1]))
        if qt not in formats.SUPPORTED:
            raise ModelLoadError(f"the CUDA backend does not support the GGML type {qt}")
        if k % 32 or (qt in formats.KQUANTS and k % 256):
            raise ModelLoadError(f"rows of GGML type {qt} must be a multiple of {256 if qt in formats.KQUANTS else 32}"
                                 f" elements for the CUDA backend, got {k}")  # fmt: skip
        words_shape, gs_shape, sb_shape = repack.shapes(qt, n, k)
        if qt not in formats.QUANTIZED:
            words = self._to_device(repack.dense_words(raw))
            return QWeight(qt, words, *self._dummy_mat(qt)[1:3], (n, k))
        raw = np.ascontiguousarray(raw).view(np.uint8).reshape(n, -1)
        with _cuda_errors(f"copying a {raw.nbytes}-byte matrix to the GPU"):
            if self._raw is None or self._raw.size < raw.nbytes:
                self._raw = None  # (freed before the larger one is taken)
                self._raw = cuda.device_array(raw.nbytes, np.uint8, stream=self._stream)
            staged = self._raw[: raw.nbytes].reshape(raw.shape)
            staged.copy_to_device(raw, stream=self._stream)
            words = self.zeros(words_shape, np.uint32)
            gs = self.zeros(gs_shape, repack.scale_dtype(qt))
            sb = self.zeros(sb_shape, repack.super_dtype(qt)) if qt in formats.KQUANTS else self._dummy_mat(qt)[2]
            blocks = -(-(n * (k // 32)) // repack.THREADS)
            repack.repack_kernel(qt)[blocks, repack.THREADS, self._stream](staged, words, gs, sb)
        return QWeight(qt, words, gs, sb, (n, k))

    def loaded(self) -> None:
        """Free the repacking's copy of the GGUF bytes (as large as the largest matrix)."""
        self.synchronize()
        self._raw = None

    def vector(self, data: np.ndarray) -> Any:
        return self._to_device(np.asarray(data, np.float32))

    def zeros(self, shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if SIM:
            return self._to_device(np.zeros(shape, dtype))
        with _cuda_errors(f"allocating {nbytes} bytes"):
            a = cuda.device_array(shape, dtype, stream=self._stream)
            driver.device_memset(a, 0, nbytes, stream=self._stream)
        self._bytes += nbytes
        return a

    def upload(self, host: np.ndarray, out: Any) -> None:
        host = np.ascontiguousarray(host, dtype=out.dtype)
        if host.shape != out.shape:
            raise InvalidParams(f"upload of shape {host.shape} into a device array of shape {out.shape}")
        n = host.nbytes
        with _cuda_errors("copying to the GPU"):
            if SIM or n > _STAGING or not out.is_c_contiguous():
                out.copy_to_device(host, stream=self._stream)
                return
            # through pinned memory with the raw driver call: numba's copy costs tens of microseconds
            if self._staged + n > _STAGING:
                self.synchronize()
            stage = self._staging[self._staged : self._staged + n]
            stage[:] = host.reshape(-1).view(np.uint8)
            self._staged += -(-n // 256) * 256
            _check(cu.cuMemcpyHtoDAsync(address(out), stage.ctypes.data, n, self._stream_handle))

    def download(self, a: Any) -> np.ndarray:
        with _cuda_errors("copying from the GPU"):
            if SIM or not a.is_c_contiguous():
                h = a.copy_to_host(stream=self._stream)
            else:
                h = np.empty(a.shape, a.dtype)
                _check(cu.cuMemcpyDtoHAsync(h.ctypes.data, address(a), h.nbytes, self._stream_handle))
            self.synchronize()
        return h

    def _dummy_mat(self, qt: int) -> tuple[Any, ...]:
        """A matrix with no rows of type qt for a product launch's unused places: (words, gs, sb, out, bias)
        of the types the kernel compiled for qt is given for its real matrices."""
        if qt not in self._dummy_mats:
            types = (np.uint32, repack.scale_dtype(qt), repack.super_dtype(qt))
            words, gs, sb = (self._to_device(np.zeros((1, 1), t)) for t in types)
            self._dummy_mats[qt] = (words, gs, sb, self._dummy_f, self._dummy_v)
        return self._dummy_mats[qt]

    def _rope_table(self, rope: backend.RopeStore, head: int, context: int) -> tuple[Any, Any]:
        """cos/sin[position, pair] of RoPE's angles at every position of the context (backend.rope_table:
        the values the CPU rotates with too)."""
        key = (rope.angles_key, head, context)
        if key not in self._rope_tables:
            table = backend.rope_table(np.arange(context), head, *rope.angles_key)
            self._rope_tables[key] = (self.vector(table[0]), self.vector(table[1]))
        return self._rope_tables[key]

    def _split_buffers(self, split: int, tokens: int, rows: int, tiles: int) -> tuple[Any, Any]:
        """The partial sums and tile counters of a product split over K (dummies when not split).

        The launches of a step run one after another and each leaves its counters at zero, so they
        share one buffer of partial sums (mma.PART_BYTES, which every plan keeps within) and keep
        counters per shape."""
        if split == 1:
            return self._dummy_part, self._dummy_count
        if split * tokens * rows * 4 > mma.PART_BYTES:
            raise InvalidParams(f"a product split {split} ways over {tokens} tokens x {rows} rows exceeds "
                                f"{mma.PART_BYTES} bytes of partial sums")  # fmt: skip
        if "part" not in self._act_bufs:
            self._act_bufs["part"] = self.zeros((mma.PART_BYTES // 4,))
        key = ("split", split, tokens, rows, tiles)
        if key not in self._act_bufs:
            self._act_bufs[key] = (self._act_bufs["part"][: split * tokens * rows].reshape(split, tokens, rows),
                                   self.zeros((tiles,), np.int32))  # fmt: skip
        return self._act_bufs[key]

    def _scratch(self, name: str, shape: tuple[int, ...], dtype: Any, reserve: int = 0) -> Any:
        """A view of shape `shape` on the buffer `name`, which grows to the largest asked for (scratch whose
        size follows each step's tokens), and is taken at `reserve` elements at least. Growing drops the captured
        graphs, which hold the smaller one's address, once the queued work is done with it."""
        n = math.prod(shape)
        buf = self._scratch_bufs.get(name)
        if buf is None or buf.size < n:
            if buf is not None:
                self.synchronize()
                self.forget_graphs()
                self._bytes -= buf.nbytes
                del self._scratch_bufs[name]  # (freed before the larger one is taken)
            buf = self._scratch_bufs[name] = self.zeros((max(n, reserve),), dtype)
        return buf[:n].reshape(shape)

    def memory_bytes(self) -> int:
        return self._bytes

    def synchronize(self) -> None:
        with _cuda_errors("synchronizing"):
            self._stream.synchronize()
        self._staged = 0

    # ---- ops
    def _submit(self, launches: list[_Launch]) -> None:
        if self._recording is not None:
            self._recording += launches
        else:
            with _cuda_errors("launching a kernel"):
                self._launch(launches)

    def _launch(self, launches: list[_Launch], target: Any = None) -> None:
        target = self._stream if target is None else target
        for ln in launches:
            ln.kernel[ln.grid, ln.block, target](*ln.args)

    def embed(self, table: QWeight, tokens: Any, out: Any) -> None:
        items = table.shape[1] // 8
        self._submit([_Launch(ops.embed_kernel(table.qt), (out.shape[0], math.ceil(items / 128)), (128,),
                              (table.words, table.gs, table.sb, tokens, out))])  # fmt: skip

    def products(
        self,
        x: Any,
        prods: Sequence[backend.Product],
        norm: backend.Norm | None = None,
        rope: backend.RopeStore | None = None,
    ) -> None:
        if rope is not None and len(prods) != 3:
            raise InvalidParams(f"RoPE and the KV store follow the q, k and v products, got {len(prods)} products")
        t_count = x.shape[0]
        # vec_kernel rotates the pairs of a few tokens as it computes them; a head norm needs whole heads first
        vec_rope = rope if rope is not None and rope.q_norm is None and t_count <= gemv.VEC_MAX_TOKENS else None
        launches = []
        for group in _groups(prods, rope is not None):
            launches += _product_launches(self, x, group, norm, MODE_QKV if vec_rope else MODE_ROWS, vec_rope)
        if rope is not None and vec_rope is None:
            heads, e = rope.q.shape[1] + rope.k.shape[1], rope.q.shape[2]
            if heads > ops.ROPE_MAX_HEADS:
                raise InvalidParams(f"{heads} q and k heads exceed the CUDA RoPE kernel's {ops.ROPE_MAX_HEADS}")
            cos_t, sin_t = self._rope_table(rope, e, rope.cache_k.shape[1])
            norm = rope.q_norm is not None
            qn, kn = (rope.q_norm, rope.k_norm) if norm else (self._dummy_v, self._dummy_v)
            args = (rope.q, rope.k, rope.v, rope.cache_k, rope.cache_v, rope.slots, rope.positions, cos_t, sin_t,
                    bool(rope.neox), qn, kn, np.float32(rope.norm_eps), norm, np.float32(rope.q_scale))  # fmt: skip
            launches.append(_Launch(ops.rope_store_kernel, (t_count,), (512,), args))
        self._submit(launches)

    def gated_ffn(self, x: Any, ffn: backend.GatedFFN) -> None:
        gate, up, t_count = ffn.gate, ffn.up, x.shape[0]
        down = backend.Product(ffn.down, ffn.out, accumulate=ffn.accumulate)
        if not _many_tokens(gate.qt, t_count) and gate.qt == up.qt and gate.shape == up.shape:
            group: list[backend.Product | None] = [backend.Product(gate, ffn.act), backend.Product(up, None)]
            self._submit(_product_launches(self, x, group, ffn.norm, MODE_SWIGLU, None))  # products and SwiGLU
            self.products(ffn.act, [down])
            return
        launches = []
        for group in _groups([backend.Product(gate, ffn.act), backend.Product(up, ffn.up_out)], False):
            launches += _product_launches(self, x, group, ffn.norm, MODE_ROWS, None)
        if _many_tokens(ffn.down.qt, t_count) and formats.integer(ffn.down.qt):
            # SwiGLU in the down product's input preparation: a launch and a pass over the activations less
            self._submit(launches + _product_launches(self, ffn.act, [down], None, MODE_ROWS, None, ffn.up_out))
            return
        grid, block = _grid2(*ffn.act.shape)
        launches.append(_Launch(ops.swiglu_kernel, grid, block, (ffn.act, ffn.up_out, ffn.act), overlap=False))
        self._submit(launches)
        self.products(ffn.act, [down])

    def attention(self, q, cache_k, cache_v, slots, positions, out, one_sequence=False, scale=None) -> None:  # noqa: ANN001
        t_count, heads, e = q.shape
        # a prompt chunk: a tile of queries per block, on the tensor cores (head sizes in 16-element steps)
        tiled = one_sequence and t_count >= ops.SEQ_MIN_TOKENS and e % 16 == 0 and e <= ops.SEQ_MAX_E
        if not tiled and e > ops.ATT_MAX_E:
            raise InvalidParams(f"head size {e} exceeds the CUDA kernel's {ops.ATT_MAX_E}")
        args = (q, cache_k, cache_v, slots, positions, out)
        if tiled:
            kernel = ops.attention_seq_kernel(e, scale)
            self._submit([_Launch(kernel, (math.ceil(t_count / ops.SEQ_QT), heads), (ops.SEQ_THREADS,), args)])
        else:
            r = ops.attention_heads_per_block(t_count, heads, cache_k.shape[2], e)
            self._submit([_Launch(ops.attention_kernel(e, r, scale), (t_count, heads // r), (ops.ATT_THREADS,), args)])

    def gather_rows(self, x: Any, rows: Any, out: Any) -> None:
        grid, block = _grid2(*out.shape)
        self._submit([_Launch(ops.gather_kernel, grid, block, (x, rows, out))])

    def sample(self, logits: Any, rows: list[backend.SamplingRow]) -> np.ndarray:
        ids = self.sample_async(logits, rows).ids()
        self.synchronize()  # (idle by now unless more was queued: frees the staging buffer)
        return ids

    def sample_async(self, logits: Any, rows: list[backend.SamplingRow]) -> backend.Picks:
        r_count, vocab = logits.shape
        if r_count != len(rows):
            raise InvalidParams(f"logits of shape {logits.shape} do not match {len(rows)} sampling rows")
        if not vocab:
            raise InvalidParams("logits rows must not be empty")
        with _cuda_errors("sampling"):
            ptr = self._array_ptr(logits)
            ab = self._argmax_bufs(r_count)
            grid = (-(-vocab // sample.ARGMAX_TILE), r_count)
            if all(map(sample.is_greedy, rows)):
                # all greedy: argmax_kernel alone, reading no params, so nothing is packed or uploaded
                args = (logits, ab.dummy, ab.acc, ab.count, ab.ids, False)
                block = (sample.ARGMAX_THREADS,)
                self._replay("sample", ptr, lambda: [_Launch(sample.argmax_kernel, grid, block, args)])
                return self._picks(ab, r_count)
            width = max([len(r.history) for r in rows if r.repetition_penalty != 1.0] + [1])
            width = 1 << (width - 1).bit_length()  # few distinct shapes, few buffers
            pb = self._params_bufs(r_count, vocab, width)
            n_greedy = sample.pack_params(rows, width, pb.host)[1]  # the kernels' own test of whose rows
            some, every = n_greedy > 0, n_greedy == r_count
            self.upload(pb.host, pb.dev)  # (through the staging buffer: the host's copy is rewritten next step)

            def build() -> list[_Launch]:
                launches = [_Launch(sample.argmax_kernel, grid, (sample.ARGMAX_THREADS,),
                                    (logits, pb.dev, ab.acc, ab.count, ab.ids, True))] if some else []  # fmt: skip
                if not every:
                    launches.append(_Launch(sample.sample_kernel, (r_count,), (sample.THREADS,),
                                            (logits, pb.dev, pb.work, ab.ids)))  # fmt: skip
                return launches

            self._replay("sample", (ptr, width, some, every), build)
            return self._picks(ab, r_count)

    def feed(self, picks: backend.Picks, tokens: Any) -> None:
        addr = picks.on_device() if isinstance(picks, _DevicePicks) else None
        if addr is None:  # (the simulator's picks, or device ids a later sampling has overwritten)
            super().feed(picks, tokens)
            return
        if len(picks) > tokens.shape[0]:
            raise InvalidParams(f"{len(picks)} picks for {tokens.shape[0]} tokens")
        with _cuda_errors("passing sampled tokens on"):
            _check(cu.cuMemcpyDtoDAsync(self._array_ptr(tokens)[0], addr, 4 * len(picks), self._stream_handle))

    def _picks(self, ab: _ArgmaxBufs, r_count: int) -> backend.Picks:
        ab.samplings += 1
        if SIM:
            return backend.Picks(ab.ids.copy_to_host(stream=self._stream))
        return _DevicePicks(self, ab, r_count)

    def _pinned_ids(self, n: int) -> tuple[np.ndarray, Any]:
        """A pinned host buffer for n ids and an event, free again once their picks are read."""
        free = self._free_ids.get(n)
        if free:
            return free.pop()
        flags = cu.CUevent_flags.CU_EVENT_DISABLE_TIMING
        return cuda.pinned_array(n, np.int32), _check(cu.cuEventCreate(flags))[0]

    def _array_ptr(self, a: Any) -> tuple[int, tuple[int, ...]]:
        """_ptr(a), kept per array object (held, so that its id stays its own): the model passes
        the same logits and token arrays at every step, and numba's array interface costs microseconds."""
        seen = self._ptrs
        got = seen.get(id(a))
        if got is None or got[0] is not a:
            if len(seen) >= 64:  # arrays passed once or twice (tests): forget them
                seen.clear()
            got = seen[id(a)] = (a, _ptr(a))
        return got[1]

    def _argmax_bufs(self, r_count: int) -> _ArgmaxBufs:
        key = ("argmax", r_count)
        bufs = self._sample_bufs.get(key)
        if bufs is None:
            acc = self._to_device(np.full(r_count, sample.ARGMAX_NONE, np.int64))
            count = self.zeros((r_count,), np.int32)
            ids = self.zeros((r_count,), np.int32)
            dummy = self.zeros((1, sample.HEAD), np.int32)
            bufs = _ArgmaxBufs(acc, count, ids, dummy, address(ids))
            self._sample_bufs[key] = bufs
        return bufs

    def _params_bufs(self, r_count: int, vocab: int, width: int) -> _ParamsBufs:
        key = ("params", r_count, vocab, width)
        bufs = self._sample_bufs.get(key)
        if bufs is None:
            shape = (r_count, sample.HEAD + width)
            bufs = _ParamsBufs(self.zeros(shape, np.int32), self.zeros((r_count, vocab)), np.zeros(shape, np.int32))
            self._sample_bufs[key] = bufs
        return bufs

    # ---- steps
    def run_step(self, key: Hashable, step: Callable[[], None]) -> None:
        with _cuda_errors("running a step"):
            self._replay("step", key, lambda: self._record(step))

    def _record(self, step: Callable[[], None]) -> list[_Launch]:
        self._recording = []
        try:
            step()
            return self._recording
        finally:
            self._recording = None

    def _replay(self, kind: str, key: Hashable, build: Callable[[], list[_Launch]]) -> None:
        """Replay the graph of `kind` captured for key, or build the launches and run them; capture them the
        second time the key comes. Steps of one-off shapes (a server's steps that mix prompt chunks
        of arriving requests into the decodes) then cost their launches alone, not a capture too, and
        are lowered for few launches (self._repeats: dense.takes)."""
        graphs = self._graphs[kind]
        graph = graphs.get(key)
        if graph is not None:
            graph.launch(self._core_stream)
            return
        repeats = self._repeats = graphs.seen_before(key)  # (the simulator captures nothing, but lowers the same)
        try:
            launches = build()
        finally:
            self._repeats = False  # (ops launched outside a step run once)
        self._launch(launches)  # compiles on first use; capture needs compiled kernels
        if SIM or not repeats:
            return
        builder = self._core_stream.create_graph_builder()
        builder.begin_building()
        self._launch(launches, builder)
        builder.end_building()
        # measured on the H200: batch-1 decode 851 -> 1,096 tok/s with programmatic edges, but 256
        # streams 45.5k -> 35.8k, a 512-token prompt 55k -> 49k, 8 and 16 streams 2-3% slower; again with
        # today's many-token kernels (H100, 2026-12-07: the 8B's 64 streams -4.7%, the 0.5B's 256 -4.4%): only
        # the steps of vec_kernel products (which load weights before grid_ready) get them
        if PROGRAMMATIC and all(ln.overlap for ln in launches):
            _programmatic_edges(builder.graph_definition.handle)
        graphs.keep(key, builder.complete())

    def forget_graphs(self) -> None:
        """Drop every captured graph (tuning tools that change how steps are lowered: bench/cuda_bench.py --sweep)."""
        for graphs in self._graphs.values():
            graphs.clear()


class _Graphs:
    """The captured graphs of one kind of launch, the least recently used dropped past MAX_GRAPHS, and the keys
    run once (the last MAX_SEEN), to be captured if they come again.

    Steps and samplings keep theirs apart: a sampling's key counts its rows, which change at nearly every step
    while a burst of requests arrives, and in one shared cache they pushed the steps' graphs out; a 2,048-token
    step whose graph was gone then took the engine 80-140 ms, against 3-15 ms for the steps around it (H100, 0.5B
    shape, 256 streams over HTTP: 3 rounds of 8)."""

    def __init__(self) -> None:
        self._kept: OrderedDict[Hashable, Any] = OrderedDict()
        self._seen: OrderedDict[Hashable, None] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._kept

    def get(self, key: Hashable) -> Any:
        graph = self._kept.get(key)
        if graph is not None:
            self._kept.move_to_end(key)
        return graph

    def keep(self, key: Hashable, graph: Any) -> None:
        self._kept[key] = graph
        if len(self._kept) > MAX_GRAPHS:
            self._kept.popitem(last=False)

    def seen_before(self, key: Hashable) -> bool:
        """Whether key has come before (and is forgotten now: it is captured, or ran twice)."""
        if key in self._seen:
            del self._seen[key]
            return True
        self._seen[key] = None
        if len(self._seen) > MAX_SEEN:
            self._seen.popitem(last=False)
        return False

    def clear(self) -> None:
        self._kept.clear()
        self._seen.clear()


def _programmatic_edges(graph: Any) -> None:
    """Make the captured graph's kernel-to-kernel edges programmatic: a kernel launches once every
    block of the one before it has passed grid_ready, so its launch and its weight loads overlap that
    kernel, and its own grid_ready waits for that kernel to finish (programmatic dependent launch)."""
    n = _check(cu.cuGraphGetEdges(graph, 0))[-1]
    if not n:
        return
    src, dst, data, n = _check(cu.cuGraphGetEdges(graph, n))
    kernel = cu.CUgraphNodeType.CU_GRAPH_NODE_TYPE_KERNEL
    edges = [e for e in zip(src, dst, data, strict=True)
             if _check(cu.cuGraphNodeGetType(e[0]))[0] == kernel == _check(cu.cuGraphNodeGetType(e[1]))[0]]  # fmt: skip
    if not edges:
        return
    src, dst, data = (list(c) for c in zip(*edges, strict=True))
    _check(cu.cuGraphRemoveDependencies(graph, src, dst, data, len(edges)))
    edge = cu.CUgraphEdgeData()
    edge.from_port = cu.CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC
    edge.type = cu.CUgraphDependencyType.CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC
    _check(cu.cuGraphAddDependencies(graph, src, dst, [edge] * len(edges), len(edges)))


def _check(result: tuple[Any, ...]) -> tuple[Any, ...]:
    """Raise CudaError for a failed cuda.bindings driver call; else its results after the status."""
    if int(result[0]) != 0:
        raise CudaError(f"CUDA driver call failed: {result[0]!r}")
    return result[1:]


def _groups(prods: Sequence[backend.Product], roles: bool) -> list[list[backend.Product | None]]:
    """The launches a group of products over one input takes: products of one weight type (and the
    same `accumulate`) together, up to three a launch. With `roles` (q, k, v, which MODE_QKV tells
    apart by their place) each keeps its place 0, 1, 2 in its launch, None where absent."""
    if roles:
        types = list(dict.fromkeys(p.weight.qt for p in prods))
        return [[p if p.weight.qt == qt else None for p in prods] for qt in types]
    groups: list[list[backend.Product | None]] = []
    for p in prods:
        last = groups[-1] if groups else None
        if last and len(last) < 3 and last[0].weight.qt == p.weight.qt and last[0].accumulate == p.accumulate:
            last.append(p)
        else:
            groups.append([p])
    return groups


def _product_launches(
    be: CudaBackend,
    x: Any,
    group: list[backend.Product | None],
    norm: backend.Norm | None,
    mode: int,
    rope: backend.RopeStore | None,
    gated_by: Any = None,
) -> list[_Launch]:
    """The launches of one group of products (_groups) of x: for one or two tokens vec_kernel; for more the
    input prepared once and the tensor-core product (quantized weights), or for float weights rows_kernel
    (a few tokens) or the tiled GEMM (_many_tokens). Each normalizes its input itself where `norm` says.
    `gated_by` (the up product's output; many tokens of an integer type only): the input is SwiGLU of x and
    it, which the input's preparation computes and writes back to x."""
    present = [p for p in group if p is not None]
    qt, k = present[0].weight.qt, present[0].weight.shape[1]
    flags = ACCUMULATE if present[0].accumulate else 0
    mats, ns = [], []
    for i, p in enumerate(group + [None] * (3 - len(group))):
        if p is None:
            mats.append(be._dummy_mat(qt))
            ns.append(0)
            continue
        if p.bias is not None:
            flags |= BIAS[i]
        w = p.weight
        out = be._dummy_f if p.out is None else p.out
        mats.append((w.words, w.gs, w.sb, out, be._dummy_v if p.bias is None else p.bias))
        ns.append(w.shape[0])
    m0, m1, m2 = mats
    t_count = x.shape[0]
    nw, eps, hout = (be._dummy_v, np.float32(0.0), be._dummy_f) if norm is None else \
        (norm.weight, np.float32(norm.eps), norm.out)  # fmt: skip
    if _many_tokens(qt, t_count):
        return _many_launches(be, x, qt, flags, mats, ns, norm is not None, nw, eps, hout, gated_by)
    if norm is not None:
        flags |= NORM
    if t_count <= gemv.VEC_MAX_TOKENS:
        rope_args, hd, neox = be._no_rope, 0, False
        units = sum(ns)
        if mode == MODE_QKV:
            hd, neox = rope.q.shape[2], bool(rope.neox)
            cos_t, sin_t = be._rope_table(rope, hd, rope.cache_k.shape[1])
            rope_args = (rope.cache_k, rope.cache_v, rope.slots, rope.positions, cos_t, sin_t, np.float32(rope.q_scale))
            units //= 2
        elif mode == MODE_SWIGLU:
            units = ns[0]
        warps = gemv.block_warps(k, min(units, gemv.VEC_WARPS))
        kernel = gemv.vec_kernel(qt, k, mode, flags, tuple(ns), hd, neox, warps)
        grid = (math.ceil(min(units, gemv.VEC_WARPS) / warps), t_count)
        return [_Launch(kernel, grid, (32 * warps,), (x, m0, m1, m2, nw, eps, hout, rope_args))]
    units = ns[0] if mode == MODE_SWIGLU else sum(ns)
    grid_y = math.ceil(t_count / rows.TB)
    grid = (min(math.ceil(units / rows.WARPS), max(1, rows.ROW_BLOCKS // grid_y)), grid_y)
    args = (x, m0, m1, m2, *ns, nw, eps, hout)
    return [_Launch(rows.rows_kernel(qt, mode, flags), grid, (rows.BLOCK,), args, overlap=False)]


def _dense_launches(be: CudaBackend, inputs: tuple[Any, Any], qt: int, flags: int, mats: list[tuple[Any, ...]],
                    ns: list[int]) -> list[_Launch]:  # fmt: skip
    """A large step's products through cuBLAS (dense.py): the launch's matrices as one of their rows one after
    another, a chunk of those rows at a time: the rows converted to float16, the GEMM, the stores.
    inputs: prep_f16_kernel's float16 words and token scales."""
    xh, xs = inputs
    t_count, words = xh.shape
    chunk, total = dense.chunk_rows(t_count, 2 * words), sum(ns)
    weights = [a for m in mats for a in m[:3]]
    outs = [a for m in mats for a in m[3:]]
    n0, n1 = ns[0], ns[1]
    launches = []
    for g0 in range(0, total, chunk):
        rows = min(chunk, total - g0)
        # (a chunk's most from the start: grown by the warm-up's steps, it dropped their graphs at each size)
        wh = be._scratch("dense_w", (rows, words), np.uint32, dense.CHUNK_BYTES // 4)
        acc = be._scratch("dense_acc", (t_count, rows), np.float32, dense.CHUNK_BYTES // 4)
        launches += [_Launch(dense.dequant_kernel(qt), (-(-rows * words // 4 // dense.THREADS),), (dense.THREADS,),
                             (*weights, n0, n1, g0, wh)),
                     _Launch(be._gemm, (), (), (xh, wh, acc)),
                     _Launch(dense.finish_kernel, (-(-rows // dense.THREADS), t_count), (dense.THREADS,),
                             (acc, xs, *outs, n0, n1, g0, flags))]  # fmt: skip
    return launches


def _many_tokens(qt: int, t_count: int) -> bool:
    """Whether a product of t_count tokens takes the many-token kernels: the tensor cores for the integer
    types from three tokens on (measured on the H100, Llama-3.1-8B shape, 16 tokens: the few-token kernel,
    which decodes the weights to floats, took 354 ms a step), the tiled GEMM for float weights from
    GEMM_MIN_TOKENS."""
    return t_count >= GEMM_MIN_TOKENS or (formats.integer(qt) and t_count > gemv.VEC_MAX_TOKENS)


def _many_launches(be: CudaBackend, x: Any, qt: int, flags: int, mats: list[tuple[Any, ...]], ns: list[int],
                   norm: bool, nw: Any, eps: np.float32, hout: Any, gated_by: Any = None) -> list[_Launch]:  # fmt: skip
    """Many tokens: the input normalized (or gated) and rounded once by a launch of its own, then the product."""
    t_count, k = x.shape
    m0, m1, m2 = mats
    gated = gated_by is not None
    if gated:
        if not formats.integer(qt):
            raise InvalidParams(f"a gated input takes an integer weight type's preparation, not type {qt}'s")
        hout = x  # (the activation written back, as swiglu_kernel leaves it)
    prep_args = (x, gated_by if gated else x, norm, nw, eps, hout)
    if formats.integer(qt):
        row_tiles = mma.row_tiles(*ns)
        large = dense.takes(t_count, be._repeats)  # (cuBLAS: dense.py)
        if large or hmma.takes(t_count, sum(ns), k):  # float16 inputs and weights (hmma.py)
            key = ("f16", _ptr(x), qt)
            if key not in be._act_bufs:
                be._act_bufs[key] = (be.zeros((t_count, k // 2), np.uint32), be.zeros((t_count,)))
            inputs = be._act_bufs[key]
            per = -(-(k // 8) // mma.PREP_THREADS)  # items a thread
            prep = _Launch(hmma.prep_f16_kernel(qt, gated, per), (t_count,), (mma.PREP_THREADS,), (*prep_args, *inputs))
            if not large:
                nj, split = hmma.plan(t_count, row_tiles, k, qt, be.sms)
                kernel = hmma.hmma_kernel(qt, nj, mma.wide_rows(qt, k))
        else:  # Q8 inputs and int8 weights (mma.py)
            key = ("q8", _ptr(x), qt)
            if key not in be._act_bufs:
                be._act_bufs[key] = (be.zeros((t_count, k // 4), np.int32), be.zeros((t_count, k // 32)),
                                     be.zeros((t_count, k // 32)))  # fmt: skip
            inputs = be._act_bufs[key]
            prep = _Launch(mma.prep_q8_kernel(qt, gated), (t_count,), (mma.PREP_THREADS,), (*prep_args, *inputs))
            nj, split = mma.plan(t_count, row_tiles, k, qt, be.sms)
            kernel = mma.mma_kernel(qt, nj, mma.wide_rows(qt, k))
        if large:
            launches = [prep, *_dense_launches(be, inputs, qt, flags, mats, ns)]
        else:
            tiles = (math.ceil(t_count / (8 * nj)), row_tiles)
            part, count = be._split_buffers(split, t_count, sum(ns), tiles[0] * tiles[1])
            args = (*inputs, m0, m1, m2, *ns, flags, part, count)
            launches = [prep, _Launch(kernel, (*tiles, split), (mma.THREADS,), args)]
    else:
        launches = []
        x_in = x
        rnd = formats.rounding(qt)
        if norm or rnd == formats.ROUND_F16:
            key = ("prep", _ptr(x))
            if key not in be._act_bufs:
                be._act_bufs[key] = be.zeros((t_count, k))
            x_in = be._act_bufs[key]
            launches.append(_Launch(gemm.prep_kernel(rnd), (t_count,), (gemm.PREP_THREADS,),
                                    (x, norm, nw, eps, hout, x_in)))  # fmt: skip
        tiles = (math.ceil(sum(ns) / gemm.BM), math.ceil(t_count / gemm.BN))
        split = gemm.split_of(tiles[0] * tiles[1], k)
        part, count = be._split_buffers(split, t_count, sum(ns), tiles[0] * tiles[1])
        args = (x_in, m0, m1, m2, *ns, part, count)
        launches.append(_Launch(gemm.gemm_kernel(qt, flags), (*tiles, split), (gemm.THREADS,), args))
    for ln in launches:
        ln.overlap = False
    return launches
