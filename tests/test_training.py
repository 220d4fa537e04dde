"""End-to-end: the bundled architectures reach the documented accuracies on the bundled split."""

import numpy as np
import pytest

from advkern.errors import AdvkernError
from advkern.nets import build
from advkern.nets.datasets import load_mnist
from advkern.nets.train import Adam, SGD, train


@pytest.mark.parametrize("name,target", [("mlp", 0.93), ("cnn", 0.95)])
def test_bundled_architectures_reach_accuracy(trained, name, target):
    x, y = load_mnist("test")
    acc = trained(name).accuracy(x, y)
    assert acc >= target, f"{name} test accuracy {acc:.4f} < {target}"


def test_training_is_seeded_and_leaves_inputs_alone():
    x, y = load_mnist("train")
    x, y = x[:200], y[:200]
    x0, m0 = x.copy(), build("logreg", seed=3)
    w0 = m0.params[1]["w"].copy()
    a, ha = train(m0, x, y, epochs=2, seed=7, progress=False)
    b, hb = train(m0, x, y, epochs=2, seed=7, progress=False)
    c, _ = train(m0, x, y, epochs=2, seed=8, progress=False)
    assert np.array_equal(a.params[1]["w"], b.params[1]["w"])
    assert not np.array_equal(a.params[1]["w"], c.params[1]["w"])
    assert np.array_equal(x, x0) and np.array_equal(m0.params[1]["w"], w0)
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]


@pytest.mark.parametrize("opt", [SGD(lr=0.1), Adam(lr=0.05)])
def test_optimizers_decrease_a_quadratic(opt):
    params = [{"w": np.array([3.0, -2.0])}]
    for _ in range(200):
        opt.step(params, [{"w": 2 * params[0]["w"]}])  # grad of ||w||^2
    assert np.abs(params[0]["w"]).max() < 0.05


@pytest.mark.parametrize("adv", ["fgsm", "pgd"])
def test_adversarial_training_runs_and_is_seeded(adv):
    x, y = load_mnist("train")
    x, y = x[:128], y[:128]
    m = build("logreg", seed=0)
    a, h = train(m, x, y, epochs=1, adversarial=adv, eps=0.1, pgd_steps=2, progress=False)
    b, _ = train(m, x, y, epochs=1, adversarial=adv, eps=0.1, pgd_steps=2, progress=False)
    assert np.array_equal(a.params[1]["w"], b.params[1]["w"]) and np.isfinite(h[0]["loss"])


def test_fgsm_mixed_objective_is_the_weighted_sum():
    from advkern.nets.train import minibatch_grads
    from advkern.reference.network import loss_and_input_grad, loss_and_param_grads
    x, y = load_mnist("test")
    x, y = x[:20].astype(np.float64), y[:20]
    m = build("mlp", seed=1).astype(np.float64)
    loss, grads = minibatch_grads(m, x, y, adversarial="fgsm", eps=0.1, mix=0.3)
    _, g = loss_and_input_grad(m, x, y)
    xa = np.clip(x + 0.1 * np.sign(g), 0, 1)
    lc, gc = loss_and_param_grads(m, x, y)
    la, ga = loss_and_param_grads(m, xa, y)
    assert np.isclose(loss, 0.3 * lc + 0.7 * la)
    np.testing.assert_allclose(grads[1]["w"], 0.3 * gc[1]["w"] + 0.7 * ga[1]["w"])


@pytest.mark.parametrize("kw,msg", [({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"),
                                    ({"optimizer": "rmsprop"}, "optimizer"),
                                    ({"adversarial": "fgsm", "eps": -1}, "eps"),
                                    ({"adversarial": "cw"}, "adversarial"),
                                    ({"schedule": "step"}, "schedule")])
def test_bad_training_arguments(kw, msg):
    x, y = load_mnist("test")
    with pytest.raises(AdvkernError, match=msg):
        train(build("logreg"), x[:10], y[:10], progress=False, **kw)


def test_progress_is_one_line_per_stage_off_a_terminal():
    import io

    from advkern._progress import Progress

    log = io.StringIO()                      # not a terminal
    with Progress(4, "training mlp", stream=log) as bar:
        for _ in range(4):
            bar.update(1, loss=0.5)
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("training mlp: 4/4 in ")
    assert lines[0].endswith("loss=0.5") and "\r" not in log.getvalue()
    quiet = io.StringIO()
    with Progress(4, "x", enabled=False, stream=quiet) as bar:
        bar.update(4)
    assert quiet.getvalue() == ""


def test_first_use_training_says_what_and_where(tmp_path, monkeypatch, capsys):
    from advkern.nets import zoo

    monkeypatch.setenv("ADVKERN_CACHE", str(tmp_path))
    zoo.pretrained("logreg", epochs=1)
    err = capsys.readouterr().err.splitlines()
    path = zoo.cache_path("logreg", 0, epochs=1)
    assert err[0] == f"advkern: training the bundled 'logreg' model on first use (cached at " \
                     f"{path})"
    assert err[1].startswith("training logreg: ") and path.exists()
    zoo.pretrained("logreg", epochs=1)                 # cached: says nothing
    assert capsys.readouterr().err == ""
