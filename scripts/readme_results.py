"""Write the README's results table from a demo's results.json (so the README shows what the
demo measured, on the machine it names, and cannot drift from it).

    advkern demo --out advkern-report
    python scripts/readme_results.py advkern-report/results.json [--readme README.md]

Replaces the text between the README's ``<!-- results -->`` and ``<!-- /results -->``
markers; prints the block instead when the README has no markers.
"""

import argparse
import json
import re
import sys

START, END = "<!-- results -->", "<!-- /results -->"


def block(res):
    m = res["machine"]
    lines = [f"Measured by `advkern demo` on {res['date'][:10]} ({res['backend']} backend, "
             f"{m['cpu']}, {m['cores']} cores; the whole demo {res['seconds']:.0f} s): "
             f"{res['passed']} of {res['with_target']} targets met.", "",
             "| experiment | model | measured | target | verdict |", "|---|---|---|---|---|"]
    for r in res["results"]:
        verdict = "-" if r["pass"] is None else ("pass" if r["pass"] else "**FAIL**")
        lines.append(f"| {r['experiment']} | {r['model']} | {r['measured']} | {r['target']} "
                     f"| {verdict} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--readme", default="README.md")
    args = ap.parse_args(argv)
    with open(args.results) as f:
        text = block(json.load(f))
    try:
        with open(args.readme) as f:
            readme = f.read()
    except OSError:
        readme = ""
    if START not in readme or END not in readme:
        print(text)
        return 0
    new = re.sub(re.escape(START) + ".*?" + re.escape(END),
                 lambda _: f"{START}\n{text}\n{END}", readme, flags=re.S)
    with open(args.readme, "w") as f:
        f.write(new)
    print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
