"""Robustness evaluation sharded over a Dask cluster, bit for bit equal to one process.

``evaluate(model, data, "pgd", {"eps": 0.3, "random_start": True, "restarts": 5},
client="local:4", out="runs/pgd")`` cuts the images into chunks of ``chunk`` consecutive
images, ships the model to every worker once (``Client.scatter(..., broadcast=True)``),
has each worker read its own chunks (``data`` names where the images are: only the workers
read them), runs ``advkern.attacks.run_attack`` on each chunk on the worker's backend
(``backend="auto"`` resolves on the worker, so a GPU worker picks its GPU backend), and
gathers one :class:`~advkern.attacks.AttackRun`.

Why the result equals ``run_attack`` on all images in one process, bit for bit: every
attack's result on an image depends only on that image and on that image's own random
stream, which ``run_attack`` derives from (seed, image index) (``_validate.per_sample_rngs``);
a chunk starting at image a is attacked with the per-image seeds [seed, a], [seed, a + 1], ...
(the same streams); and the metrics are recomputed over the whole set from the gathered
per-image records (``attacks.metrics_from_info``), never averaged over chunks. The tests hold
it to that on a LocalCluster for PGD (random start, restarts), JSMA and DE. (With workers on
different backends, images differ up to the documented tolerances between backends:
``run.params['backend']`` then lists every backend that ran.)

Nothing is lost: with ``out=DIR`` a ``manifest.json`` (attack, parameters, seed, backend
asked for, data, chunking, and the SHA-256 of the model) is written first, and each chunk, as
soon as it is gathered, to ``DIR/chunk-00000.npz`` (x_adv, y, the per-image info, and what
ran), atomically (a temporary file renamed). A rerun with ``resume=True`` attacks only the
chunks that have no file; a folder holding a different run (another model, attack,
parameter, seed, data or chunk size) is an :class:`~advkern.errors.AdvkernError`, never a
mix. A worker that dies while it attacks a chunk (killed, out of memory) is replaced and
the chunk re-run by the scheduler (``distributed.scheduler.allowed-failures``, 3 by
default); an exception inside a chunk is retried ``retries`` times (``Client.submit(...,
retries=)``); either way the chunk's result is the same, because it is a pure function of
its images and seeds.

Each chunk is one task that depends only on the model (on every worker), so the scheduler
hands chunks to whichever worker is free: a slow worker takes fewer, a lost one's go to the
others. Sweeps (:func:`sweep`: several attacks / parameter sets, e.g. eps) ship the model
once, and each worker keeps the chunks of images it has read (up to
``ADVKERN_CHUNK_CACHE_BYTES``, 1 GiB) for the later runs.

Dask is optional: ``pip install "advkern[dask]"``. Importing this module never needs it;
the functions that do raise an AdvkernError naming the install command.
"""

import gzip
import hashlib
import json
import math
import os
import sys
import threading
import time
import uuid
import zipfile
from concurrent.futures import CancelledError

import numpy as np

from ._validate import check_int, check_model
from .errors import AdvkernError

try:  # only the pinning plugin's base class; everything else imports dask when used
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover - exercised where dask is not installed
    _WorkerPlugin = object

__all__ = ["evaluate", "sweep", "open_data", "DataSource", "local_cluster", "model_digest",
           "read_out", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 250          # images per chunk (run_attack's own chunk for PGD); fixed, so a
                             # resumed run on another cluster size has the same chunks
MANIFEST = "manifest.json"
FORMAT = "advkern.distributed/1"
# Parameters that may hold one value per image: sliced with the images.
_PER_IMAGE_PARAMS = ("target", "eps", "alpha")


def _dask():
    """The ``distributed`` module, or an AdvkernError with the install command."""
    try:
        import distributed
    except ImportError:
        raise AdvkernError('advkern.distributed needs Dask: pip install "advkern[dask]" '
                           '(or pip install "dask[distributed]")') from None
    return distributed


# ----------------------------------------------------------------------------- data


class DataSource:
    """Where the images are, and how a worker reads images [a, b) of them.

    Cheap to pickle: it holds names, not images (except ``kind='array'``, whose chunks are
    sent with the tasks). Built by :func:`open_data`; attributes: ``kind`` ('split', 'npz',
    'npy', 'idx', 'array'), ``n`` (images), ``sample_shape`` (per image, as stored),
    ``stored_dtype``, ``dtype`` (float32 / float64: the dtype uint8 images are scaled to,
    p / 255).
    """

    def __init__(self, kind, spec, n, sample_shape, stored_dtype, dtype, arrays=None):
        self.kind, self.spec, self.n = kind, spec, int(n)
        self.sample_shape, self.stored_dtype = tuple(sample_shape), np.dtype(stored_dtype)
        self.dtype = np.dtype(dtype)
        self._arrays = arrays

    def __getstate__(self):
        # An in-memory source is never shipped whole: its chunks travel as task arguments.
        return {**self.__dict__, "_arrays": None}

    def describe(self):
        """A JSON-able description (the manifest's 'data')."""
        d = {"kind": self.kind, "n": self.n, "sample_shape": list(self.sample_shape),
             "stored_dtype": self.stored_dtype.name, "dtype": self.dtype.name}
        if self.kind == "array":
            x, y = self._arrays
            d["sha256"] = _sha256_arrays([x, y])
        else:
            d["source"] = self.spec
        return d

    def head(self, n):
        """The first n images (the CLI's --n)."""
        n = check_int(n, "n")
        if n > self.n:
            raise AdvkernError(f"n = {n} exceeds the {self.n} images available")
        arrays = None if self._arrays is None else (self._arrays[0][:n], self._arrays[1][:n])
        return DataSource(self.kind, self.spec, n, self.sample_shape, self.stored_dtype,
                          self.dtype, arrays)

    def read(self, a, b, input_shape=None):
        """(x, y) of images [a, b): x float (b - a, *input_shape) (uint8 scaled to [0, 1] in
        ``dtype``; stored float data as stored), y int64 (b - a,). Reads only those rows where
        the format allows it (.npy, an uncompressed .npz member or IDX file: memory mapped)."""
        if not 0 <= a <= b <= self.n:
            raise AdvkernError(f"images [{a}, {b}) outside [0, {self.n})")
        if self.kind == "array":
            x, y = self._arrays[0][a:b], self._arrays[1][a:b]
        elif self.kind == "split":
            # load_mnist(split)[a:b] without scaling the whole split for each chunk: the
            # same rows of the (decoded once per process) bundle, scaled alike
            from .nets import datasets as ds
            images, labels, train, test = ds._load_bundled()
            rows = {"train": train, "test": test,
                    "all": np.concatenate([train, test])}[self.spec][a:b]
            x, y = ds._to_unit_float(images[rows], self.dtype), labels[rows]
        elif self.kind == "npz":
            x = _npz_rows(self.spec["path"], "x", a, b)
            y = _npz_rows(self.spec["path"], "y", a, b)
        elif self.kind == "npy":
            x = np.load(self.spec["x"], mmap_mode="r", allow_pickle=False)[a:b]
            y = np.load(self.spec["y"], mmap_mode="r", allow_pickle=False)[a:b]
        else:
            x = _idx_rows(self.spec["images"], a, b)
            y = _idx_rows(self.spec["labels"], a, b)
        x, y = np.array(x), np.array(y)          # own memory (not the map)
        x, y = (v.astype(v.dtype.newbyteorder("=")) if not v.dtype.isnative else v
                for v in (x, y))                  # IDX floats are big-endian
        if x.dtype == np.uint8:
            # as datasets._to_unit_float: one division of exact integers, correctly rounded
            x = x.astype(self.dtype)
            x /= self.dtype.type(255)
        if y.dtype.kind not in "iu":
            raise AdvkernError(f"labels must be integers, got dtype {y.dtype}")
        y = y.astype(np.int64)
        if input_shape is not None and x.shape[1:] != tuple(input_shape) \
                and math.prod(x.shape[1:]) == math.prod(input_shape):
            x = x.reshape((len(x),) + tuple(input_shape))   # (N, 28, 28) -> (N, 1, 28, 28)
        return x, y

    def check_for(self, model):
        """AdvkernError unless the images can feed ``model``."""
        if self.n == 0:
            raise AdvkernError("the data holds no images")
        if math.prod(self.sample_shape) != math.prod(model.input_shape):
            raise AdvkernError(f"images of shape {self.sample_shape} cannot feed a model with "
                               f"input {tuple(model.input_shape)}")
        if self.stored_dtype not in (np.dtype(np.uint8), np.dtype(np.float32),
                                     np.dtype(np.float64)):
            raise AdvkernError(f"images must be uint8, float32 or float64, got "
                               f"{self.stored_dtype}")


def _sha256_arrays(arrays):
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _npy_header(f):
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise AdvkernError(f"unsupported .npy format version {version}")
    shape, fortran, dtype = read(f)
    if dtype.hasobject:
        raise AdvkernError("arrays of Python objects are not read (advkern never unpickles)")
    return shape, fortran, dtype


def _npz_member(path, name):
    """(shape, dtype, offset of the data in the file or None when the member is compressed
    or Fortran-ordered) of array ``name`` of an .npz, reading headers only."""
    try:
        with zipfile.ZipFile(path) as zf:
            try:
                info = zf.getinfo(name + ".npy")
            except KeyError:
                raise AdvkernError(f"{path}: needs arrays 'x' and 'y', has "
                                   f"{sorted(n[:-4] for n in zf.namelist())}") from None
            with zf.open(info) as f:
                shape, fortran, dtype = _npy_header(f)
                header_len = f.tell()
        if info.compress_type != zipfile.ZIP_STORED or fortran:
            return shape, dtype, None
        with open(path, "rb") as f:        # the member's local header: 30 bytes + name + extra
            f.seek(info.header_offset)
            local = f.read(30)
            start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") \
                + int.from_bytes(local[28:30], "little")
        return shape, dtype, start + header_len
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        if isinstance(e, (AdvkernError, FileNotFoundError)):
            raise
        raise AdvkernError(f"{path}: not a readable .npz ({e})") from None


def _npz_rows(path, name, a, b):
    shape, dtype, offset = _npz_member(path, name)
    if offset is not None:
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))[a:b]
    # A compressed member cannot be sliced without inflating it: read whole, keep [a, b).
    with np.load(path, allow_pickle=False) as z:
        return z[name][a:b]


def _idx_header(path):
    """(shape, big-endian dtype, data offset, gzipped) of an IDX file, reading the header."""
    from .nets.datasets import _GZIP_MAGIC, _IDX_TYPES

    with open(path, "rb") as f:
        gz = f.read(2) == _GZIP_MAGIC
    opener = gzip.open if gz else open
    with opener(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_TYPES:
            raise AdvkernError(f"{path}: not an IDX file (header {head.hex(' ')})")
        ndim = head[3]
        dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim or ndim == 0:
        raise AdvkernError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
    return shape, _IDX_TYPES[head[2]], 4 + 4 * ndim, gz


def _idx_rows(path, a, b):
    shape, dtype, offset, gz = _idx_header(path)
    if gz:    # a gzip stream cannot be sliced: inflate it (load_idx checks it all)
        from .nets.datasets import load_idx
        return load_idx(path)[a:b]
    size = os.path.getsize(path)
    if size != offset + math.prod(shape) * dtype.itemsize:
        raise AdvkernError(f"{path}: {size} bytes, but an IDX file of shape {shape} "
                           f"({dtype.newbyteorder('=').name}) has "
                           f"{offset + math.prod(shape) * dtype.itemsize}")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)[a:b]


def open_data(data, dtype=np.float32):
    """A :class:`DataSource` for ``data``, reading headers only (the client never loads
    the images). ``data`` is one of:

    - ``"test"``, ``"train"`` or ``"all"``: the bundled MNIST split (``nets.datasets``);
    - ``"FILE.npz"`` with arrays ``x`` (N, ...) uint8 or float, and ``y`` (N,) integers (an
      uncompressed archive, ``np.savez``, is memory mapped; a compressed member is inflated
      whole by each reader);
    - ``("X.npy", "Y.npy")``: two .npy files, memory mapped;
    - ``("IMAGES", "LABELS")``: an MNIST-style IDX pair (``train-images-idx3-ubyte``, plain:
      memory mapped, or gzip: inflated by each reader);
    - ``(x, y)`` arrays in memory (their chunks travel with the tasks);
    - a DataSource (returned as is).

    dtype: float32 or float64, what uint8 images are scaled to (p / 255); float data keeps
    its own dtype.
    """
    from .nets.datasets import SPLITS, _float_dtype

    dt = _float_dtype(dtype)
    if isinstance(data, DataSource):
        return data
    if isinstance(data, (str, os.PathLike)):
        name = os.fspath(data)
        if name in SPLITS:
            n = {"train": 4000, "test": 1000, "all": 5000}[name]
            return DataSource("split", name, n, (1, 28, 28), np.uint8, dt)
        if name.endswith(".npy"):
            raise AdvkernError(f"{name}: a .npy holds images only: pass (X.npy, Y.npy)")
        if not os.path.isfile(name):
            if not os.path.exists(name):
                raise FileNotFoundError(2, "No such file or directory", name)
            raise AdvkernError(f"{name} is not a file")
        path = os.path.abspath(name)
        xs, xdt, _ = _npz_member(path, "x")
        ys, _, _ = _npz_member(path, "y")
        return _checked("npz", {"path": path}, xs, ys, xdt, dt, name)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        a, b = data
        if all(isinstance(v, (str, os.PathLike)) for v in (a, b)):
            pa, pb = (os.path.abspath(os.fspath(v)) for v in (a, b))
            for p in (pa, pb):
                if not os.path.exists(p):
                    raise FileNotFoundError(2, "No such file or directory", p)
            if pa.endswith(".npy") or pb.endswith(".npy"):
                xm = np.load(pa, mmap_mode="r", allow_pickle=False)
                ym = np.load(pb, mmap_mode="r", allow_pickle=False)
                return _checked("npy", {"x": pa, "y": pb}, xm.shape, ym.shape, xm.dtype, dt,
                                f"{a}, {b}")
            xs, xdt, _, _ = _idx_header(pa)
            ys, _, _, _ = _idx_header(pb)
            return _checked("idx", {"images": pa, "labels": pb}, xs, ys,
                            xdt.newbyteorder("="), dt, f"{a}, {b}")
        x, y = np.asarray(a), np.asarray(b)
        return DataSource("array", None, *_shapes_ok(x.shape, y.shape, "x, y"), x.dtype, dt,
                          arrays=(x, y))
    raise AdvkernError(f"data must be a split name {SPLITS}, an .npz file, a pair of .npy or "
                       f"IDX files, or (x, y) arrays; got {type(data).__name__}")


def _shapes_ok(xs, ys, what):
    if len(xs) < 2 or len(ys) != 1:
        raise AdvkernError(f"{what}: images must be (N, ...) and labels (N,), got shapes "
                           f"{tuple(xs)} and {tuple(ys)}")
    if xs[0] != ys[0]:
        raise AdvkernError(f"{what}: {xs[0]} images but {ys[0]} labels")
    return xs[0], tuple(xs[1:])


def _checked(kind, spec, xs, ys, xdt, dt, what):
    n, sample = _shapes_ok(xs, ys, what)
    return DataSource(kind, spec, n, sample, xdt, dt)


# ----------------------------------------------------------------------------- model


def model_digest(model):
    """SHA-256 (hex) of a model's architecture (``config()``) and weights (dtype, shape and
    bytes of every parameter, in order): equal digests, equal models."""
    check_model(model)
    h = hashlib.sha256(json.dumps(model.config(), sort_keys=True).encode())
    for i, p in enumerate(model.params):
        for k in sorted(p):
            h.update(f"{i}.{k}".encode())
            h.update(_sha256_arrays([p[k]]).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- cluster


class _PinCores(_WorkerPlugin):
    """Pins LocalCluster worker k (its name) to its share of the cores, so N workers on C
    cores each run C / N threads (advkern's numba_cpu backend sizes its thread pool from the
    CPU affinity) instead of N x C threads fighting over C cores."""

    name = "advkern-pin-cores"

    def __init__(self, groups):
        self.groups = [list(g) for g in groups]

    def setup(self, worker):
        try:
            k = int(worker.name)
        except (TypeError, ValueError):
            return
        _set_affinity(self.groups[k % len(self.groups)])


def _set_affinity(cpus):
    if not hasattr(os, "sched_setaffinity"):
        return
    try:  # every thread of the process (Linux: a mask is per thread)
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass


def _cores():
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else list(range(os.cpu_count() or 1))


def local_cluster(n_workers, *, host="127.0.0.1", pin=True, **kw):
    """A ``distributed.Client`` on a new LocalCluster of ``n_workers`` worker processes (one
    Dask thread each) bound to ``host`` (its HTTP server on a free port). pin: each worker is
    pinned to its share of this process's cores (when n_workers <= cores), so the cluster
    uses the cores one process would. The workers start without Dask's
    ``MALLOC_TRIM_THRESHOLD_`` (7% of an attack's time, see below). Close with
    ``client.close(); client.cluster.close()``. kw: more LocalCluster arguments.
    """
    dd = _dask()
    n_workers = check_int(n_workers, "n_workers")
    cpus = _cores()
    groups = [cpus[k * len(cpus) // n_workers:(k + 1) * len(cpus) // n_workers]
              for k in range(n_workers)]
    pin = pin and all(groups)
    env = dict(kw.pop("env", {}))
    if pin:
        env.setdefault("NUMBA_NUM_THREADS", str(min(len(g) for g in groups)))
    # any free port for the scheduler's HTTP server (the dashboard, when bokeh is installed),
    # not 8787: a second cluster on the machine would warn that it is taken
    kw.setdefault("dashboard_address", f"{host}:0")
    import dask

    # Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536 (its pre-spawn-environ). Like any
    # explicit glibc malloc setting, that also pins the mmap threshold at 128 KiB, so every
    # batch-sized temporary of an attack is a fresh mmap whose pages fault in again: 10x the
    # page faults and 7% slower PGD-40 on the cnn (python -m bench.distributed --malloc).
    # These workers keep glibc's defaults (None unsets a pre-spawn variable); the
    # single-threaded BLAS settings stay.
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        cluster = dd.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                  host=host, env=env, **kw)
    client = dd.Client(cluster)
    if pin:
        client.register_plugin(_PinCores(groups))
    return client


def _client(client):
    """(Client, owned): a Client from None (the current default client), a Client, 'local:N'
    (a new LocalCluster) or a scheduler address ('tcp://host:port'); owned: close it after."""
    dd = _dask()
    if client is None:
        try:
            return dd.default_client(), False
        except ValueError:
            raise AdvkernError("no Dask client: pass client= a distributed.Client, a scheduler "
                               "address ('tcp://host:port') or 'local:N'") from None
    if isinstance(client, dd.Client):
        return client, False
    if isinstance(client, str):
        if client.startswith("local:"):
            n = client[len("local:"):]
            if not n.isdigit() or int(n) < 1:
                raise AdvkernError(f"scheduler 'local:N' needs N >= 1 worker processes, got "
                                   f"{client!r}")
            return local_cluster(int(n)), True
        if "://" in client:
            try:
                return dd.Client(client, timeout="20s"), True
            except OSError as e:
                raise AdvkernError(f"cannot reach the Dask scheduler at {client}: {e}") from None
        raise AdvkernError(f"scheduler must be 'local:N' or an address like "
                           f"'tcp://host:8786', got {client!r}")
    raise AdvkernError(f"client must be a distributed.Client, an address or 'local:N', got "
                       f"{type(client).__name__}")


def _close(client):
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


# ----------------------------------------------------------------------------- tasks


# Chunks a worker has read, kept for the later runs of the same sweep (key: the sweep's
# token and the chunk), least recently used first out; at most this many bytes per worker.
CHUNK_CACHE_BYTES = int(os.environ.get("ADVKERN_CHUNK_CACHE_BYTES", 1 << 30))
_CHUNK_CACHE = {}
_CHUNK_CACHE_LOCK = threading.Lock()


def _read_chunk(source, a, b, input_shape, token):
    """Worker: images [a, b) of ``source``; from this worker's cache when it read them for an
    earlier run of the same sweep (token), else read (and cached when token is not None)."""
    key = (token, a, b)
    with _CHUNK_CACHE_LOCK:
        hit = _CHUNK_CACHE.pop(key, None) if token is not None else None
        if hit is not None:
            _CHUNK_CACHE[key] = hit              # most recently used last
            return hit
    x, y = source.read(a, b, input_shape)
    if token is not None and x.nbytes + y.nbytes <= CHUNK_CACHE_BYTES:
        with _CHUNK_CACHE_LOCK:
            _CHUNK_CACHE[key] = (x, y)
            while sum(u.nbytes + v.nbytes for u, v in _CHUNK_CACHE.values()) > \
                    CHUNK_CACHE_BYTES:
                del _CHUNK_CACHE[next(iter(_CHUNK_CACHE))]
    return x, y


def _attack_chunk(model, data, index, a, b, attack, params, seed, backend, hook, token):
    """Worker: run_attack on images [a, b); returns their x_adv, info, labels and what ran.

    data: the DataSource (the worker reads its rows) or the chunk's (x, y) arrays. The task
    depends on nothing but the model, which every worker holds, so the scheduler gives it to
    whichever worker is free (a slow or lost worker's chunks go to the others).
    """
    from .attacks import run_attack

    x, y = _read_chunk(data, a, b, tuple(model.input_shape), token) \
        if isinstance(data, DataSource) else data
    if hook is not None:
        hook(index, a, b)
    run = run_attack(model, x, y, attack, seed=seed, progress=False, backend=backend, **params)
    return {"index": index, "x_adv": run.x_adv, "info": run.info, "y": y,
            "backend": run.params["backend"], "seconds": run.seconds}


# ----------------------------------------------------------------------------- out folder


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.item() if v.ndim == 0 else {"array_sha256": _sha256_arrays([v]),
                                              "shape": list(v.shape), "dtype": v.dtype.name}
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_jsonable(u) for u in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(u) for k, u in v.items()}
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    return v


def _write_atomic(path, write):
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)       # a reader sees the whole file or none
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _chunk_path(out, index):
    return os.path.join(out, f"chunk-{index:05d}.npz")


def _save_chunk(out, res, a, digest):
    meta = {"index": res["index"], "start": a, "stop": a + len(res["y"]),
            "backend": res["backend"], "seconds": res["seconds"], "manifest": digest,
            "info_keys": list(res["info"])}
    arrays = {"x_adv": res["x_adv"], "y": res["y"], "meta": np.array(json.dumps(meta)),
              **{f"info.{k}": v for k, v in res["info"].items()}}
    _write_atomic(_chunk_path(out, res["index"]), lambda f: np.savez_compressed(f, **arrays))


def _load_chunk_file(path, index, a, b, digest):
    """A finished chunk from ``out`` in the form _attack_chunk returns it; None when the file
    cannot be read (it is then attacked again); AdvkernError when it belongs to another
    run."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            res = {"index": index, "x_adv": z["x_adv"], "y": z["y"],
                   "info": {k: z[f"info.{k}"] for k in meta["info_keys"]},
                   "backend": meta["backend"], "seconds": meta["seconds"]}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None
    if meta.get("manifest") != digest or (meta["start"], meta["stop"]) != (a, b):
        raise AdvkernError(f"{path} belongs to another run (its manifest or images differ): "
                           f"remove it or use another out folder")
    return res


def _manifest_digest(m):
    return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()


def _check_out(out, manifest, resume, n_chunks):
    """Check ``out`` (created if missing) against ``manifest``: the set of chunk indices
    whose file exists for the same run, or None when ``out`` holds no run yet (then
    ``_write_manifest`` starts one). A different run there is an AdvkernError."""
    path = os.path.join(out, MANIFEST)
    if os.path.exists(out) and not os.path.isdir(out):
        raise AdvkernError(f"out {out} is a file, not a folder")
    os.makedirs(out, exist_ok=True)
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise AdvkernError(f"{path}: unreadable manifest ({e})") from None
        diff = [k for k in sorted(set(old) | set(manifest)) if old.get(k) != manifest.get(k)]
        if diff:
            what = "; ".join(f"{k}: {_short(old.get(k))} there, {_short(manifest.get(k))} now"
                             for k in diff)
            raise AdvkernError(f"out {out} holds a different run ({what}): use another folder "
                               f"(or remove it) rather than mix results")
        done = {i for i in range(n_chunks) if os.path.exists(_chunk_path(out, i))}
        if not resume:
            raise AdvkernError(f"out {out} already holds this run ({len(done)}/{n_chunks} "
                               f"chunks done): pass resume=True (--resume) to finish it, or "
                               f"use another folder")
        return done
    stray = [f for f in os.listdir(out) if not f.startswith(".")]
    if stray:
        raise AdvkernError(f"out {out} is not empty and has no {MANIFEST} "
                           f"({', '.join(sorted(stray)[:3])}...): use an empty or new folder")
    return None


def _write_manifest(out, manifest):
    _write_atomic(os.path.join(out, MANIFEST),
                  lambda f: f.write(json.dumps(manifest, indent=1, sort_keys=True).encode()))


def _short(v):
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 80 else s[:77] + "..."


def read_out(out):
    """The manifest (dict) of an out folder and its finished chunks, sorted by index: a list
    of dicts (index, start, stop, x_adv, y, info, backend, seconds)."""
    with open(os.path.join(out, MANIFEST)) as f:
        manifest = json.load(f)
    digest = _manifest_digest(manifest)
    chunks = []
    for i, (a, b) in enumerate(manifest["chunks"]):
        p = _chunk_path(out, i)
        if os.path.exists(p):
            r = _load_chunk_file(p, i, a, b, digest)
            if r is not None:
                chunks.append({**r, "start": a, "stop": b})
    return manifest, chunks


# ----------------------------------------------------------------------------- progress


class _Report:
    """Progress as chunks finish: advkern's bar on a terminal (or progress=True), else one
    line per chunk on stderr (progress=None), or nothing (False)."""

    def __init__(self, total, desc, progress):
        from ._progress import Progress

        tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
        self.lines = progress is None and not tty
        self.bar = Progress(total, desc, enabled=bool(progress) or (progress is None and tty))
        self.total, self.desc, self.n = total, desc, 0

    def done(self, k=1, note=""):
        self.n += k
        self.bar.update(k)
        if self.lines and note:
            print(f"advkern: {self.desc}: {note} ({self.n}/{self.total})", file=sys.stderr,
                  flush=True)

    def close(self):
        self.bar.__exit__(None, None, None)


# ----------------------------------------------------------------------------- API


def evaluate(model, data, attack, params=None, *, client=None, chunk=DEFAULT_CHUNK, seed=0,
             backend="auto", out=None, resume=False, n=None, dtype=np.float32, retries=2,
             progress=False, keep_x_adv=True, worker_hook=None):
    """Attack ``data`` with ``attack`` over a Dask cluster; an AttackRun equal to
    ``run_attack(model, x, y, attack, seed=seed, backend=backend, **params)`` on all images.

    model: an advkern model (shipped to every worker once). data: see :func:`open_data`
    (the bundled split name, an .npz, a pair of .npy or IDX files, (x, y) arrays); n: its
    first n images only. attack, params (a dict), seed (an int: image i draws from
    [seed, i]), backend: as ``run_attack`` ('auto' resolves on each worker).
    client: a ``distributed.Client``, a scheduler address 'tcp://host:port', 'local:N' (a
    LocalCluster of N processes, closed after) or None (the current default client).
    chunk: images per task (default 250; part of the manifest). out: a folder for the
    manifest and one .npz per finished chunk; resume: finish the run in ``out`` (chunks
    with a file are not attacked again). retries: how often a chunk whose task raised is
    re-run. progress: False, True (a bar) or None (a bar on a terminal, else a line per
    chunk). keep_x_adv: False leaves ``run.x_adv`` None (the client then holds only the
    per-image records; the adversarial images are in ``out``). worker_hook: a picklable
    ``hook(index, start, stop)`` called on the worker before each chunk (logging, fault
    injection in tests).

    Returns an AttackRun: x_adv (N, ...), info (per-image (N,) arrays), metrics (over all N
    images), seconds (wall time of the distributed run), params (as run_attack's;
    ``backend``: the backend the workers ran, comma-separated if they differ).
    """
    return sweep(model, data, [(attack, params)], client=client, chunk=chunk, seed=seed,
                 backend=backend, out=out, resume=resume, n=n, dtype=dtype, retries=retries,
                 progress=progress, keep_x_adv=keep_x_adv, worker_hook=worker_hook,
                 _flat_out=True)[0]


def sweep(model, data, runs, *, client=None, chunk=DEFAULT_CHUNK, seed=0, backend="auto",
          out=None, resume=False, n=None, dtype=np.float32, retries=2, progress=False,
          keep_x_adv=True, worker_hook=None, _flat_out=False):
    """Several runs (e.g. attacks x eps) on the same images: ``runs`` is a list of
    (attack, params dict) pairs; returns one AttackRun per run, in order (each as
    :func:`evaluate` returns it). The model is shipped once for all runs, and a worker keeps
    the chunks it has read for the later runs (see the module's docstring). out: run k's
    folder is ``out/run-<k:03d>-<attack>``. Other arguments: as :func:`evaluate`.
    """
    from .attacks import attack_params, run_attack

    check_model(model)
    runs = [(a, dict(p or {})) for a, p in runs]
    if not runs:
        raise AdvkernError("runs is empty: give at least one (attack, params) pair")
    chunk = check_int(chunk, "chunk")
    retries = check_int(retries, "retries", minimum=0)
    source = open_data(data, dtype)
    if n is not None:
        source = source.head(n)
    source.check_for(model)
    N = source.n
    if np.ndim(seed) != 0:
        raise AdvkernError("seed must be one int here (image i draws from [seed, i])")
    seed = check_int(seed, "seed", minimum=0)
    bounds = [(a, min(a + chunk, N)) for a in range(0, N, chunk)]
    digest_model = model_digest(model)
    # Every run's parameters are checked here, before any work: run_attack on zero images
    # validates them and gives the params record a run on all images would have.
    plans = []
    empty_x = np.zeros((0,) + tuple(model.input_shape),
                       source.dtype if source.stored_dtype == np.uint8 else source.stored_dtype)
    for k, (attack, params) in enumerate(runs):
        per_image = {}
        for key in _PER_IMAGE_PARAMS:
            v = params.get(key)
            if v is not None and not isinstance(v, str) and np.ndim(v) >= 1:
                v = np.asarray(v)
                if len(v) != N:
                    raise AdvkernError(f"{key} has {len(v)} values for {N} images")
                per_image[key] = v
        probe = run_attack(model, empty_x, np.zeros(0, np.int64), attack, seed=seed,
                           progress=False, backend="reference",
                           **{**params, **{k2: v[:0] for k2, v in per_image.items()}})
        manifest = {"format": FORMAT, "attack": attack,
                    "params": _jsonable(attack_params(attack, **params)), "seed": seed,
                    "backend": backend, "model_sha256": digest_model,
                    "data": source.describe(), "chunk": chunk, "chunks": bounds}
        # as it reads back from the file (tuples become lists), so the two compare equal
        manifest = json.loads(json.dumps(manifest, allow_nan=False))
        folder = None
        if out is not None:
            folder = os.fspath(out) if _flat_out else \
                os.path.join(os.fspath(out), f"run-{k:03d}-{attack}")
        plans.append({"attack": attack, "params": params, "per_image": per_image,
                      "record": probe.params, "manifest": manifest, "out": folder})
    for p in plans:
        p["done"] = _check_out(p["out"], p["manifest"], resume, len(bounds)) \
            if p["out"] else set()
        p["digest"] = _manifest_digest(p["manifest"])

    # a resumed run with every chunk on disk needs no cluster
    if all(p["done"] is not None and len(p["done"]) == len(bounds) for p in plans):
        dask_client, owned = None, False
    else:
        dask_client, owned = _client(client)
    try:
        for p in plans:   # a new run's manifest, once a cluster is there to run it
            if p["done"] is None:
                _write_manifest(p["out"], p["manifest"])
                p["done"] = set()
        return _run_all(dask_client, model, source, bounds, plans, seed, backend, retries,
                        progress, keep_x_adv, worker_hook)
    finally:
        if owned:
            _close(dask_client)


def _run_all(client, model, source, bounds, plans, seed, backend, retries, progress,
             keep_x_adv, hook):
    dd = _dask()
    t_start = time.perf_counter()
    mref = {"f": None}      # the scattered model's future (replaced if its data is lost)
    # several runs: each worker keeps the chunks it reads for the later runs
    token = uuid.uuid4().hex if len(plans) > 1 else None
    results = []
    try:
        for p in plans:
            if mref["f"] is None and len(p["done"]) < len(bounds):
                mref["f"] = client.scatter(model, broadcast=True, hash=False)   # once
            results.append(_run_one(client, dd, model, mref, source, bounds, p, seed,
                                    backend, retries, progress, keep_x_adv, hook, token,
                                    t_start))
            t_start = time.perf_counter()
    finally:
        if mref["f"] is not None:
            client.cancel([mref["f"]])
    return results


def _run_one(client, dd, model, mref, source, bounds, p, seed, backend, retries,
             progress, keep_x_adv, hook, token, t0):
    from .attacks import AttackRun, metrics_from_info

    attack, out = p["attack"], p["out"]
    chunks = [None] * len(bounds)
    for i in sorted(p["done"]):
        r = _load_chunk_file(_chunk_path(out, i), i, *bounds[i], p["digest"])
        if r is not None:
            chunks[i] = r if keep_x_adv else dict(r, x_adv=None)
    report = _Report(len(bounds), f"{attack} chunks", progress)
    resumed = sum(c is not None for c in chunks)
    if resumed:
        report.done(resumed, f"{resumed} chunk(s) already in {out}")
    futures = {}

    def submit(i):
        a, b = bounds[i]
        params = dict(p["params"], **{k: v[a:b] for k, v in p["per_image"].items()})
        seeds = np.stack([np.full(b - a, seed, dtype=np.int64),
                          np.arange(a, b, dtype=np.int64)], 1)
        # a DataSource travels as names (the worker reads its rows); in-memory images as
        # the chunk's arrays
        data = source.read(a, b, model.input_shape) if source.kind == "array" else source
        fut = client.submit(_attack_chunk, mref["f"], data, i, a, b, attack, params, seeds,
                            backend, hook, token, pure=False, retries=retries)
        futures[fut] = i
        return fut

    for i in range(len(bounds)):
        if chunks[i] is None:
            submit(i)
    # A chunk whose task the scheduler cancels is submitted again: when the worker that held
    # the scattered model's last copy dies (Dask's memory manager drops the broadcast's
    # extra copies of a key no task is waiting for), every task that needs the model is
    # cancelled, not retried; the model is scattered again first.
    resubmits = [0] * len(bounds)
    try:
        ac = dd.as_completed(list(futures)) if futures else ()
        for fut in ac:
            i = futures[fut]
            try:
                res = fut.result()
            except CancelledError:
                if resubmits[i] > retries:
                    raise AdvkernError(f"chunk {i} (images {bounds[i][0]}-{bounds[i][1]}) "
                                       f"was cancelled by the scheduler {resubmits[i]} "
                                       f"times") from None
                resubmits[i] += 1
                if mref["f"].status != "finished":
                    mref["f"] = client.scatter(model, broadcast=True, hash=False)
                ac.add(submit(i))
                continue
            if out is not None:
                _save_chunk(out, res, bounds[i][0], p["digest"])
            if not keep_x_adv:
                res["x_adv"] = None
            chunks[i] = res
            fut.release()
            report.done(1, f"chunk {i} (images {bounds[i][0]}-{bounds[i][1]}) done in "
                           f"{res['seconds']:.2f} s on {res['backend']}")
    finally:
        pending = [f for f in futures if not f.done()]
        if pending:
            client.cancel(pending)
        report.close()
    seconds = time.perf_counter() - t0
    keys = list(chunks[0]["info"])
    info = {k: np.concatenate([c["info"][k] for c in chunks]) for k in keys}
    y = np.concatenate([c["y"] for c in chunks])
    x_adv = np.concatenate([c["x_adv"] for c in chunks]) if keep_x_adv else None
    metrics = metrics_from_info(info, y, int(np.prod(model.input_shape)))
    backends = sorted({c["backend"] for c in chunks})
    params = dict(p["record"], backend=",".join(backends))
    return AttackRun(x_adv, info, metrics, seconds, params)
