"""Bad input through the API and the CLI, table-driven: each case must raise AdvkernError (or
the named subclass) with a message naming the problem, or for the CLI exit 2 with exactly one
'advkern: error:' line and no traceback; nothing the caller passed may change.

The cases are the classes a fuzz run found (issue 11): masked arrays, non-models, labels and
targets out of range or fractional, a target without targeted, string boxes, too many
pixels, wrong-length seed arrays, NaN pixels reaching the gradient functions, integer
inputs, bad paths, deeply nested model JSON, a file where the cache folder should be, and
the CLI's checks that must come before any work.
"""

import json
import sys
import zipfile

import numpy as np
import pytest

import advkern
from advkern import cli, engine
from advkern.attacks import run_attack
from advkern.errors import AdvkernError, ModelFileError, ShapeError
from advkern.nets import Dense, Flatten, ReLU, Sequential, datasets
from advkern.reference import network
from advkern.reference.losses import get_loss
from advkern.verify import compare

SHAPE = (1, 4, 4)


def model():
    return Sequential([Flatten(), Dense(6), ReLU(), Dense(3)], SHAPE, seed=0,
                      dtype=np.float64)


def data(n=5):
    rng = np.random.default_rng(0)
    return rng.random((n, *SHAPE)), rng.integers(0, 3, n)


def _masked():
    x, _ = data()
    return np.ma.array(x, mask=np.zeros(x.shape, bool) | (np.arange(x.size).reshape(x.shape)
                                                           == 3))


def _nan_x():
    x, _ = data()
    x[1, 0, 2, 2] = np.nan
    return x


M = model()
X, Y = data()

# (id, call, expected error class, a fragment the message must contain)
API_CASES = [
    ("masked x, attack", lambda: run_attack(M, _masked(), Y, "fgsm"), AdvkernError, "masked"),
    ("masked x, gradient", lambda: network.loss_and_input_grad(M, _masked(), Y), AdvkernError,
     "masked"),
    ("model None", lambda: run_attack(None, X, Y, "fgsm"), AdvkernError, "model must be"),
    ("model path string", lambda: run_attack("mlp.npz", X, Y, "fgsm"), AdvkernError,
     "advkern.load"),
    ("model dict", lambda: network.jacobian({"layers": []}, X), AdvkernError, "model must be"),
    ("engine backend object", lambda: engine.pgd(M, X, Y, 0.1, 0.01, 2, backend=object()),
     AdvkernError, "backend"),
    ("engine unknown backend", lambda: engine.fgsm(M, X, Y, 0.1, backend="tpu"), AdvkernError,
     "unknown backend"),
    ("label >= K, gradient", lambda: network.loss_and_input_grad(M, X, np.full(5, 3)),
     AdvkernError, "out of range"),
    ("label >= K, param grads", lambda: network.loss_and_param_grads(M, X, np.full(5, 7)),
     AdvkernError, "out of range"),
    ("fractional labels", lambda: network.loss_and_input_grad(M, X, Y + 0.5), AdvkernError,
     "integer"),
    ("NaN pixel, gradient", lambda: network.loss_and_input_grad(M, _nan_x(), Y), AdvkernError,
     "NaN"),
    ("NaN pixel, jacobian", lambda: network.jacobian(M, _nan_x()), AdvkernError, "NaN"),
    ("uint8 x, jacobian", lambda: network.jacobian(M, (X * 255).astype(np.uint8)),
     AdvkernError, "float32 or float64"),
    ("string x", lambda: network.jacobian(M, "x"), AdvkernError, "float32 or float64"),
    ("unknown loss, gradient", lambda: network.loss_and_input_grad(M, X, Y, "foo"),
     AdvkernError, "unknown loss"),
    ("unknown loss, get_loss", lambda: get_loss("foo"), AdvkernError, "unknown loss"),
    ("target without targeted", lambda: run_attack(M, X, Y, "fgsm", target=1), AdvkernError,
     "targeted=True"),
    ("fractional target", lambda: run_attack(M, X, Y, "fgsm", targeted=True, target=1.7),
     AdvkernError, "integer"),
    ("target 2.5 is not 'the true label'",
     lambda: run_attack(M, X, Y, "pgd", targeted=True, target=2.5), AdvkernError, "integer"),
    ("wrong-length target array",
     lambda: run_attack(M, X, Y, "fgsm", targeted=True, target=np.array([1, 2])), ShapeError,
     "target"),
    ("target out of range", lambda: run_attack(M, X, Y, "fgsm", targeted=True, target=9),
     AdvkernError, "out of range"),
    ("clip as a string", lambda: run_attack(M, X, Y, "fgsm", clip="01"), AdvkernError, "clip"),
    ("more pixels than the image has",
     lambda: run_attack(M, X, Y, "pixel", pixels=17, popsize=4, generations=1), AdvkernError,
     "pixels"),
    ("wrong-length seed array", lambda: run_attack(M, X, Y, "pgd", seed=np.arange(3)),
     AdvkernError, "seed"),
    ("seed 2**70", lambda: run_attack(M, X, Y, "pgd", random_start=True, seed=2 ** 70,
                                       steps=1), AdvkernError, "2**63"),
    ("load(int)", lambda: advkern.load(999999), ModelFileError, "path"),
    ("load(None)", lambda: advkern.load(None), ModelFileError, "path"),
    ("load_model(None)", lambda: advkern.load_model(None), ModelFileError, "path"),
    ("load_mnist unknown split", lambda: datasets.load_mnist("foo"), AdvkernError, "split"),
    ("verify tie_rtol < 0", lambda: compare(M, X, Y, run_attack(M, X, Y, "fgsm"), X, "fgsm",
                                            {"eps": 0.1}, tie_rtol=-1), AdvkernError,
     "tie_rtol"),
    ("verify tie_rtol NaN", lambda: compare(M, X, Y, run_attack(M, X, Y, "fgsm"), X, "fgsm",
                                            {"eps": 0.1}, tie_rtol=float("nan")),
     AdvkernError, "tie_rtol"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_is_a_clear_error_and_mutates_nothing(case):
    _, call, err, fragment = case
    before = (X.copy(), Y.copy(), [{k: a.copy() for k, a in p.items()} for p in M.params])
    with pytest.raises(err) as e:
        call()
    assert fragment.lower() in str(e.value).lower(), str(e.value)
    np.testing.assert_array_equal(X, before[0])
    np.testing.assert_array_equal(Y, before[1])
    for p, q in zip(M.params, before[2]):
        for k in p:
            np.testing.assert_array_equal(p[k], q[k])


def test_plain_data_in_other_forms_is_accepted():
    """Lists, read-only, non-contiguous and unmasked masked arrays are plain data."""
    ref = run_attack(M, X, Y, "fgsm", eps=0.1, backend="reference").x_adv
    ro = X.copy()
    ro.flags.writeable = False
    wide = np.zeros((5, 1, 4, 8))
    wide[..., ::2] = X
    for form in (X.tolist(), ro, wide[..., ::2], np.ma.array(X)):
        got = run_attack(M, form, list(Y), "fgsm", eps=0.1, backend="reference").x_adv
        np.testing.assert_array_equal(got, ref)


def test_verify_counts_a_nan_candidate_pixel_as_different():
    ours = run_attack(M, X, Y, "fgsm", eps=0.1, backend="reference")
    cand = ours.x_adv.copy()
    cand[2, 0, 1, 1] = np.nan
    rep = compare(M, X, Y, ours, cand, "fgsm", {"eps": 0.1})
    assert rep["summary"]["n_diff"] == 1 and rep["summary"]["agree"] is False


def test_deeply_nested_model_json_is_a_model_file_error(tmp_path):
    good = tmp_path / "m.npz"
    advkern.save(M, good)
    with zipfile.ZipFile(good) as z:
        assert "__advkern__.npy" in z.namelist()     # the model description (JSON)
    bad = tmp_path / "deep.npz"
    z = dict(np.load(good, allow_pickle=False))
    z["__advkern__"] = np.array("[" * 100_000 + "]" * 100_000)
    np.savez(bad, **z)
    with pytest.raises(ModelFileError, match="nested"):
        advkern.load(bad)


def test_a_file_where_the_cache_folder_should_be(tmp_path, monkeypatch):
    from advkern.nets import zoo

    f = tmp_path / "cache"
    f.write_text("not a folder")
    monkeypatch.setenv("ADVKERN_CACHE", str(f))
    with pytest.raises(AdvkernError, match="ADVKERN_CACHE"):
        zoo.pretrained("logreg", epochs=1)
    assert f.read_text() == "not a folder"


# ----------------------------------------------------------------------------- CLI


def one_error_line(capsys, argv, fragment):
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:        # argparse
        rc = e.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("advkern: error: "), err
    assert "Traceback" not in err and fragment.lower() in lines[0].lower(), lines[0]
    return out


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if an attack or training starts: the error must come first."""
    monkeypatch.setattr("advkern.attacks.run_attack",
                        lambda *a, **k: pytest.fail("the attack ran before the error"))
    monkeypatch.setattr("advkern.nets.train.train",
                        lambda *a, **k: pytest.fail("training ran before the error"))


@pytest.fixture
def files(tmp_path):
    m = tmp_path / "m.npz"
    advkern.save(Sequential([Flatten(), Dense(10)], (1, 28, 28), seed=0), m)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(np.random.default_rng(0).bytes(300))
    folder_file = tmp_path / "plain_file"
    folder_file.write_text("x")
    return {"model": m, "junk": junk, "file": folder_file, "tmp": tmp_path}


CLI_CASES = [
    ("train --out-dir FILE", lambda f: ["train", "--arch", "logreg", "--out-dir", f["file"]],
     "is a file"),
    ("train --seed -1", lambda f: ["train", "--arch", "logreg", "--seed", -1], "--seed"),
    ("train --lr 0", lambda f: ["train", "--arch", "logreg", "--lr", 0], "--lr"),
    ("train --lr -0.1", lambda f: ["train", "--arch", "logreg", "--lr", -0.1], "--lr"),
    ("train --lr nan", lambda f: ["train", "--arch", "logreg", "--lr", "nan"], "--lr"),
    ("train --out into a missing folder",
     lambda f: ["train", "--arch", "logreg", "--out", f["tmp"] / "no" / "m.npz"],
     "does not exist"),
    ("attack --out a folder", lambda f: ["attack", "--model", f["model"], "--attack", "fgsm",
                                         "--out", f["tmp"]], "folder"),
    ("attack --data random bytes", lambda f: ["attack", "--model", f["model"], "--attack",
                                              "fgsm", "--data", f["junk"]],
     "not an .npz archive"),
    ("demo --backend foo", lambda f: ["demo", "--backend", "foo"], "unknown backend"),
    ("verify --tie-rtol -1", lambda f: ["verify", "--model", f["model"], "--attack", "fgsm",
                                        "--candidate", f["model"], "--tie-rtol", -1],
     "--tie-rtol"),
    ("verify --tie-rtol nan", lambda f: ["verify", "--model", f["model"], "--attack", "fgsm",
                                         "--candidate", f["model"], "--tie-rtol", "nan"],
     "--tie-rtol"),
    ("unknown attack", lambda f: ["attack", "--attack", "nope"], "invalid choice"),
    ("model file is not a model", lambda f: ["attack", "--model", f["junk"], "--attack",
                                             "fgsm"], "junk.npz"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_error_line_before_any_work(case, files, capsys, no_work,
                                                        monkeypatch, tmp_path):
    monkeypatch.setenv("ADVKERN_CACHE", str(tmp_path / "cache"))
    _, argv, fragment = case
    before = {p: p.read_bytes() for p in (files["model"], files["junk"], files["file"])}
    one_error_line(capsys, argv(files), fragment)
    for p, b in before.items():
        assert p.read_bytes() == b


def test_attack_out_writes_exactly_the_path_it_names(files, capsys, tmp_path):
    out = tmp_path / "result_without_extension"
    rc = cli.main(["attack", "--model", str(files["model"]), "--attack", "fgsm", "--n", "3",
                   "--out", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 0 and out.exists() and not (tmp_path / "result_without_extension.npz").exists()
    assert f"wrote {out}" in stdout
    assert json.loads(str(np.load(out)["params"]))["attack"] == "fgsm"


def test_no_pickle_payload_ever_runs(tmp_path, capsys):
    """An .npz carrying a pickled object (its payload would write a marker file)."""
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.npz"
    np.savez(bad, x=np.array([Payload()], dtype=object), y=np.zeros(1, np.int64))
    assert pickle.dumps(Payload())          # the payload is a real pickle
    m = tmp_path / "m.npz"
    advkern.save(Sequential([Flatten(), Dense(10)], (1, 28, 28), seed=0), m)
    for argv in (["attack", "--model", m, "--attack", "fgsm", "--data", bad], ["info", bad]):
        try:
            cli.main([str(a) for a in argv])
        except SystemExit:
            pass
        capsys.readouterr()
    with pytest.raises((ModelFileError, AdvkernError)):
        advkern.load(bad)
    assert not marker.exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


# ----------------------------------------------------------------------------- parameters
#
# Every attack parameter with values of the wrong kind: each must be an AdvkernError that
# names the parameter, raised before any work, on the reference and on every fast backend.

_POS_INT = [0, -3, 1.5, "4", True, float("nan")]
_BAD = {
    "eps": [-0.1, float("nan"), float("inf"), "0.1", [0.1, 0.2], True],
    "alpha": [0.0, -0.01, float("nan"), float("inf"), "x"],
    "steps": _POS_INT,
    "restarts": [0, -1, 2.5, "2"],
    "norm": ["3", 0, "l7", 2.5],
    "loss": ["mse", 3],
    "l1_sparsity": [-0.1, 1.5, float("nan"), "0.9"],
    "theta": [0.0, float("nan"), float("inf"), "1"],
    "gamma": [0.0, -0.1, 1.5, float("nan"), "0.1"],
    "pixels": [0, -1, 1.5, 17, "1"],
    "popsize": [3, 0, 2.5, "10"],
    "generations": [0, -2, 1.5],
    "F": [0.0, -0.5, 2.5, float("nan")],
    "CR": [-0.1, 1.5, float("nan")],
    "clip": [(1.0, 0.0), (0.0, float("nan")), "01", (0.0,), 5],
    "decay": [-0.5, float("nan"), float("inf"), "1", True],
}
_FOR = {"eps": ["fgsm", "fgm", "bim", "pgd", "mifgsm"], "alpha": ["bim", "pgd", "mifgsm"],
        "steps": ["bim", "pgd", "mifgsm"], "decay": ["mifgsm"],
        "restarts": ["pgd"], "norm": ["pgd"], "loss": ["fgsm", "pgd"],
        "l1_sparsity": ["pgd"], "theta": ["jsma", "jsma1"], "gamma": ["jsma", "jsma1"],
        "pixels": ["pixel"], "popsize": ["pixel"], "generations": ["pixel"], "F": ["pixel"],
        "CR": ["pixel"], "clip": ["fgsm", "pgd", "jsma", "pixel"]}
_EXTRA = {"pgd": {"steps": 1}, "bim": {"steps": 1, "alpha": 0.01}, "pixel": {"popsize": 4,
          "generations": 1}, "jsma": {"gamma": 0.2}, "jsma1": {"gamma": 0.2}}
_NEEDS = {"restarts": {"random_start": True}, "l1_sparsity": {"norm": 1}}

PARAM_CASES = [(attack, name, value) for name, values in _BAD.items()
               for attack in _FOR[name] for value in values]


def _backends():
    from advkern import kernels
    return ["reference"] + [b for b in kernels.available() if b in ("numpy", "numba_cpu")]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("attack,name,value", PARAM_CASES,
                         ids=[f"{a}-{n}-{v!r}" for a, n, v in PARAM_CASES])
def test_every_bad_attack_parameter_is_named(attack, name, value, backend):
    kw = {**_EXTRA.get(attack, {}), **_NEEDS.get(name, {}), name: value}
    x0, y0 = X.copy(), Y.copy()
    with pytest.raises(AdvkernError) as e:
        run_attack(M, X, Y, attack, backend=backend, **kw)
    msg = str(e.value).lower()
    assert name.lower() in msg or (name == "eps" and "radius" in msg), str(e.value)
    np.testing.assert_array_equal(X, x0)
    np.testing.assert_array_equal(Y, y0)


def test_the_parameter_table_is_large():
    assert len(PARAM_CASES) >= 100


# ----------------------------------------------------------------------------- files


def _file_cases(tmp):
    """(name, path, fragment) for model files with one defect each."""
    good = tmp / "good.npz"
    advkern.save(Sequential([Flatten(), Dense(10)], (1, 28, 28), seed=0), good)
    z = dict(np.load(good))
    meta = json.loads(str(z["__advkern__"]))

    def write(name, arrays):
        p = tmp / name
        np.savez(p, **arrays)
        return p

    def with_meta(name, change):
        m = json.loads(json.dumps(meta))
        change(m)
        return write(name, {**z, "__advkern__": np.array(json.dumps(m))})

    trunc = tmp / "trunc.npz"
    trunc.write_bytes(good.read_bytes()[:200])
    empty = tmp / "empty.npz"
    empty.write_bytes(b"")
    return [
        ("missing weight", write("a.npz", {k: v for k, v in z.items() if k != "layer1.w"}),
         "parameters"),
        ("wrong weight shape", write("b.npz", {**z, "layer1.w": np.zeros((5, 5), np.float32)}),
         "shape"),
        ("NaN weight", write("c.npz", {**z, "layer1.w": np.full(z["layer1.w"].shape, np.nan,
                                                               np.float32)}), "NaN"),
        ("integer weight", write("d.npz", {**z, "layer1.w": z["layer1.w"].astype(np.int32)}),
         "dtype"),
        ("unknown layer", with_meta("e.npz", lambda m: m["model"].update(
            layers=[{"type": "warp"}])), "layer"),
        ("negative input shape", with_meta("f.npz", lambda m: m["model"].update(
            input_shape=[-1, 28, 28])), "input_shape"),
        ("stray array", write("g.npz", {**z, "evil": np.zeros(3)}), "evil"),
        ("description not JSON", write("h.npz", {**z, "__advkern__": np.array("{not json")}),
         "JSON"),
        ("description a list", write("i.npz", {**z, "__advkern__": np.array("[1, 2]")}),
         "format"),
        ("truncated zip", trunc, "corrupt"),
        ("empty file", empty, "not an .npz"),
    ]


def test_every_defective_model_file_is_a_model_file_error_and_one_cli_line(tmp_path, capsys):
    cases = _file_cases(tmp_path)
    assert len(cases) == 11
    for name, path, fragment in cases:
        before = path.read_bytes()
        with pytest.raises(ModelFileError) as e:
            advkern.load(path)
        assert str(path) in str(e.value) and fragment.lower() in str(e.value).lower(), \
            (name, str(e.value))
        one_error_line(capsys, ["info", path], str(path))
        assert path.read_bytes() == before, name


def _data_file(tmp, name, **arrays):
    p = tmp / name
    np.savez(p, **arrays)
    return p


DATA_CASES = [
    ("x of the wrong image shape", dict(x=np.zeros((4, 1, 27, 27), np.float32),
                                        y=np.zeros(4, np.int64)), "shape"),
    ("y shorter than x", dict(x=np.zeros((4, 1, 28, 28), np.float32), y=np.zeros(3, np.int64)),
     "shape"),
    ("label out of range", dict(x=np.zeros((4, 1, 28, 28), np.float32),
                                y=np.array([0, 1, 2, 10])), "range"),
    ("NaN pixel", dict(x=np.full((4, 1, 28, 28), np.nan, np.float32), y=np.zeros(4, np.int64)),
     "NaN"),
    ("pixels outside the box", dict(x=np.full((4, 1, 28, 28), 2.0, np.float32),
                                    y=np.zeros(4, np.int64)), "box"),
    ("int16 pixels", dict(x=np.zeros((4, 1, 28, 28), np.int16), y=np.zeros(4, np.int64)),
     "float"),
    ("no labels", dict(x=np.zeros((4, 1, 28, 28), np.float32)), "'y'"),
    ("fractional labels", dict(x=np.zeros((4, 1, 28, 28), np.float32),
                               y=np.array([0.5, 1, 2, 3])), "integer"),
]


@pytest.mark.parametrize("case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_cli_bad_data_files(case, files, capsys, tmp_path):
    # (checked by run_attack's validation, the first thing it does)
    _, arrays, fragment = case
    p = _data_file(tmp_path, "data.npz", **arrays)
    before = p.read_bytes()
    one_error_line(capsys, ["attack", "--model", files["model"], "--attack", "fgsm", "--data", p],
                   fragment)
    assert p.read_bytes() == before


MORE_CLI = [
    ("--n 0", lambda f: ["attack", "--model", f["model"], "--attack", "fgsm", "--n", 0], "--n"),
    ("--n -1", lambda f: ["attack", "--model", f["model"], "--attack", "fgsm", "--n", -1], "--n"),
    ("--n beyond the data", lambda f: ["attack", "--model", f["model"], "--attack", "fgsm",
                                       "--n", 10 ** 6], "exceeds"),
    ("--target 99", lambda f: ["attack", "--model", f["model"], "--attack", "fgsm",
                               "--targeted", "--target", 99], "target"),
    ("--target abc", lambda f: ["attack", "--model", f["model"], "--attack", "fgsm",
                                "--targeted", "--target", "abc"], "--target"),
    ("verify candidate without x_adv", lambda f: ["verify", "--model", f["model"], "--attack",
                                                  "fgsm", "--candidate", f["model"]], "x_adv"),
    ("ADVKERN_BACKEND unknown", lambda f: ["attack", "--model", f["model"], "--attack",
                                           "fgsm", "--n", 2], "unknown backend"),
    ("deepfool --norm 1", lambda f: ["attack", "--model", f["model"], "--attack", "deepfool",
                                     "--norm", 1, "--n", 2], "norm"),
    ("cw --kappa -1", lambda f: ["attack", "--model", f["model"], "--attack", "cw",
                                 "--kappa", -1, "--n", 2], "kappa"),
]


@pytest.mark.parametrize("case", MORE_CLI, ids=[c[0] for c in MORE_CLI])
def test_more_cli_bad_input(case, files, capsys, monkeypatch, tmp_path):
    name, argv, fragment = case
    if name.startswith("ADVKERN_BACKEND"):
        monkeypatch.setenv("ADVKERN_BACKEND", "tpu")
    one_error_line(capsys, argv(files), fragment)


def test_the_suite_has_200_kinds():
    kinds = (len(API_CASES) + len(CLI_CASES) + len(PARAM_CASES) + 11 + len(DATA_CASES)
             + len(MORE_CLI) + 6)
    assert kinds >= 200, kinds
