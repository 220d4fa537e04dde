"""``advkern demo``: the quick run end to end (the bundled models come from the test
session's cache), its report folder, and a bad --out failing before any work."""

import json

import pytest

from advkern import cli
from advkern.demo import run_demo

pytest.importorskip("matplotlib")


def test_quick_demo_writes_results_report_and_pictures(trained, tmp_path, capsys):
    trained("mlp"), trained("cnn")
    out = tmp_path / "report"
    assert run_demo(quick=True, out=str(out)) == 0
    stdout = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["backend"] == "numba_cpu" or res["backend"] in ("cupy", "numba_cuda")
    assert res["machine"]["cores"] >= 1 and res["quick"] is True
    recs = res["results"]
    assert len(recs) == 16
    judged = [r for r in recs if r["pass"] is not None]
    assert res["with_target"] == len(judged) >= 10
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
