"""The ``linearity`` experiment end to end on small models (results.json and PNGs into
tmp_path), its agreement arithmetic, and ``advkern train --classes``."""

import json

import numpy as np
import pytest

from advkern import experiments
from advkern.errors import AdvkernError
from advkern.experiments import linearity as lin
from advkern.nets import build, save
from advkern.nets.datasets import load_mnist
from advkern.nets.train import train


def test_agreement_counts_same_wrong_class_among_shared_mistakes():
    y = np.array([0, 0, 0, 0, 1])
    a = np.array([1, 2, 0, 3, 2])
    b = np.array([1, 3, 2, 0, 2])
    # both wrong at 0, 1, 4; same class at 0 and 4
    assert lin.agreement(a, b, y) == (2, 3)
    preds = {"p": {"p": a, "q": b}, "q": {"p": b, "q": a}}
    mat, counts, pairs = lin.agreement_table(["p", "q"], preds, y)
    assert np.isnan(mat[0, 0]) and mat[0, 1] == pytest.approx(2 / 3)
    assert counts["q"]["p"] == [2, 3]
    assert pairs == {"p<->q": pytest.approx(4 / 6)}


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    """Two 1-epoch models saved as files (fast to train, no bundled-model cache needed)."""
    x, y = load_mnist("train")
    folder = tmp_path_factory.mktemp("lin-models")
    paths = []
    for name in ("softmax", "rbf"):
        model, _ = train(build(name, seed=0, data=(x, y)), x[:600], y[:600], epochs=1,
                         lr=1e-2, progress=False)
        paths.append(str(save(model, folder / f"{name}.npz")))
    return paths


def test_linearity_end_to_end(tmp_path, monkeypatch, small_models):
    monkeypatch.setenv("ADVKERN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lin, "QUICK_N", 150)
    out = tmp_path / "out"
    lines = []
    res = experiments.run("linearity", models=small_models, out=out, quick=True,
                          log=lines.append)
    on_disk = json.loads((out / "results.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"results.json holds {c}"))
    assert on_disk["experiment"] == "linearity" and on_disk["n_test"] == 150
    for key in ("logreg_3v7", "agreement", "fgsm_errors"):
        png = out / res["figures"][key]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the pair: 3s and 7s only, labels 0 / 1, and FGSM stats for every eps
    lr = res["logreg"]
    assert lr["classes"] == [3, 7] and lr["n"] > 100
    assert set(lr["fgsm"]) == {"0.1", "0.25"}
    for st in lr["fgsm"].values():
        assert 0 <= st["error"] <= 1
    names = list(res["models"])
    assert len(names) == 2
    for rec in res["models"].values():
        e1, e2 = rec["fgsm"]["0.1"]["error"], rec["fgsm"]["0.25"]["error"]
        assert 1 - rec["clean_accuracy"] <= e2 + 0.05 and 0 <= e1 <= 1
    ag = res["agreement"]
    assert ag["models"] == names and len(ag["pairs"]) == 1
    counts = ag["counts"][names[0]][names[1]]
    assert 0 <= counts[0] <= counts[1] <= 150
    by_name = {t["name"]: t for t in res["targets"]}
    t = by_name["logreg 3-vs-7: FGSM eps 0.25 error rate"]
    assert t["pass"] == (t["values"]["error"] >= lin.TARGET_LOGREG)
    assert any("logreg 3-vs-7" in line for line in lines)
    # the pair model was cached where `advkern train --classes 3,7` writes it
    assert list((tmp_path / "cache").glob("logreg-s0-*.npz"))


def test_logreg_pair_is_linear_so_fgsm_is_the_sign_of_w(tmp_path, monkeypatch):
    """For a binary logistic regression FGSM moves a 3 by +eps sign(w) and a 7 by -eps sign(w)
    (before clipping): the seed's picture."""
    monkeypatch.setenv("ADVKERN_CACHE", str(tmp_path))
    model = lin.pair_model((3, 7), seed=0)
    assert model.num_logits == 1
    from advkern.nets.datasets import select_classes
    x, y = select_classes(*load_mnist("test"), (3, 7))
    x, y = x[:40], y[:40]
    x_adv, _, _ = lin.fgsm_stats(model, x, y, 0.1, "reference")
    w = model.params[-1]["w"][:, 0].reshape(x.shape[1:])
    sign = np.where(y[:, None, None, None] == 0, 1, -1) * np.sign(w)[None]
    np.testing.assert_allclose(x_adv, np.clip(x + np.float32(0.1) * sign, 0, 1), atol=1e-6)
    # cached: a second call loads the same weights
    again = lin.pair_model((3, 7), seed=0)
    np.testing.assert_array_equal(again.params[-1]["w"], model.params[-1]["w"])
    with pytest.raises(AdvkernError, match="two classes"):
        lin.pair_model((1, 2, 3))


def test_cli_train_classes(tmp_path, capsys):
    from advkern.cli import main
    from advkern.nets import load

    out = tmp_path / "p.npz"
    assert main(["train", "--arch", "logreg", "--classes", "3,7", "--epochs", "1", "--quiet",
                 "--out", str(out)]) == 0
    model = load(out)
    assert model.num_logits == 1
    capsys.readouterr()
    assert main(["train", "--arch", "logreg", "--classes", "3,x", "--out", str(out)]) == 2
    assert "--classes" in capsys.readouterr().err
