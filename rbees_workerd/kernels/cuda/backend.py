"""CudaBackend: the Backend interface on one NVIDIA GPU through Numba CUDA kernels.

Ops queue kernel launches on one stream. Inside `run_step` they are recorded
instead, fused where the pattern allows (q/k/v sharing an input, gate/up with
SwiGLU, a projection followed by the residual add, RMSNorm into the product
after it, and for one or two tokens q/k/v with RoPE and the KV store), launched once (which also
compiles them) and captured into a CUDA graph through cuda.core's graph
builder; later steps of the same key replay the graph, a few microseconds of
host time for the whole forward instead of one launch per op. In the graphs of decode
steps each kernel launches while the one before it runs (_programmatic_edges).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as Q
from numba import cuda
from numba.cuda.cudadrv import driver

from rbees_workerd.errors import CudaError, InvalidParams, VramOOM
from rbees_workerd.kernels import backend
from rbees_workerd.kernels.cuda import matmul as mm
from rbees_workerd.kernels.cuda import ops, repack, sample
from rbees_workerd.kernels.cuda.device import SIM

if not SIM:
    from cuda.bindings import driver as cu

# The small grids are deliberate (a decode step's kernels are graph nodes that overlap one another), and
# numba-cuda would warn of each one at its first launch, in every worker's log.
warnings.filterwarnings("ignore", message=r"(\x1b\[1m)?Grid size \d+ will likely result in GPU under-utilization")

MAX_GRAPHS = 64  # captured step shapes kept (least recently used dropped)
PROGRAMMATIC = True  # graphs' kernels launch while the one before runs (see _programmatic_edges)
_STAGING = 1 << 20  # pinned bytes through which small uploads go asynchronously
_OOM = 2  # CUDA_ERROR_OUT_OF_MEMORY
# llama.cpp rounds the activations of these weight types (see kernels/cpu/quant_act); the CPU backend too
_Q8_0_INPUT = frozenset({int(Q.Q4_0), int(Q.Q5_0), int(Q.Q8_0)})
_Q8_1_INPUT = frozenset({int(Q.Q4_1), int(Q.Q5_1)})
_F16_INPUT = frozenset({int(Q.F16)})
# the simulator's driver module defines only some of these
_DRIVER_ERRORS = tuple(getattr(driver, n) for n in ("CudaAPIError", "CudaDriverError", "CudaSupportError")
                       if hasattr(driver, n))  # fmt: skip


@dataclass
class QWeight:
    """A quantized [N, K] matrix in VRAM (see repack for the layout)."""

    qtype: int
    fmt: int
    off: np.float32
    words: Any
    d: Any
    m: Any
    shape: tuple[int, int]


@dataclass
class _MatMul:
    x: Any
    ws: list[QWeight]
    outs: list[Any]
    biases: list[Any]
    mode: int = mm.MODE_ROWS
    res: Any = None
    norm: tuple[Any, Any, float] | None = None  # (x, weight, eps): the input is rmsnorm(x), written to self.x
    rope: tuple[Any, ...] | None = None  # MODE_QKV: rope_store_kernel's arguments, which this product does


@dataclass
class _Launch:
    kernel: Any
    grid: tuple[int, ...]
    block: tuple[int, ...]
    args: tuple[Any, ...]
    overlap: bool = True  # False: a product of more than VEC_MAX_TOKENS tokens (see _replay)


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
    if SIM:  # the simulator's arrays wrap a NumPy array and lack the CUDA interface
        return a._ary.__array_interface__["data"][0], tuple(a.shape)
    return a.__cuda_array_interface__["data"][0], tuple(a.shape)


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

    def __init__(self, gpu: int = 0) -> None:
        with _cuda_errors(f"opening GPU {gpu}"):
            if not SIM and not cuda.is_available():
                raise CudaError("no usable CUDA GPU (driver or device missing)")
            if gpu < 0 or gpu >= len(cuda.gpus):
                raise InvalidParams(f"GPU {gpu} does not exist ({len(cuda.gpus)} visible)")
            cuda.select_device(gpu)
            name = getattr(cuda.get_current_device(), "name", "simulator")
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
        self._graphs: OrderedDict[Hashable, Any] = OrderedDict()
        self._sample_bufs: dict[tuple[Any, ...], Any] = {}
        self._ptrs: dict[int, tuple[Any, tuple[int, tuple[int, ...]]]] = {}  # see _array_ptr
        self._free_ids: dict[int, list[tuple[np.ndarray, Any]]] = {}  # see _pinned_ids
        self._act_bufs: dict[tuple[Any, ...], tuple[Any, Any]] = {}
        self._dummy_w = self._to_device(np.zeros((1, 1), np.uint32))
        self._dummy_f = self._to_device(np.zeros((1, 1), np.float32))
        self._dummy_v = self._to_device(np.zeros(1, np.float32))
        self._dummy_part = self._to_device(np.zeros((1, 1, 1), np.float32))
        self._dummy_count = self._to_device(np.zeros(1, np.int32))
        dummy_c = self._to_device(np.zeros((1, 1, 1, 1), np.float32))
        self._no_rope = (dummy_c, dummy_c, self._dummy_count, self._dummy_count, self._dummy_f, self._dummy_f)
        self._rope_tables: dict[tuple[float, int, int], tuple[Any, Any]] = {}

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
        p = repack.pack(qtype, shape, raw)
        return QWeight(int(qtype), p.fmt, np.float32(p.off), self._to_device(p.words), self._to_device(p.d),
                       self._to_device(p.m), tuple(shape))  # fmt: skip

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
            _check(cu.cuMemcpyHtoDAsync(_ptr(out)[0], stage.ctypes.data, n, self._stream_handle))

    def download(self, a: Any) -> np.ndarray:
        with _cuda_errors("copying from the GPU"):
            if SIM or not a.is_c_contiguous():
                h = a.copy_to_host(stream=self._stream)
            else:
                h = np.empty(a.shape, a.dtype)
                _check(cu.cuMemcpyDtoHAsync(h.ctypes.data, _ptr(a)[0], h.nbytes, self._stream_handle))
            self.synchronize()
        return h

    def _rope_table(self, theta: float, head: int, context: int) -> tuple[Any, Any]:
        """cos/sin[position, pair] of RoPE's angles, float32 of the float64 values the CPU computes."""
        key = (theta, head, context)
        if key not in self._rope_tables:
            freq = np.arange(context)[:, None] * theta ** (-2.0 * np.arange(head // 2) / head)
            self._rope_tables[key] = (self.vector(np.cos(freq)), self.vector(np.sin(freq)))
        return self._rope_tables[key]

    def _split_buffers(self, split: int, tokens: int, rows: int, tiles: int) -> tuple[Any, Any]:
        """The partial sums and tile counters of a GEMM split over K (dummies when not split).

        One pair per shape: the launches of a step run one after another, and each leaves its
        counters at zero."""
        if split == 1:
            return self._dummy_part, self._dummy_count
        key = ("split", split, tokens, rows, tiles)
        if key not in self._act_bufs:
            self._act_bufs[key] = (self.zeros((split, tokens, rows)), self.zeros((tiles,), np.int32))
        return self._act_bufs[key]

    def memory_bytes(self) -> int:
        return self._bytes

    def synchronize(self) -> None:
        with _cuda_errors("synchronizing"):
            self._stream.synchronize()
        self._staged = 0

    # ---- ops
    def _submit(self, op: Any) -> None:
        if self._recording is not None:
            self._recording.append(op)
        else:
            with _cuda_errors("launching a kernel"):
                self._launch(_lower([op], self))

    def _launch(self, launches: list[_Launch], target: Any = None) -> None:
        target = self._stream if target is None else target
        for ln in launches:
            ln.kernel[ln.grid, ln.block, target](*ln.args)

    def embed(self, table: QWeight, tokens: Any, out: Any) -> None:
        items = table.shape[1] // 8
        self._submit(_Launch(mm.embed_kernel, (out.shape[0], math.ceil(items / 128)), (128,),
                             (table.words, table.d, table.m, table.fmt, table.off, tokens, out)))  # fmt: skip

    def matmul(self, x: Any, w: QWeight, out: Any, bias: Any | None = None) -> None:
        self._submit(_MatMul(x, [w], [out], [bias]))

    def rmsnorm(self, x: Any, weight: Any, eps: float, out: Any) -> None:
        args = (x, weight, np.float32(eps), out)
        self._submit(
            ("rmsnorm", x, weight, eps, out, _Launch(ops.rmsnorm_kernel, (x.shape[0],), (ops.NORM_THREADS,), args))
        )

    def rope(self, x: Any, positions: Any, theta: float, neox: bool) -> None:
        n = x.shape[0] * x.shape[1] * (x.shape[2] // 2)
        args = (x, positions, float(theta), bool(neox))
        self._submit(("rope", x, positions, float(theta), bool(neox),
                      _Launch(ops.rope_kernel, (math.ceil(n / 128),), (128,), args)))  # fmt: skip

    def attention(self, q, k, v, cache_k, cache_v, slots, positions, out, one_sequence=False) -> None:  # noqa: ANN001
        t_count, heads, e = q.shape
        tiled = one_sequence and t_count >= ops.SEQ_MIN_TOKENS  # a prompt chunk: a tile of queries per block
        if tiled and (e > ops.SEQ_MAX_E or e % 8):
            raise InvalidParams(f"head size {e} is not a multiple of 8 up to {ops.SEQ_MAX_E} (the tiled CUDA kernel)")
        if not tiled and e > ops.ATT_MAX_E:
            raise InvalidParams(f"head size {e} exceeds the CUDA kernel's {ops.ATT_MAX_E}")
        n = k.shape[0] * k.shape[1] * k.shape[2]
        store = (k, v, cache_k, cache_v, slots, positions)
        self._submit(("kvstore", *store, _Launch(ops.kv_store_kernel, (math.ceil(n / 128),), (128,), store)))
        args = (q, cache_k, cache_v, slots, positions, out)
        if tiled:
            kernel = ops.attention_seq_kernel(e)
            grid = (math.ceil(t_count / ops.SEQ_QT), heads)
            self._submit(_Launch(kernel, grid, (ops.SEQ_THREADS,), args))
        else:
            r = ops.attention_heads_per_block(t_count, heads, cache_k.shape[2], e)
            self._submit(_Launch(ops.attention_kernel(e, r), (t_count, heads // r), (ops.ATT_THREADS,), args))

    def swiglu(self, gate: Any, up: Any, out: Any) -> None:
        grid, block = _grid2(*gate.shape)
        self._submit(("swiglu", gate, up, out, _Launch(ops.swiglu_kernel, grid, block, (gate, up, out))))

    def add(self, x: Any, y: Any) -> None:
        grid, block = _grid2(*x.shape)
        self._submit(("add", x, y, _Launch(ops.add_kernel, grid, block, (x, y))))

    def gather_rows(self, x: Any, rows: Any, out: Any) -> None:
        grid, block = _grid2(*out.shape)
        self._submit(_Launch(ops.gather_kernel, grid, block, (x, rows, out)))

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
                self._replay(("sample", ptr), lambda: [_Launch(sample.argmax_kernel, grid, block, args)])
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

            self._replay(("sample", ptr, width, some, every), build)
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
            bufs = _ArgmaxBufs(acc, count, ids, dummy, _ptr(ids)[0])
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
            self._replay(("step", key), lambda: self._record(step))

    def _record(self, step: Callable[[], None]) -> list[_Launch]:
        self._recording = []
        try:
            step()
            return _lower(self._recording, self)
        finally:
            self._recording = None

    def _replay(self, key: Hashable, build: Callable[[], list[_Launch]]) -> None:
        """Replay the graph captured for key, or build the launches, run them and capture them."""
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            graph.launch(self._core_stream)
            return
        launches = build()
        self._launch(launches)  # compiles on first use; capture needs compiled kernels
        if SIM:
            return
        builder = self._core_stream.create_graph_builder()
        builder.begin_building()
        self._launch(launches, builder)
        builder.end_building()
        # measured on the H200: batch-1 decode 851 -> 1,096 tok/s with programmatic edges, but 256
        # streams 45.5k -> 35.8k, a 512-token prompt 55k -> 49k, 8 and 16 streams 2-3% slower: only
        # the steps of vec_kernel products (which load weights before grid_ready) get them
        if PROGRAMMATIC and all(ln.overlap for ln in launches):
            _programmatic_edges(builder.graph_definition.handle)
        self._graphs[key] = builder.complete()
        if len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)


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


def _same(a: Any, b: Any) -> bool:
    return a is not None and b is not None and _ptr(a) == _ptr(b)


def _fusable(a: _MatMul, b: _MatMul) -> bool:
    """Two single products over the same input and format, neither writing that input."""
    wa, wb = a.ws[0], b.ws[0]
    return (len(a.ws) == len(b.ws) == 1 and a.res is None and b.res is None and _same(a.x, b.x)
            and wa.fmt == wb.fmt and wa.off == wb.off and wa.shape[1] == wb.shape[1]
            and _rounding(wa.qtype) == _rounding(wb.qtype)
            and not _same(a.outs[0], a.x) and not _same(b.outs[0], b.x))  # fmt: skip


def _fuse(ops_in: list[Any]) -> list[Any]:
    """Merge recorded ops: gate/up + SwiGLU, up to three products sharing an input, product + residual add."""
    out: list[Any] = []
    i = 0
    while i < len(ops_in):
        op = ops_in[i]
        fused = _rope_store(ops_in[i : i + 3])
        if fused is not None:
            out.append(fused)
            i += 3
            continue
        if isinstance(op, _MatMul) and i + 2 < len(ops_in) and isinstance(ops_in[i + 1], _MatMul):
            nxt, sw = ops_in[i + 1], ops_in[i + 2]
            if (isinstance(sw, tuple) and sw[0] == "swiglu" and _fusable(op, nxt)
                    and op.ws[0].shape == nxt.ws[0].shape
                    and _same(sw[1], op.outs[0]) and _same(sw[2], nxt.outs[0])):  # fmt: skip
                out.append(_MatMul(op.x, op.ws + nxt.ws, op.outs + nxt.outs + [sw[3]], op.biases + nxt.biases,
                                   mm.MODE_SWIGLU))  # fmt: skip
                i += 3
                continue
        if isinstance(op, _MatMul) and out and isinstance(out[-1], _MatMul) and out[-1].mode == mm.MODE_ROWS:
            prev = out[-1]
            first = _MatMul(prev.x, prev.ws[:1], prev.outs[:1], prev.biases[:1])
            if (len(prev.ws) < 3 and prev.res is None and _fusable(first, op)
                    and not any(_same(o, op.x) for o in prev.outs)):  # fmt: skip
                prev.ws.append(op.ws[0])
                prev.outs.append(op.outs[0])
                prev.biases.append(op.biases[0])
                i += 1
                continue
        if isinstance(op, tuple) and op[0] == "add" and out and isinstance(out[-1], _MatMul):
            prev = out[-1]
            if (prev.mode == mm.MODE_ROWS and len(prev.ws) == 1 and prev.res is None
                    and _same(prev.outs[0], op[2]) and not _same(prev.x, op[1])):  # fmt: skip
                prev.res = op[1]
                i += 1
                continue
        out.append(op)
        i += 1
    return _fuse_qkv_rope(_fuse_norms(out))


def _fuse_norms(seq: list[Any]) -> list[Any]:
    """rmsnorm then a product of its output: the few-token product normalizes its input itself,
    and for many tokens the rounding kernel does (where the weight type rounds the input)."""
    out: list[Any] = []
    for op in seq:
        prev = out[-1] if out else None
        fits = isinstance(op, _MatMul) and (op.x.shape[0] < mm.GEMM_MIN_TOKENS
                                            or _rounding(op.ws[0].qtype) != mm.ROUND_NONE)  # fmt: skip
        if (fits and isinstance(prev, tuple) and prev[0] == "rmsnorm"
                and _same(prev[4], op.x) and not _same(prev[1], prev[4])
                and not any(_same(o, prev[1]) for o in [*op.outs, op.res])):  # fmt: skip
            out[-1] = op
            op.norm = (prev[1], prev[2], prev[3])
            continue
        out.append(op)
    return out


def _rope_store(seq: list[Any]) -> _Launch | None:
    """rope(q), rope(k), then storing that k: one launch, or None where the ops differ."""
    if len(seq) < 3 or not all(isinstance(o, tuple) for o in seq):
        return None
    rq, rk, st = seq
    if not (rq[0] == rk[0] == "rope" and st[0] == "kvstore"):
        return None
    if not (_same(rk[1], st[1]) and _same(rq[2], rk[2]) and _same(rk[2], st[6]) and rq[3:5] == rk[3:5]):
        return None
    q, k, v, cache_k, cache_v, slots, positions = rq[1], *st[1:7]
    if _same(q, k) or q.shape[0] != k.shape[0]:
        return None
    args = (q, k, v, cache_k, cache_v, slots, positions, rq[3], rq[4])
    return _Launch(ops.rope_store_kernel, (q.shape[0],), (512,), args)


def _fuse_qkv_rope(seq: list[Any]) -> list[Any]:
    """The q/k/v product of one or two tokens followed by the RoPE + KV store launch: the product
    rotates and stores its pairs of rows itself (MODE_QKV), one launch fewer per layer."""
    out: list[Any] = []
    for op in seq:
        prev = out[-1] if out else None
        if (isinstance(op, _Launch) and op.kernel is ops.rope_store_kernel and isinstance(prev, _MatMul)
                and prev.mode == mm.MODE_ROWS and len(prev.ws) == 3 and prev.res is None
                and prev.x.shape[0] <= mm.VEC_MAX_TOKENS):  # fmt: skip
            q, k, v = op.args[:3]
            if all(_addr(o) == _addr(a) and o.size == a.size for o, a in zip(prev.outs, (q, k, v), strict=True)):
                prev.mode = mm.MODE_QKV
                prev.rope = op.args
                continue
        out.append(op)
    return out


def _addr(a: Any) -> int:
    return _ptr(a)[0]


def _lower(recorded: list[Any], be: CudaBackend) -> list[_Launch]:
    """Fuse the recorded ops and turn them into kernel launches."""
    launches = []
    for op in _fuse(recorded):
        if isinstance(op, _Launch):
            launches.append(op)
        elif isinstance(op, tuple):
            launches.append(op[-1])
        else:
            launches += _matmul_launches(op, be)
    return launches


def _rounding(qtype: int) -> int:
    """How llama.cpp rounds the activations that multiply this weight type (the CPU backend too)."""
    if qtype in _Q8_0_INPUT:
        return mm.ROUND_Q8_0
    if qtype in _Q8_1_INPUT:
        return mm.ROUND_Q8_1
    return mm.ROUND_F16 if qtype in _F16_INPUT else mm.ROUND_NONE


def _prepared_input(op: _MatMul, rnd: int, be: CudaBackend) -> tuple[list[_Launch], Any, Any]:
    """For many tokens: the launch rounding (and normalizing) the input once, the rounded input, its sums."""
    key = _ptr(op.x)
    if key not in be._act_bufs:
        t, k = op.x.shape
        be._act_bufs[key] = (be.zeros((t, k)), be.zeros((t, k // 32)))
    xq, msum = be._act_bufs[key]
    args = (*_norm_input(op, be), op.x, xq, msum)
    return [_Launch(mm.prep_kernel(rnd), (op.x.shape[0],), (mm.BLOCK,), args)], xq, msum


def _norm_input(op: _MatMul, be: CudaBackend) -> tuple[Any, bool, Any, np.float32]:
    """What a rounding kernel reads: (x, whether to normalize it, the norm's weight, eps); x is the
    norm's input where the product took the RMSNorm before it in (_fuse_norms)."""
    if op.norm is None:
        return op.x, False, be._dummy_v, np.float32(0.0)
    return op.norm[0], True, op.norm[1], np.float32(op.norm[2])


def _q8_input(op: _MatMul, rnd: int, fmt: int, be: CudaBackend) -> tuple[_Launch, tuple[Any, Any, Any]]:
    """For many tokens and integer products: the launch rounding (and normalizing) the input once to Q8
    in the item order of weight format fmt, and the staged input (words, scales, sum terms)."""
    key = ("q8", _ptr(op.x), fmt)
    t, k = op.x.shape
    if key not in be._act_bufs:
        be._act_bufs[key] = (be.zeros((t, k // 4), np.int32), be.zeros((t, k // 32)), be.zeros((t, k // 32)))
    staged = be._act_bufs[key]
    return _Launch(mm.prep_q8_kernel(fmt, rnd), (t,), (mm.BLOCK,), (*_norm_input(op, be), op.x, *staged)), staged


def _matmul_launches(op: _MatMul, be: CudaBackend) -> list[_Launch]:
    """vec_kernel for one or two tokens, the warp-per-row kernel for a few, for many the tensor-core
    product (weights of the integer types) or the tiled GEMM (the others), then SwiGLU apart."""
    t_count = op.x.shape[0]
    many = t_count >= mm.GEMM_MIN_TOKENS
    w0 = op.ws[0]
    rnd = _rounding(w0.qtype)
    integer = many and rnd in (mm.ROUND_Q8_0, mm.ROUND_Q8_1)  # (weights in NIB4, NIB5 or Q8, as for vec_kernel)
    launches: list[_Launch] = []
    x_in, msum, flags = op.x, be._dummy_f, 0
    if integer:
        prep, staged = _q8_input(op, rnd, w0.fmt, be)
        launches = [prep]
    elif many and rnd != mm.ROUND_NONE:
        launches, x_in, msum = _prepared_input(op, rnd, be)
        if rnd == mm.ROUND_Q8_1:
            flags |= 32
    sets = []
    for i in range(3):
        if i < len(op.ws):
            w = op.ws[i]
            bias = op.biases[i]
            if bias is not None:
                flags |= 1 << i
            sets += [w.words, w.d, w.m, op.outs[i], be._dummy_v if bias is None else bias]
        else:
            out = op.outs[i] if i < len(op.outs) and not many else be._dummy_f
            sets += [be._dummy_w, be._dummy_f, be._dummy_f, out, be._dummy_v]
    ns = [w.shape[0] for w in op.ws] + [0] * (3 - len(op.ws))
    if op.res is not None:
        flags |= 8
    res = be._dummy_f if op.res is None else op.res
    if integer:
        grid = (mm.mma_row_tiles(*ns), math.ceil(t_count / mm.MMA_BN))
        args = (*staged, *sets, *ns, w0.off, flags, res)
        launches.append(_Launch(mm.mma_kernel(w0.fmt, rnd), grid, (mm.MMA_THREADS,), args))
    elif many:
        tiles = (math.ceil(sum(ns) / mm.BM), math.ceil(t_count / mm.BN))
        groups = op.x.shape[1] // 32
        split = max(1, min(math.ceil(mm.GEMM_BLOCKS / (tiles[0] * tiles[1])), groups // mm.GEMM_SPLIT_GROUPS))
        part, count = be._split_buffers(split, t_count, sum(ns), tiles[0] * tiles[1])
        args = (x_in, *sets, *ns, w0.off, flags, res, msum, part, count)
        launches.append(_Launch(mm.gemm_kernel(w0.fmt), (*tiles, split), (mm.GEMM_THREADS,), args))
    if many:
        if op.mode == mm.MODE_SWIGLU:
            gate, up, out = op.outs
            grid2, block2 = _grid2(*gate.shape)
            launches.append(_Launch(ops.swiglu_kernel, grid2, block2, (gate, up, out)))
        for ln in launches:
            ln.overlap = False
        return launches
    rows = ns[0] if op.mode == mm.MODE_SWIGLU else sum(ns)
    x, nw, eps, hout = x_in, be._dummy_v, np.float32(0.0), be._dummy_f
    if op.norm is not None:
        x, nw, eps, hout = op.norm[0], op.norm[1], np.float32(op.norm[2]), op.x
        flags |= 16
    if t_count <= mm.VEC_MAX_TOKENS:
        rope, hd, neox = be._no_rope, 0, False
        if op.mode == mm.MODE_QKV:
            q, k, v, cache_k, cache_v, slots, positions, theta, neox = op.rope
            hd = q.shape[2]
            cos_t, sin_t = be._rope_table(theta, hd, cache_k.shape[1])
            rope, rows = (cache_k, cache_v, slots, positions, cos_t, sin_t), rows // 2
        kernel = mm.vec_kernel(w0.fmt, rnd, x.shape[1], op.mode, flags, tuple(ns), hd, bool(neox))
        grid = (math.ceil(min(rows, mm.VEC_WARPS) / mm.WARPS), t_count)
        return [_Launch(kernel, grid, (mm.BLOCK,), (x, *sets, w0.off, res, nw, eps, hout, rope))]
    args = (x, *sets, *ns, w0.off, op.mode, flags, res, nw, eps, hout, msum)
    grid_y = math.ceil(t_count / mm.TB)
    grid = (min(math.ceil(rows / mm.WARPS), max(1, mm.ROW_BLOCKS // grid_y)), grid_y)
    return [_Launch(mm.rows_kernel(w0.fmt, rnd), grid, (mm.BLOCK,), args, overlap=False)]
