"""The ``advkern`` command line: train, info, attack, grad, verify, sweep (demo is too slow).

Commands run in-process through ``advkern.cli.main(argv)`` (capsys captures the output);
two subprocess calls check the ``python -m advkern`` entry point and that bad input gives one
``advkern: error:`` line on stderr with no traceback. Models are files built here: an
untrained ``mlp`` (enough for the CLI's mechanics), a ``logreg`` trained for one epoch (a
real classifier, ~88% test accuracy, in a fraction of a second) and a binary logreg for the
linear attack. ADVKERN_CACHE points at a temporary folder in every test, so nothing here can
train a bundled model into a developer's cache.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from advkern import cli
from advkern.nets import Sequential, build, load, save
from advkern.nets.datasets import load_mnist
from advkern.nets.train import train
from advkern.reference import network

ROOT = Path(__file__).resolve().parents[1]
ONNX_CNN = ROOT / "tests" / "data" / "onnx" / "cnn_legacy.onnx"
ATTACKS = ["fgsm", "fgm", "bim", "pgd", "mifgsm", "deepfool", "cw", "lbfgs", "jsma", "jsma1",
           "pixel", "linear"]
NPZ_KEYS = {"x", "x_adv", "y", "pred", "pred_adv", "success", "l0", "l2", "linf", "params"}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVKERN_CACHE", str(tmp_path / "advkern-cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Model and data files shared by the module's tests (none of them a bundled name)."""
    d = tmp_path_factory.mktemp("cli")
    xtr, ytr = load_mnist("train")
    xte, yte = load_mnist("test")
    logreg, _ = train(build("logreg", seed=0), xtr, ytr, epochs=1, lr=1e-2, seed=0,
                      progress=False)
    # Binary logreg (one logit) for the linear attack, on 0-vs-1 labels (parity of the digit).
    binary, _ = train(build("logreg", num_classes=2, seed=0), xtr, ytr % 2, epochs=1,
                      lr=1e-2, seed=0, progress=False)
    np.savez(d / "binary_data.npz", x=xte[:20], y=yte[:20] % 2)
    # The trained logreg with zero weight rows for the top 3 image rows (84 border pixels):
    # its input gradient there is exactly 0, so FGSM's sign(0) = 0 leaves those pixels alone
    # and an implementation with the sign(0) = +1 convention moves them.
    w = logreg.params[1]["w"].copy()
    w[:84] = 0
    zeroed = Sequential(logreg.layers, logreg.input_shape,
                        [dict(logreg.params[0]), {"w": w, "b": logreg.params[1]["b"].copy()}],
                        name="logreg0")
    return SimpleNamespace(
        dir=d,
        mlp=str(save(build("mlp", seed=0), d / "mlp.npz")),
        logreg=str(save(logreg, d / "logreg.npz")),
        logreg_model=logreg,
        binary=str(save(binary, d / "binary.npz")),
        binary_data=str(d / "binary_data.npz"),
        zeroed=str(save(zeroed, d / "zeroed.npz")),
        zeroed_model=zeroed,
        x=xte, y=yte)


def run(capsys, *argv):
    """advkern.cli.main(argv) -> (exit code, stdout, stderr)."""
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(rc, out, err, *fragments):
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("advkern: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f.lower() in lines[0].lower(), (f, lines[0])
    return lines[0]


def one_json(out):
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    return obj


def table_rows(out, header_start):
    """The data rows of the table whose header line starts with ``header_start`` (up to a
    blank line or a trailing ``wrote FILE`` line)."""
    lines = out.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    assert set(lines[i + 1].replace(" ", "")) == {"-"}
    rows = []
    for line in lines[i + 2:]:
        if not line.strip() or line.startswith("wrote "):
            break
        rows.append(line.split())
    return rows


# ----------------------------------------------------------------------------- train, info


def test_train_logreg_writes_model_and_prints_table(capsys, tmp_path):
    f = tmp_path / "lr.npz"
    rc, out, err = run(capsys, "train", "--arch", "logreg", "--epochs", "1", "--out", f,
                       "--quiet")
    assert rc == 0, err
    model = load(f)
    assert model.num_params == 7850
    rows = table_rows(out, "model")
    assert len(rows) == 1
    name, epochs, train_acc, test_acc, _secs, backend, saved = rows[0]
    assert (name, epochs, saved) == ("logreg", "1", str(f))
    from advkern.kernels import resolve
    assert backend == resolve("auto")   # training runs on the auto backend by default
    x, y = load_mnist("test")
    # The printed test accuracy is the saved model's.
    assert test_acc == f"{100 * model.accuracy(x, y):.2f}%"
    assert float(test_acc.rstrip("%")) > 70 and float(train_acc.rstrip("%")) > 70


def test_train_without_out_saves_into_the_model_cache(capsys, tmp_path, monkeypatch):
    from advkern.nets import zoo

    monkeypatch.setenv("ADVKERN_CACHE", str(tmp_path / "cache"))
    rc, out, err = run(capsys, "train", "--arch", "logreg", "--epochs", "1", "--quiet")
    assert rc == 0, err
    saved = table_rows(out, "model")[0][-1]
    assert saved == str(zoo.cache_path("logreg", 0, epochs=1))
    trained = load(saved)
    # the cache serves it: no training happens on the next use with these settings
    monkeypatch.setattr(zoo, "train", lambda *a, **k: pytest.fail("trained again"))
    again = zoo.pretrained("logreg", epochs=1)
    for p, q in zip(trained.params, again.params):
        for k in p:
            np.testing.assert_array_equal(p[k], q[k])


def test_train_out_with_two_architectures_is_an_error(capsys, tmp_path):
    rc, out, err = run(capsys, "train", "--arch", "logreg", "mlp", "--out", tmp_path / "m.npz")
    assert_one_error_line(rc, out, err, "--out")
    assert out == "" and not (tmp_path / "m.npz").exists()


def test_info_native(capsys, files):
    rc, out, err = run(capsys, "info", files.mlp)
    assert rc == 0, err
    first = out.splitlines()[0]
    assert "input (N, 1, 28, 28)" in first and "10 logit(s)" in first
    assert f"{784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10:,} parameters" in first
    rows = table_rows(out, "#")
    assert [r[1].split("(")[0] for r in rows] == ["flatten", "dense", "relu", "dense", "relu",
                                                  "dense"]
    assert rows[1][-1] == "200,960"


def test_info_onnx(capsys):
    pytest.importorskip("onnx")
    rc, out, err = run(capsys, "info", ONNX_CNN)
    assert rc == 0, err
    assert "46,346 parameters" in out.splitlines()[0]
    assert sum(line.split()[1].startswith("conv2d") for line in out.splitlines()[2:]) == 3
    assert "(N, 16, 28, 28)" in out and "(N, 10)" in out


# ----------------------------------------------------------------------------- attack

# Small budgets: every attack on 12 images in well under a second.
ATTACK_ARGS = {
    "fgsm": ["--eps", "0.1"],
    "fgm": ["--eps", "1.5"],
    "bim": ["--eps", "0.05", "--steps", "3"],
    "pgd": ["--eps", "0.1", "--alpha", "0.02", "--steps", "3", "--random-start"],
    "mifgsm": ["--eps", "0.1", "--steps", "3", "--decay", "0.9"],
    "deepfool": ["--max-iter", "5", "--overshoot", "0.05"],
    "cw": ["--steps", "20", "--search-steps", "2", "--lr", "0.05"],
    "lbfgs": ["--search-steps", "2", "--max-iter", "5"],
    "jsma": ["--gamma", "0.05"],
    "jsma1": ["--gamma", "0.05"],
    "pixel": ["--popsize", "8", "--generations", "2"],
    "linear": ["--eps", "0.2"],
}


def attack_argv(files, name, n=12):
    if name == "linear":
        return ["attack", "--model", files.binary, "--data", files.binary_data, "--attack", name,
                "--n", n, *ATTACK_ARGS[name]]
    return ["attack", "--model", files.logreg, "--attack", name, "--n", n, *ATTACK_ARGS[name]]


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_table_out_and_json(capsys, files, tmp_path, name):
    n = 12
    out_file = tmp_path / "adv.npz"
    rc, out, err = run(capsys, *attack_argv(files, name, n), "--out", out_file)
    assert rc == 0, err
    model_file = files.binary if name == "linear" else files.logreg
    # --backend defaults to 'auto': the fastest backend here (the exact linear attack is
    # the reference's alone), named in the header and in the saved params
    from advkern.kernels import resolve
    ran = "reference" if name == "linear" else resolve("auto")
    assert out.startswith(f"{name} on {model_file} ({ran} backend): {n} images")
    rows = table_rows(out, "clean acc")
    assert len(rows) == 1 and len(rows[0]) == 7
    assert out.rstrip().endswith(f"wrote {out_file}")

    z = np.load(out_file, allow_pickle=False)
    assert NPZ_KEYS <= set(z.files)
    x, xa, y = z["x"], z["x_adv"], z["y"]
    assert x.shape == xa.shape == (n, 1, 28, 28) and xa.dtype == x.dtype == np.float32
    for k in ("y", "pred", "pred_adv", "success", "l0", "l2", "linf"):
        assert z[k].shape == (n,), k
    params = json.loads(str(z["params"]))
    assert params["attack"] == name and params["seed"] == 0 and params["backend"] == ran
    assert 0 <= xa.min() and xa.max() <= 1
    model = load(model_file)
    np.testing.assert_array_equal(z["pred"], model.predict(x))
    np.testing.assert_array_equal(z["pred_adv"], model.predict(xa))
    d = (xa.astype(np.float64) - x).reshape(n, -1)
    np.testing.assert_allclose(z["linf"], np.abs(d).max(1))
    np.testing.assert_allclose(z["l2"], np.sqrt((d * d).sum(1)))
    np.testing.assert_array_equal(z["l0"], np.count_nonzero(d, axis=1))
    if name in ("jsma", "jsma1"):
        assert params["targeted"] is True
        np.testing.assert_array_equal(z["success"], z["pred_adv"] == (y + 1) % 10)
        assert z["l0"].max() <= math.floor(0.05 * 784)
    else:
        np.testing.assert_array_equal(z["success"], z["pred_adv"] != y)
    eps = float(ATTACK_ARGS[name][1]) if ATTACK_ARGS[name][0] == "--eps" else None
    if name == "fgm":
        assert z["l2"].max() <= eps * (1 + 1e-5)
    elif eps is not None:
        assert z["linf"].max() <= eps + 1e-6
        assert params["eps"] == eps
    if name == "pixel":
        assert z["l0"].max() <= 1
        assert z["info_attack_success"].shape == (n,) and z["info_candidate"].shape == (n, 1, 3)

    rc, out, err = run(capsys, *attack_argv(files, name, n), "--json")
    assert rc == 0, err
    obj = one_json(out)
    assert set(obj) == {"model", "params", "metrics", "seconds"}
    assert obj["model"] == model_file and obj["params"]["attack"] == name
    assert obj["metrics"]["n"] == n and obj["seconds"] >= 0
    assert obj["metrics"]["success_rate"] == pytest.approx(z["success"].mean())
    assert obj["metrics"]["clean_accuracy"] == pytest.approx(np.mean(z["pred"] == y))


@pytest.mark.parametrize("name,extra", [("fgsm", ["--eps", "0.3"]),
                                        ("pgd", ["--eps", "0.2", "--alpha", "0.05",
                                                 "--steps", "5"])])
def test_attack_targeted_next(capsys, files, tmp_path, name, extra):
    out_file = tmp_path / "t.npz"
    rc, out, err = run(capsys, "attack", "--model", files.logreg, "--attack", name, "--n", 20,
                       "--targeted", "--target", "next", *extra, "--out", out_file, "--json")
    assert rc == 0, err
    obj = one_json(out)
    assert obj["params"]["targeted"] is True
    z = np.load(out_file)
    t = (z["y"] + 1) % 10
    np.testing.assert_array_equal(z["success"], z["pred_adv"] == t)
    assert obj["metrics"]["success_rate"] == pytest.approx(np.mean(z["pred_adv"] == t))
    # A targeted attack with this budget on logreg reaches most targets.
    assert obj["metrics"]["success_rate"] > 0.5


def test_attack_target_without_targeted_is_an_error(capsys, files):
    rc, out, err = run(capsys, "attack", "--model", files.logreg, "--attack", "fgsm", "--n", 3,
                       "--target", "next")
    assert_one_error_line(rc, out, err, "--targeted")


def test_attack_png_panels(capsys, files, tmp_path):
    pytest.importorskip("matplotlib")
    d = tmp_path / "panels"
    rc, out, err = run(capsys, "attack", "--model", files.logreg, "--attack", "fgsm", "--n", 4,
                       "--png", d, "--png-max", 3)
    assert rc == 0, err
    pngs = sorted(p.name for p in d.iterdir())
    assert pngs == ["panel_0000.png", "panel_0001.png", "panel_0002.png"]
    assert (d / pngs[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kind", ["float", "uint8"])
def test_attack_data_file(capsys, files, tmp_path, kind):
    x, y = files.x[100:108], files.y[100:108]
    if kind == "uint8":
        x8 = np.round(x[:, 0] * 255).astype(np.uint8)  # (N, 28, 28)
        np.savez(tmp_path / "d.npz", x=x8, y=y)
        expect = x8.astype(np.float32)[:, None] / 255
    else:
        np.savez(tmp_path / "d.npz", x=x, y=y)
        expect = x
    rc, out, err = run(capsys, "attack", "--model", files.logreg, "--attack", "fgsm",
                       "--data", tmp_path / "d.npz", "--n", 6, "--out", tmp_path / "o.npz")
    assert rc == 0, err
    assert ": 6 images" in out
    z = np.load(tmp_path / "o.npz")
    assert z["x"].shape == (6, 1, 28, 28)
    np.testing.assert_array_equal(z["x"], expect[:6])
    np.testing.assert_array_equal(z["y"], y[:6])


# ----------------------------------------------------------------------------- grad


def test_grad_matches_reference(capsys, files, tmp_path):
    g = tmp_path / "g.npz"
    rc, out, err = run(capsys, "grad", "--model", files.mlp, "--n", 3, "--dtype", "float64",
                       "--out", g)
    assert rc == 0, err
    assert f"wrote {g}" in out
    z = np.load(g)
    assert z["logits"].shape == (3, 10) and z["grad"].shape == (3, 1, 28, 28)
    assert z["jacobian"].shape == (3, 10, 784)
    for k in ("x", "logits", "loss", "grad", "jacobian"):
        assert z[k].dtype == np.float64, k
    x, y = z["x"], z["y"]
    np.testing.assert_array_equal(x, load_mnist("test", dtype=np.float64)[0][:3])
    np.testing.assert_array_equal(y, files.y[:3])
    model = load(files.mlp)
    np.testing.assert_array_equal(z["logits"], network.forward(model, x)[0])
    loss, grad = network.loss_and_input_grad(model, x, y, "ce")
    np.testing.assert_array_equal(z["loss"], loss)
    np.testing.assert_array_equal(z["grad"], grad)
    np.testing.assert_array_equal(z["jacobian"], network.jacobian(model, x))
    # float64 all the way: the same as a float64 copy of the model (no float32 rounding).
    m64 = model.astype(np.float64)
    np.testing.assert_allclose(z["grad"], network.loss_and_input_grad(m64, x, y, "ce")[1],
                               rtol=1e-12, atol=1e-15)
    assert str(z["loss_name"]) == "ce"


def test_grad_float32_cw(capsys, files, tmp_path):
    g = tmp_path / "g.npz"
    rc, _, err = run(capsys, "grad", "--model", files.logreg, "--n", 2, "--dtype", "float32",
                     "--loss", "cw", "--out", g)
    assert rc == 0, err
    z = np.load(g)
    assert z["grad"].dtype == np.float32 and str(z["loss_name"]) == "cw"
    model = load(files.logreg)
    np.testing.assert_array_equal(z["grad"],
                                  network.loss_and_input_grad(model, z["x"], z["y"], "cw")[1])


# ----------------------------------------------------------------------------- verify


@pytest.mark.parametrize("name,extra", [("fgsm", ["--eps", "0.1"]),
                                        ("pgd", ["--eps", "0.1", "--alpha", "0.02", "--steps",
                                                 "3", "--random-start", "--seed", "5"])])
def test_verify_own_output_is_identical(capsys, files, tmp_path, name, extra):
    c = tmp_path / "c.npz"
    common = ["--model", files.logreg, "--attack", name, "--n", 10, *extra]
    assert run(capsys, "attack", *common, "--out", c)[0] == 0
    rc, out, err = run(capsys, "verify", *common, "--candidate", c)
    assert rc == 0, err
    assert "10/10 images identical" in out
    assert len(table_rows(out, "image")) == 10
    if name == "pgd":  # random start: no sign-tie analysis
        assert "tie analysis n/a" in out
    rc, out, err = run(capsys, "verify", *common, "--candidate", c, "--json")
    assert rc == 0, err
    rep = one_json(out)
    assert rep["attack"] == name
    s = rep["summary"]
    assert s["agree"] is True and s["images_identical"] == s["n"] == 10
    assert s["n_diff"] == 0 and s["max_abs_diff"] == 0.0 and s["frac_equal"] == 1.0


def test_verify_lists_the_images_that_differ_first(capsys, files, tmp_path):
    c = tmp_path / "c.npz"
    common = ["--model", files.logreg, "--attack", "fgsm", "--n", 10, "--eps", "0.1"]
    assert run(capsys, "attack", *common, "--out", c)[0] == 0
    z = dict(np.load(c))
    z["x_adv"][7, 0, 3, 3] = 1 - z["x_adv"][7, 0, 3, 3]      # image 7 now differs
    np.savez(c, **z)
    rc, out, err = run(capsys, "verify", *common, "--candidate", c, "--show", 2)
    assert rc == 1, (out, err)
    rows = table_rows(out, "image")
    assert [r[0] for r in rows] == ["7", "0"] and rows[0][3] == "1"


def test_verify_candidate_without_x_uses_test_images(capsys, files, tmp_path):
    c = tmp_path / "c.npz"
    assert run(capsys, "attack", "--model", files.logreg, "--attack", "fgsm", "--n", 5,
               "--out", c)[0] == 0
    np.savez(tmp_path / "only.npz", x_adv=np.load(c)["x_adv"])
    rc, out, err = run(capsys, "verify", "--model", files.logreg, "--attack", "fgsm",
                       "--candidate", tmp_path / "only.npz")
    assert rc == 0, err
    assert "5/5 images identical" in out


def _fgsm_candidate(files, n=6, eps=0.1):
    """(x, y, x_adv): our own FGSM result on the zero-row model, the base of a candidate."""
    from advkern.attacks import run_attack
    x, y = files.x[:n], files.y[:n]
    return x, y, run_attack(files.zeroed_model, x, y, "fgsm", eps=eps).x_adv


def test_verify_sign_ties_explain_differences(capsys, files, tmp_path):
    x, y, xa = _fgsm_candidate(files)
    _, g = network.loss_and_input_grad(files.zeroed_model, x, y)
    flat_g = g.reshape(len(x), -1)
    assert not flat_g[:, :84].any()  # exact zeros where the weight rows are zero
    # Another implementation with sign(0) = +1: moves some zero-gradient pixels by +eps.
    cand = xa.copy().reshape(len(x), -1)
    moved = [(0, 3), (0, 40), (0, 83), (2, 10), (2, 11)]
    for i, j in moved:
        assert x.reshape(len(x), -1)[i, j] == 0 and cand[i, j] == 0
        cand[i, j] = np.float32(0.1)
    np.savez(tmp_path / "c.npz", x=x, y=y, x_adv=cand.reshape(x.shape))
    argv = ["verify", "--model", files.zeroed, "--attack", "fgsm", "--eps", "0.1",
            "--candidate", tmp_path / "c.npz"]
    rc, out, err = run(capsys, *argv)
    assert rc == 0, (out, err)
    assert "4/6 images identical" in out
    assert "5/5 differing pixels are gradient-sign ties" in out
    rows = {int(r[0]): r for r in table_rows(out, "image")}
    assert rows[0][3:] == ["3", "3"] and rows[2][3:] == ["2", "2"] and rows[1][3:] == ["0", "0"]
    rc, out, err = run(capsys, *argv, "--json")
    assert rc == 0, err
    rep = one_json(out)
    s = rep["summary"]
    assert s["agree"] is True and s["n_diff"] == 5 and s["diff_explained_by_ties"] == 5
    assert s["images_identical"] == 4 and s["max_abs_diff"] == pytest.approx(0.1)
    assert [r["n_tie"] for r in rep["images"]] == [3, 0, 2, 0, 0, 0]


def _large_gradient_candidate(files, tmp_path):
    """Candidate that steps against the gradient at image 0's largest-|grad| pixel."""
    x, y, xa = _fgsm_candidate(files)
    _, g = network.loss_and_input_grad(files.zeroed_model, x, y)
    j = int(np.abs(g[0].ravel()).argmax())
    cand = xa.copy().reshape(len(x), -1)
    x0 = x.reshape(len(x), -1)[0, j]
    cand[0, j] = np.clip(x0 - np.float32(0.1) * np.sign(g[0].ravel()[j]), 0, 1)
    assert cand[0, j] != xa.reshape(len(x), -1)[0, j]
    np.savez(tmp_path / "c.npz", x=x, y=y, x_adv=cand.reshape(x.shape))
    return ["verify", "--model", files.zeroed, "--attack", "fgsm", "--eps", "0.1",
            "--candidate", tmp_path / "c.npz"]


def test_verify_reports_real_disagreement(capsys, files, tmp_path):
    argv = _large_gradient_candidate(files, tmp_path)
    rc, out, err = run(capsys, *argv)
    assert rc == 1, (out, err)
    assert "5/6 images identical" in out
    assert "0/1 differing pixels are gradient-sign ties" in out
    rc, out, err = run(capsys, *argv, "--json")
    rep = one_json(out)
    s = rep["summary"]
    assert s["agree"] is False and s["n_diff"] == 1 and s["diff_explained_by_ties"] == 0
    assert rep["images"][0]["n_diff"] == 1 and rep["images"][0]["n_tie"] == 0
    # The two sign steps differ by 2 eps, or by eps where the box clips one of them.
    assert 0.1 - 1e-6 <= s["max_abs_diff"] <= 0.2 + 1e-6


def test_verify_json_exit_status_is_the_verdict(capsys, files, tmp_path):
    argv = _large_gradient_candidate(files, tmp_path)
    rc, out, _ = run(capsys, *argv, "--json")
    assert one_json(out)["summary"]["agree"] is False
    assert rc == 1


def test_verify_candidate_errors(capsys, files, tmp_path):
    np.savez(tmp_path / "nox.npz", x=files.x[:2])
    rc, out, err = run(capsys, "verify", "--model", files.logreg, "--attack", "fgsm",
                       "--candidate", tmp_path / "nox.npz")
    assert_one_error_line(rc, out, err, "x_adv")
    np.savez(tmp_path / "shape.npz", x=files.x[:2], y=files.y[:2], x_adv=files.x[:2, :, :5])
    rc, out, err = run(capsys, "verify", "--model", files.logreg, "--attack", "fgsm",
                       "--candidate", tmp_path / "shape.npz")
    assert_one_error_line(rc, out, err)
    rc, out, err = run(capsys, "verify", "--model", files.logreg, "--attack", "fgsm",
                       "--candidate", tmp_path / "missing.npz")
    assert_one_error_line(rc, out, err, "missing.npz")


# ----------------------------------------------------------------------------- sweep


def test_sweep_fgsm(capsys, files, tmp_path):
    png = tmp_path / "sweep.png"
    argv = ["sweep", "--model", files.logreg, "--attack", "fgsm", "--eps", "0,0.1,0.2",
            "--n", 20]
    try:
        import matplotlib  # noqa: F401
        argv += ["--png", png]
        has_mpl = True
    except ImportError:
        has_mpl = False
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    rows = table_rows(out, "eps")
    assert [r[0] for r in rows] == ["0", "0.1", "0.2"]
    acc = [float(r[1].rstrip("%")) for r in rows]
    assert acc[0] == pytest.approx(100 * files.logreg_model.accuracy(files.x[:20], files.y[:20]))
    assert acc[0] >= acc[1] >= acc[2] and acc[0] > acc[2]
    if has_mpl:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"wrote {png}" in out


def test_sweep_pgd_and_bad_eps(capsys, files):
    rc, out, err = run(capsys, "sweep", "--model", files.logreg, "--attack", "pgd", "--eps",
                       "0.05,0.1", "--steps", 2, "--n", 10)
    assert rc == 0, err
    assert len(table_rows(out, "eps")) == 2
    rc, out, err = run(capsys, "sweep", "--model", files.logreg, "--eps", "0,abc", "--n", 5)
    assert_one_error_line(rc, out, err, "--eps")
    rc, out, err = run(capsys, "sweep", "--model", files.logreg, "--eps", ",", "--n", 5)
    assert_one_error_line(rc, out, err, "--eps")


# ----------------------------------------------------------------------------- bad input


def _bad_files(files, tmp_path):
    (tmp_path / "corrupt.npz").write_bytes(b"this is not a zip file\n" * 10)
    np.savez(tmp_path / "noy.npz", x=files.x[:3])


BAD = {
    "missing model file": (["attack", "--model", "{tmp}/nope.npz", "--attack", "fgsm", "--n",
                            "3"], "nope.npz"),
    "corrupt model file": (["attack", "--model", "{tmp}/corrupt.npz", "--attack", "fgsm", "--n",
                            "3"], "corrupt.npz"),
    "unknown architecture": (["attack", "--model", "resnet", "--attack", "fgsm", "--n", "3"],
                             "resnet"),
    "info on corrupt file": (["info", "{tmp}/corrupt.npz"], "corrupt.npz"),
    "eps -1": (["attack", "--model", "{mlp}", "--attack", "fgsm", "--n", "3", "--eps", "-1"],
               "eps"),
    "eps nan": (["attack", "--model", "{mlp}", "--attack", "pgd", "--n", "3", "--eps", "nan"],
                "eps"),
    "steps 0": (["attack", "--model", "{mlp}", "--attack", "pgd", "--n", "3", "--steps", "0"],
                "steps"),
    "n too large": (["attack", "--model", "{mlp}", "--attack", "fgsm", "--n", "5000"], "5000"),
    "n 0": (["attack", "--model", "{mlp}", "--attack", "fgsm", "--n", "0"], "--n"),
    "target 12": (["attack", "--model", "{mlp}", "--attack", "fgsm", "--n", "3", "--targeted",
                   "--target", "12"], "target"),
    "target word": (["attack", "--model", "{mlp}", "--attack", "pgd", "--n", "3", "--targeted",
                     "--target", "prev"], "target"),
    "targeted without target": (["attack", "--model", "{mlp}", "--attack", "fgsm", "--n", "3",
                                 "--targeted"], "target"),
    "data without y": (["attack", "--model", "{mlp}", "--attack", "fgsm", "--data",
                        "{tmp}/noy.npz"], "'y'"),
    "missing data file": (["attack", "--model", "{mlp}", "--attack", "fgsm", "--data",
                           "{tmp}/nodata.npz"], "nodata.npz"),
    "grad missing model": (["grad", "--model", "{tmp}/nope.npz", "--out", "{tmp}/g.npz"],
                           "nope.npz"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_error_line(capsys, files, tmp_path, case):
    _bad_files(files, tmp_path)
    argv, fragment = BAD[case]
    argv = [a.format(tmp=tmp_path, mlp=files.mlp) for a in argv]
    rc, out, err = run(capsys, *argv)
    assert_one_error_line(rc, out, err, fragment)
    assert out == ""


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_data_file_is_one_error_line(capsys, files, tmp_path, kind):
    f = tmp_path / "bad.npz"
    if kind == "garbage":
        f.write_bytes(b"not an npz\n" * 10)
    else:
        np.savez(tmp_path / "good.npz", x=files.x[:3], y=files.y[:3])
        data = (tmp_path / "good.npz").read_bytes()
        f.write_bytes(data[: len(data) // 2])
    rc, out, err = run(capsys, "attack", "--model", files.mlp, "--attack", "fgsm", "--data", f)
    assert_one_error_line(rc, out, err, "bad.npz")


def test_truncated_candidate_is_one_error_line(capsys, files, tmp_path):
    np.savez(tmp_path / "good.npz", x_adv=files.x[:3])
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "c.npz").write_bytes(data[: len(data) // 2])
    rc, out, err = run(capsys, "verify", "--model", files.mlp, "--attack", "fgsm",
                       "--candidate", tmp_path / "c.npz")
    assert_one_error_line(rc, out, err, "c.npz")


def test_garbage_candidate_is_one_error_line(capsys, files, tmp_path):
    (tmp_path / "c.npz").write_bytes(b"not an npz\n" * 10)
    rc, out, err = run(capsys, "verify", "--model", files.mlp, "--attack", "fgsm",
                       "--candidate", tmp_path / "c.npz")
    assert_one_error_line(rc, out, err, "c.npz")


def test_attack_choices_are_the_api_attacks():
    from advkern.attacks import ATTACKS as API_ATTACKS
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    for cmd in ("attack", "verify"):
        act = next(a for a in sub.choices[cmd]._actions if a.dest == "attack")
        assert list(act.choices) == list(API_ATTACKS) == ATTACKS


def test_argparse_errors_exit_2(capsys):
    for argv in (["attack", "--attack", "nope"], ["frobnicate"], []):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
    assert "advkern" in capsys.readouterr().err


# ----------------------------------------------------------------------------- entry point


def _python_m(*argv):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "advkern", *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_python_m_entry_point(files):
    p = _python_m("info", files.logreg)
    assert p.returncode == 0, p.stderr
    assert "7,850 parameters" in p.stdout
    p = _python_m("--version")
    assert p.returncode == 0 and p.stdout.strip().startswith("advkern ")


def test_python_m_bad_input_no_traceback(files, tmp_path):
    p = _python_m("attack", "--model", tmp_path / "nope.npz", "--attack", "fgsm", "--n", 3)
    assert p.returncode == 2
    assert p.stdout == ""
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("advkern: error: ") and "nope.npz" in lines[0]
    p = _python_m("attack", "--model", files.mlp, "--attack", "fgsm", "--n", 3, "--eps", "nan")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]


@pytest.mark.parametrize("cmd", ["attack", "sweep"])
def test_png_without_matplotlib_fails_before_any_work(capsys, files, tmp_path, monkeypatch,
                                                      cmd):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # as if it were not installed
    argv = [cmd, "--model", files.logreg, "--attack", "fgsm", "--n", 4, "--png",
            tmp_path / "p"]
    if cmd == "sweep":
        argv += ["--eps", "0,0.1"]
    called = []
    monkeypatch.setattr("advkern.attacks.run_attack", lambda *a, **k: called.append(1))
    rc, out, err = run(capsys, *argv)
    assert_one_error_line(rc, out, err, "matplotlib")
    assert not called and not (tmp_path / "p").exists()


def test_info_onnx_with_softmax_says_so_in_one_note_line(capsys):
    pytest.importorskip("onnx")
    path = Path(__file__).parent / "data" / "onnx" / "small_legacy.onnx"
    rc, out, err = run(capsys, "info", path)
    assert rc == 0, err
    lines = err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"advkern: note: {path}: dropped the trailing Softmax")
    assert "UserWarning" not in err and "warnings.warn" not in err


@pytest.mark.parametrize("argv,fragment", [
    ([], "COMMAND"),
    (["attack", "--attack", "nope"], "invalid choice: 'nope'"),
    (["attack", "--attack", "fgsm", "--eps", "x"], "--eps"),
    (["attack"], "--attack"),
    (["frobnicate"], "invalid choice"),
])
def test_argument_errors_are_one_line_and_exit_2(capsys, argv, fragment):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert_one_error_line(e.value.code, out, err, fragment)


def test_bench_help_without_a_source_checkout(capsys, monkeypatch):
    import importlib

    real = importlib.import_module

    def no_bench(name, *a, **k):
        if name.startswith("bench"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_bench)
    rc, out, err = run(capsys, "bench", "--help")
    assert rc == 0 and out.startswith("usage: advkern bench") and "source checkout" in out
    rc, out, err = run(capsys, "bench", "--quick")
    assert_one_error_line(rc, out, err, "source checkout")
