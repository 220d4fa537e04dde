"""``advkern demo``: the quick run end to end (the bundled models come from the test
session's cache), its report folder, and a bad --out failing before any work."""

import json

import numpy as np
import pytest

from advkern import cli
from advkern.demo import run_demo

pytest.importorskip("matplotlib")


def _fake_experiment(calls):
    """An experiment in the shape of advkern.experiments' modules (each real one has its own
    end-to-end test; here the demo's plumbing of them is what is checked)."""
    from advkern.experiments._common import Context

    def run(name, *, out=None, backend="auto", quick=False, seed=0, log=None):
        calls.append((name, out, backend, quick))
        ctx = Context(name, "a stand-in experiment", out=out, backend=backend, quick=quick,
                      seed=seed, log=log)
        ctx.target("stand-in rate", "97.0%", ">= 95%", True, rate=0.97)
        ctx.target("stand-in gap", "3 pts", ">= 20 pts", False, gap=np.float32(3.0),
                   per_class=np.arange(3))     # numpy values, as real experiments give
        ctx.target("stand-in report", "1.5", "-", None, value=1.5)
        path = ctx.figure("stand_in")
        if path:
            with open(path, "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n")
        return ctx.finish()
    return run


def test_quick_demo_writes_results_report_and_pictures(trained, tmp_path, capsys,
                                                         monkeypatch):
    trained("mlp"), trained("cnn")
    out = tmp_path / "report"
    calls = []
    monkeypatch.setattr("advkern.experiments.available", lambda: ["fake-a", "fake-b"])
    monkeypatch.setattr("advkern.experiments.run", _fake_experiment(calls))
    assert run_demo(quick=True, out=str(out)) == 0
    # every experiment ran once, in its quick form, on the demo's backend, under out/NAME
    assert [(c[0], c[3]) for c in calls] == [("fake-a", True), ("fake-b", True)]
    assert calls[0][1] == str(out / "fake-a") and calls[0][2] == "numba_cpu" or \
        calls[0][2] in ("cupy", "numba_cuda")
    assert (out / "fake-b" / "results.json").exists()
    stdout = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["backend"] == "numba_cpu" or res["backend"] in ("cupy", "numba_cuda")
    assert res["machine"]["cores"] >= 1 and res["quick"] is True
    recs = [r for r in res["results"] if not r.get("group")]
    assert len(recs) == 16
    exp = [r for r in res["results"] if r.get("group")]
    assert [(r["group"], r["pass"]) for r in exp] == \
        [(g, v) for g in ("fake-a", "fake-b") for v in (True, False, None)]
    assert res["experiments"]["fake-a"]["figures"] == {"stand_in": "fake-a/stand_in.png"}
    judged = [r for r in res["results"] if r["pass"] is not None]
    assert res["with_target"] == len(judged) >= 14
    assert res["passed"] == sum(r["pass"] for r in judged)
    assert f"{res['passed']} of {res['with_target']} targets met" in stdout
    for r in recs:
        assert r["values"] and all(isinstance(v, float) for v in r["values"].values())
    assert set(res["figures"]) == {"fgsm", "pgd", "jsma", "pixel", "curves"}
    for name in res["figures"].values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| experiment | model | measured | target | verdict | seconds |" in md
    assert all(f"]({name})" in md for name in res["figures"].values())
    assert md.count("| pass |") + md.count("| **FAIL** |") == len(judged)
    assert "## Experiment `fake-b`" in md and "](fake-b/stand_in.png)" in md
    assert "| stand-in gap | 3 pts | >= 20 pts | **FAIL** |" in md
    curves = res["curves"]
    assert set(curves) == {"FGSM mlp", "PGD mlp", "FGSM cnn", "PGD cnn"}
    for c in curves.values():       # accuracy falls as eps grows (PGD at least as strong)
        assert c["eps"][0] == 0 and c["accuracy"][0] >= c["accuracy"][-1]


def test_demo_out_that_cannot_be_written_fails_before_any_work(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr("advkern.demo.headline_results",
                        lambda *a, **k: pytest.fail("the demo ran before checking --out"))
    rc = cli.main(["demo", "--quick", "--out", str(blocker / "report")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("advkern: error: cannot write the report to")
    assert len(err.strip().splitlines()) == 1
    rc = cli.main(["demo", "--quick", "--experiments", "nope", "--no-report"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("advkern: error: unknown experiment 'nope'")
    assert len(err.strip().splitlines()) == 1
