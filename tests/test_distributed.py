"""advkern.distributed on a LocalCluster bound to the loopback address (2 worker processes,
one core each): sharded runs equal one process bit for bit (PGD with random start and
restarts, JSMA, DE), a worker killed mid-chunk changes nothing, an interrupted run resumes
from its out folder, a different model or parameter set is refused, and the CLI's
--scheduler path. Small untrained models and a few dozen images keep it within CI's cores."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from advkern import cli
from advkern.attacks import run_attack
from advkern.errors import AdvkernError
from advkern.nets import Dense, Sequential, build, save
from advkern.nets.datasets import load_mnist, save_idx

distributed = pytest.importorskip("distributed", reason='needs pip install "advkern[dask]"')

from advkern import distributed as D  # noqa: E402

N = 40          # images
CHUNK = 15      # three uneven chunks: 15, 15, 10
PGD = {"eps": 0.1, "alpha": 0.02, "steps": 5, "random_start": True, "restarts": 2}
JSMA = {"gamma": 0.05}
DE = {"popsize": 10, "generations": 3}


@pytest.fixture(scope="module")
def client():
    c = D.local_cluster(2)            # processes, 1 thread each, host 127.0.0.1, pinned
    yield c
    cluster = c.cluster
    c.close()
    cluster.close()


@pytest.fixture(scope="module")
def model():
    return build("mlp", seed=0)


@pytest.fixture(scope="module")
def xy():
    x, y = load_mnist("test")
    return x[:N], y[:N]


def assert_same_run(a, b):
    """Two AttackRuns equal bit for bit (x_adv, every per-image record, every metric, the
    params record); NaN equals NaN."""
    assert a.x_adv.dtype == b.x_adv.dtype and np.array_equal(a.x_adv, b.x_adv)
    assert a.info.keys() == b.info.keys()
    for k in a.info:
        assert a.info[k].dtype == b.info[k].dtype, k
        assert np.array_equal(a.info[k], b.info[k], equal_nan=a.info[k].dtype.kind == "f"), k
    assert a.metrics.keys() == b.metrics.keys()
    for k, v in a.metrics.items():
        assert v == b.metrics[k] or (np.isnan(v) and np.isnan(b.metrics[k])), k
    assert a.params == b.params


def test_pgd_random_start_restarts_equals_one_process(client, model, xy, tmp_path):
    x, y = xy
    one = run_attack(model, x, y, "pgd", seed=3, **PGD)
    run = D.evaluate(model, "test", "pgd", PGD, client=client, n=N, chunk=CHUNK, seed=3,
                     out=tmp_path / "out")
    assert_same_run(one, run)
    assert run.params["backend"] == one.params["backend"]      # 'auto' resolved on workers
    # Not trivially equal: a chunk attacked with its own indices (0, 1, ...) as the seeds'
    # image numbers draws other random starts.
    local = run_attack(model, x[CHUNK:2 * CHUNK], y[CHUNK:2 * CHUNK], "pgd", seed=3, **PGD)
    assert not np.array_equal(local.x_adv, run.x_adv[CHUNK:2 * CHUNK])
    # every chunk was written, with a manifest naming the run
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == ["chunk-00000.npz", "chunk-00001.npz", "chunk-00002.npz", "manifest.json"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["model_sha256"] == D.model_digest(model)
    assert manifest["chunks"] == [[0, 15], [15, 30], [30, 40]]
    _, chunks = D.read_out(tmp_path / "out")
    assert np.array_equal(np.concatenate([c["x_adv"] for c in chunks]), one.x_adv)


def test_sweep_jsma_and_de_equal_one_process(client, model, xy):
    x, y = xy
    runs = D.sweep(model, (x, y), [("jsma", JSMA), ("pixel", DE)], client=client,
                   chunk=CHUNK, seed=5)
    assert_same_run(run_attack(model, x, y, "jsma", seed=5, **JSMA), runs[0])
    assert_same_run(run_attack(model, x, y, "pixel", seed=5, **DE), runs[1])


def test_killed_worker_chunk_is_rerun_and_result_unchanged(client, model, xy, tmp_path):
    x, y = xy
    np.save(tmp_path / "x.npy", x)         # .npy data: each worker maps only its rows
    np.save(tmp_path / "y.npy", y)
    marker, log = tmp_path / "kill-once", tmp_path / "attempts"
    marker.write_text("")
    log.mkdir()
    pids_before = set(client.run(os.getpid).values())

    def hook(index, start, stop):        # runs on the worker, before its chunk
        import os
        (log / f"{index}-{os.getpid()}").write_text("")
        if index == 1 and marker.exists():
            marker.unlink()
            os._exit(1)                  # the worker process dies while it holds the chunk

    run = D.evaluate(model, (tmp_path / "x.npy", tmp_path / "y.npy"), "pgd", PGD,
                     client=client, chunk=CHUNK, seed=3, worker_hook=hook)
    assert not marker.exists(), "the kill never happened"
    attempts = sorted(p.name for p in log.iterdir())
    assert len([a for a in attempts if a.startswith("1-")]) == 2, attempts  # killed + re-run
    assert len(pids_before - set(client.run(os.getpid).values())) == 1  # one process died
    assert_same_run(run_attack(model, x, y, "pgd", seed=3, **PGD), run)
    client.wait_for_workers(2, timeout=120)   # the nanny's replacement, for the next tests


def test_losing_the_models_last_copy_resubmits_and_result_unchanged(client, model, xy,
                                                                     tmp_path, monkeypatch):
    """Dask's memory manager may keep a broadcast key on one worker only; when that worker
    dies the scheduler cancels every task that needs the model (no retry). Here the model
    is scattered to one worker, which dies at its first chunk: evaluate scatters it again,
    submits the cancelled chunks again, and the result is unchanged."""
    x, y = xy
    client.wait_for_workers(2, timeout=120)
    holder = sorted(client.scheduler_info()["workers"])[0]
    marker, log = tmp_path / "kill-once", tmp_path / "attempts"
    marker.write_text("")
    log.mkdir()
    real_scatter, calls = client.scatter, []

    def scatter_once_to_holder(data, **kw):
        calls.append(kw)
        if len(calls) == 1:               # the run's first scatter: one copy, on holder
            return real_scatter(data, workers=[holder], broadcast=False, hash=False)
        return real_scatter(data, **kw)
    monkeypatch.setattr(client, "scatter", scatter_once_to_holder)

    def hook(index, start, stop):        # runs on the worker, before its chunk
        import os

        from distributed import get_worker
        (log / f"{index}-{os.getpid()}").write_text("")
        if get_worker().address == holder and marker.exists():
            marker.unlink()
            os._exit(1)                  # the model's only copy dies with this worker

    run = D.evaluate(model, "test", "pgd", PGD, client=client, n=N, chunk=CHUNK, seed=3,
                     worker_hook=hook)
    assert not marker.exists(), "the kill never happened"
    assert len(calls) >= 2, calls        # scattered again after the loss
    assert_same_run(run_attack(model, x, y, "pgd", seed=3, **PGD), run)
    client.wait_for_workers(2, timeout=120)


def test_interrupted_run_resumes(client, model, xy, tmp_path):
    x, y = xy
    out, log = tmp_path / "out", tmp_path / "calls"
    log.mkdir()

    def fail_last(index, start, stop):
        if index == 3:
            # fail once another chunk is on disk (whatever the order the workers took them
            # in), so the interrupted run leaves some chunks done and some not
            import time
            t0 = time.monotonic()
            while not any((out / f"chunk-{i:05d}.npz").exists() for i in range(3)) and \
                    time.monotonic() - t0 < 60:
                time.sleep(0.05)
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        D.evaluate(model, "test", "pixel", DE, client=client, n=N, chunk=10, seed=1, out=out,
                   retries=0, worker_hook=fail_last)
    done = {i for i in range(4) if (out / f"chunk-{i:05d}.npz").exists()}
    assert 3 not in done and done, done
    with pytest.raises(AdvkernError, match="already holds this run"):
        D.evaluate(model, "test", "pixel", DE, client=client, n=N, chunk=10, seed=1, out=out)

    def record(index, start, stop):
        (log / str(index)).write_text("")

    run = D.evaluate(model, "test", "pixel", DE, client=client, n=N, chunk=10, seed=1,
                     out=out, resume=True, worker_hook=record)
    assert {int(p.name) for p in log.iterdir()} == set(range(4)) - done
    assert_same_run(run_attack(model, x, y, "pixel", seed=1, **DE), run)


def test_changed_model_or_params_rejected(client, model, tmp_path):
    out = tmp_path / "out"
    D.evaluate(model, "test", "fgsm", {"eps": 0.1}, client=client, n=20, chunk=10, out=out)
    with pytest.raises(AdvkernError, match="model_sha256"):
        D.evaluate(build("mlp", seed=1), "test", "fgsm", {"eps": 0.1}, client=client, n=20,
                   chunk=10, out=out, resume=True)
    changed = model.copy()
    changed.params[-1]["b"][0] += 1e-6       # one bias changed, slightly
    with pytest.raises(AdvkernError, match="model_sha256"):
        D.evaluate(changed, "test", "fgsm", {"eps": 0.1}, client=client, n=20, chunk=10,
                   out=out, resume=True)
    with pytest.raises(AdvkernError, match="params"):
        D.evaluate(model, "test", "fgsm", {"eps": 0.2}, client=client, n=20, chunk=10,
                   out=out, resume=True)
    with pytest.raises(AdvkernError, match="chunk"):
        D.evaluate(model, "test", "fgsm", {"eps": 0.1}, client=client, n=20, chunk=5, out=out,
                   resume=True)
    assert sorted(os.listdir(out)) == ["chunk-00000.npz", "chunk-00001.npz", "manifest.json"]


def test_bad_input_fails_before_any_work(model, tmp_path):
    # no client is needed to reject these (they fail before one is looked for)
    with pytest.raises(AdvkernError, match="does not take"):
        D.evaluate(model, "test", "pgd", {"bogus": 1}, client="local:1")
    with pytest.raises(AdvkernError, match="unknown attack"):
        D.evaluate(model, "test", "nope", {}, client="local:1")
    with pytest.raises(AdvkernError, match="split name"):
        D.evaluate(model, 42, "fgsm", {}, client="local:1")
    with pytest.raises(AdvkernError, match="exceeds"):
        D.evaluate(model, "test", "fgsm", {}, n=5000, client="local:1")
    with pytest.raises(AdvkernError, match="local:N"):
        D._client("local:0")
    with pytest.raises(AdvkernError, match="scheduler must be"):
        D._client("somewhere:8786")
    with pytest.raises(AdvkernError, match="cannot feed"):
        D.evaluate(Sequential([Dense(3)], (5,)), "test", "fgsm", {}, client="local:1")
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(AdvkernError, match="not empty"):
        D._check_out(str(tmp_path), {"a": 1}, False, 1)


def test_data_sources_read_slices_equal_the_whole(model, tmp_path):
    x8 = (np.arange(7 * 28 * 28) % 256).astype(np.uint8).reshape(7, 28, 28)
    y = np.arange(7) % 10
    whole = (x8.astype(np.float32) / np.float32(255))[:, None]
    np.savez(tmp_path / "plain.npz", x=x8, y=y)
    np.savez_compressed(tmp_path / "packed.npz", x=x8, y=y)
    np.save(tmp_path / "x.npy", x8)
    np.save(tmp_path / "y.npy", y)
    save_idx(tmp_path / "img.idx", x8)
    save_idx(tmp_path / "lab.idx", y.astype(np.uint8))
    save_idx(tmp_path / "img.idx.gz", x8)
    sources = [tmp_path / "plain.npz", tmp_path / "packed.npz",
               (tmp_path / "x.npy", tmp_path / "y.npy"),
               (tmp_path / "img.idx", tmp_path / "lab.idx"),
               (tmp_path / "img.idx.gz", tmp_path / "lab.idx")]
    for spec in sources:
        src = D.open_data(spec)
        assert src.n == 7
        xa, ya = src.read(2, 6, model.input_shape)
        assert xa.dtype == np.float32 and np.array_equal(xa, whole[2:6]), spec
        assert np.array_equal(ya, y[2:6]) and ya.dtype == np.int64
    assert D._npz_member(str(tmp_path / "plain.npz"), "x")[2] is not None     # memory mapped
    assert D._npz_member(str(tmp_path / "packed.npz"), "x")[2] is None
    # the bundled split reads as load_mnist
    assert np.array_equal(D.open_data("train").read(10, 20)[0], load_mnist("train")[0][10:20])
    np.savez(tmp_path / "bad.npz", images=x8)
    with pytest.raises(AdvkernError, match="needs arrays"):
        D.open_data(tmp_path / "bad.npz")
    with pytest.raises(AdvkernError, match="pass"):
        D.open_data(tmp_path / "x.npy")
    with pytest.raises(FileNotFoundError):
        D.open_data(tmp_path / "missing.npz")
    with pytest.raises(AdvkernError, match="labels"):
        D.open_data((tmp_path / "x.npy", tmp_path / "x.npy"))
    raw = (tmp_path / "img.idx").read_bytes()
    (tmp_path / "short.idx").write_bytes(raw[:-3])
    with pytest.raises(AdvkernError, match="bytes"):
        D.open_data((tmp_path / "short.idx", tmp_path / "lab.idx")).read(0, 1)
    with gzip.open(tmp_path / "img.idx.gz") as f:
        assert f.read() == raw


def test_cli_attack_and_sweep_on_the_cluster(client, model, tmp_path, capsys):
    path = str(tmp_path / "mlp.npz")
    save(model, path)
    addr = client.scheduler.address
    common = ["attack", "--model", path, "--attack", "pgd", "--steps", "3", "--random-start",
              "--n", "30", "--json"]
    assert cli.main(common) == 0
    one = json.loads(capsys.readouterr().out)
    out = str(tmp_path / "out")
    assert cli.main(common + ["--scheduler", addr, "--out-dir", out, "--chunk", "8"]) == 0
    cap = capsys.readouterr()
    dist = json.loads(cap.out)
    assert dist["metrics"] == one["metrics"] and dist["params"] == one["params"]
    assert len([f for f in os.listdir(out) if f.startswith("chunk-")]) == 4
    # a rerun without --resume is refused (one error line, status 2)
    assert cli.main(common + ["--scheduler", addr, "--out-dir", out, "--chunk", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("advkern: error: ") and err.count("\n") == 1 and "--resume" in err
    # every chunk is on disk: no cluster is needed (this address has no scheduler)
    assert cli.main(common + ["--scheduler", "tcp://127.0.0.1:1", "--out-dir", out,
                              "--chunk", "8", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == one["metrics"]
    # progress as chunks finish (a line per chunk when stderr is not a terminal)
    assert cli.main(["sweep", "--model", path, "--attack", "fgsm", "--eps", "0,0.1", "--n",
                     "20", "--scheduler", addr, "--chunk", "10"]) == 0
    cap = capsys.readouterr()
    assert cap.err.count("chunk ") >= 4
    assert cli.main(["sweep", "--model", path, "--attack", "fgsm", "--eps", "0,0.1",
                     "--n", "20"]) == 0
    assert capsys.readouterr().out == cap.out
    for bad, msg in [(["--out-dir", out], "needs --scheduler"),
                     (["--scheduler", "nowhere"], "scheduler must be"),
                     (["--scheduler", addr, "--out", str(tmp_path / "r.npz")], "--out and")]:
        assert cli.main(common + bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("advkern: error: ") and msg in err and err.count("\n") == 1


def test_local_workers_keep_glibc_malloc_defaults_and_single_threaded_blas(client):
    # MALLOC_TRIM_THRESHOLD_ (Dask's pre-spawn default) would pin glibc's mmap threshold and
    # make every batch temporary fault its pages in again; the BLAS limits must survive.
    envs = client.run(lambda: {k: os.environ.get(k) for k in
                               ("MALLOC_TRIM_THRESHOLD_", "OPENBLAS_NUM_THREADS",
                                "OMP_NUM_THREADS", "NUMBA_NUM_THREADS")})
    assert len(envs) == 2
    for env in envs.values():
        assert env == {"MALLOC_TRIM_THRESHOLD_": None, "OPENBLAS_NUM_THREADS": "1",
                       "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


def test_import_without_dask_and_the_error_naming_the_extra():
    # Dask made unimportable: advkern and advkern.distributed import, using it is one error
    code = ("import sys; sys.modules['distributed'] = sys.modules['dask'] = None\n"
            "import advkern, advkern.cli\n"
            "from advkern import distributed as D\n"
            "from advkern.nets import build\n"
            "try:\n    D.evaluate(build('mlp'), 'test', 'fgsm', {}, n=10)\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("AdvkernError") and 'pip install "advkern[dask]"' in proc.stdout
    proc = subprocess.run([sys.executable, "-c", "import sys, advkern, advkern.attacks, "
                           "advkern.cli; print('dask' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False"
