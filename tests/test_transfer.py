"""The hand-written k-NN against a brute-force loop, and the ``transfer`` experiment end to
end (tiny settings)."""

import json
from collections import Counter

import numpy as np
import pytest
from _helpers import seeds
from hypothesis import given
from hypothesis import strategies as st

from advkern.errors import AdvkernError, ShapeError
from advkern.reference.knn import KNN


def _brute(xtr, ytr, xq, k):
    """Exact squared distances by a loop, neighbours in (distance, index) order, majority
    vote, ties to the class of the nearest neighbour among the tied classes."""
    out = []
    for q in xq.reshape(len(xq), -1):
        d = [float(np.sum((q - b) ** 2)) for b in xtr.reshape(len(xtr), -1)]
        nb = sorted(range(len(d)), key=lambda j: (d[j], j))[:k]
        votes = Counter(int(ytr[j]) for j in nb)
        top = max(votes.values())
        out.append(next(int(ytr[j]) for j in nb if votes[int(ytr[j])] == top))
    return np.array(out)


@given(st.integers(1, 30), st.integers(1, 12), st.integers(1, 7), st.integers(2, 4), seeds)
def test_knn_matches_brute_force_with_ties(n_train, n_query, k, n_classes, seed):
    # Small integer coordinates: every distance is an exact integer in both computations,
    # and equal distances and equal votes are frequent, so both tie rules are exercised.
    rng = np.random.default_rng(seed)
    k = min(k, n_train)
    xtr = rng.integers(0, 3, (n_train, 1, 2, 2)).astype(np.float64)
    ytr = rng.integers(0, n_classes, n_train)
    xq = rng.integers(0, 3, (n_query, 1, 2, 2)).astype(np.float32)
    want = _brute(xtr, ytr, xq, k)
    for max_bytes in (16 * n_train, 10**6):        # 1 query per chunk, and all at once
        got = KNN(k, max_bytes=max_bytes).fit(xtr, ytr).predict(xq)
        assert np.array_equal(got, want)


def test_knn_on_mnist_agrees_with_brute_force_and_is_accurate():
    from advkern.nets.datasets import load_mnist
    x, y = load_mnist("train")
    xt, yt = load_mnist("test")
    knn = KNN(3, max_bytes=16 * 300 * 7).fit(x[:300], y[:300])   # 7 queries per chunk
    assert knn.chunk_rows() == 7
    got = knn.predict(xt[:20])
    assert np.array_equal(got, _brute(x[:300].astype(np.float64), y[:300], xt[:20], 3))
    assert KNN(3).fit(x, y).accuracy(xt[:200], yt[:200]) > 0.85


def test_knn_k1_returns_the_training_label_of_a_training_point():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(40, 5))
    y = rng.integers(0, 4, 40)
    assert np.array_equal(KNN(1).fit(x, y).predict(x), y)


def test_knn_arguments_are_checked():
    x = np.zeros((4, 3))
    y = np.array([0, 1, 0, 1])
    with pytest.raises(AdvkernError, match="k"):
        KNN(0)
    with pytest.raises(AdvkernError, match="more than"):
        KNN(5).fit(x, y)
    with pytest.raises(AdvkernError, match="fit"):
        KNN(1).predict(x)
    with pytest.raises(ShapeError, match="features"):
        KNN(1).fit(x, y).predict(np.zeros((2, 4)))
    q = np.ones((2, 3))
    q0 = q.copy()
    KNN(1).fit(x, y).predict(q)
    assert np.array_equal(q, q0)


def _tiny_models(tmp_path):
    """Two small networks trained briefly on 600 images, as model files."""
    from advkern.nets import Dense, Flatten, ReLU, Sequential, save
    from advkern.nets.datasets import load_mnist
    from advkern.nets.train import train
    x, y = load_mnist("train")
    paths = []
    for i, h in enumerate((32, 64)):
        m = Sequential([Flatten(), Dense(h), ReLU(), Dense(10)], (1, 28, 28), seed=i)
        m, _ = train(m, x[:600], y[:600], epochs=3, seed=i, progress=False)
        paths.append(str(save(m, tmp_path / f"net{i}.npz")))
    return paths


def test_transfer_experiment_end_to_end(tmp_path, monkeypatch):
    from advkern.experiments import transfer
    monkeypatch.setenv("ADVKERN_CACHE", str(tmp_path / "cache"))
    paths = _tiny_models(tmp_path)
    r = transfer.run(models=paths, out=tmp_path / "out", quick=True, n=40, k=3, train_n=500,
                     eps=0.2, log=lambda m: None)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["experiment"] == "transfer"
    assert (tmp_path / "out" / on_disk["figures"]["transfer_matrix"]).stat().st_size > 0
    sources = paths + ["softmax-regression"]
    assert r["sources"] == sources
    targets = r["target_models"]
    assert targets[:4] == sources + ["knn (k=3)"]
    try:
        import sklearn  # noqa: F401
        assert targets[4:] == ["decision_tree", "svm"] and not r["skipped"]
    except ImportError:
        assert targets[4:] == [] and set(r["skipped"]) == {"decision_tree", "svm"}
        assert "scikit-learn" in r["skipped"]["svm"]
    m = r["matrix"]["fgsm"]
    assert set(m) == set(sources) and all(set(m[s]) == set(targets) for s in sources)
    assert set(r["clean"]) == set(targets)
    # white-box FGSM at eps 0.2 hurts each source more than its clean accuracy
    for s in sources:
        assert m[s][s] < r["clean"][s]
    assert r["targets"][0]["pass"] in (True, False)


@pytest.mark.parametrize("kw, match", [({"attacks": ("cw",)}, "attacks"),
                                       ({"eps": -0.1}, "eps")])
def test_transfer_experiment_arguments_are_checked(kw, match):
    from advkern.experiments import transfer
    with pytest.raises(AdvkernError, match=match):
        transfer.run(quick=True, log=lambda m: None, **kw)
