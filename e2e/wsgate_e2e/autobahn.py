"""Autobahn|Testsuite `fuzzingclient` harness.

Writes a spec pointing at a WebSocket server URL, runs `wstest -m
fuzzingclient` in a temp dir, then parses the reports' index.json: wstest exits
0 even when cases fail, so the verdict comes from the reports only. Every case
selected by the spec must be present and have `behavior` and `behaviorClose`
in OK / NON-STRICT / INFORMATIONAL.

Command line (exit status 1 on any failed, unimplemented or missing case):

    e2e/.venv/bin/python -m wsgate_e2e.autobahn --url ws://127.0.0.1:9001 \
        [--cases '1.*,2.*'] [--exclude '9.*'] [--outdir DIR] [--agent NAME]

wstest is `.cache/autobahn/wstest` (installed by scripts/install-test-deps.sh)
unless $WSTEST or --wstest says otherwise.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import CACHE_DIR

CASES_1_TO_10 = [f"{i}.*" for i in range(1, 11)]
GOOD = {"OK", "NON-STRICT", "INFORMATIONAL"}

_LIST_CASES = r"""
import json, sys
from autobahntestsuite.caseset import CaseSet
from autobahntestsuite.case import Cases, CaseCategories, CaseSubCategories
cs = CaseSet("websocket", "Case", Cases, CaseCategories, CaseSubCategories)
print(json.dumps(cs.parseSpecCases(json.load(open(sys.argv[1])))))
"""


def default_wstest() -> Path:
    return Path(os.environ.get("WSTEST", CACHE_DIR / "autobahn" / "wstest"))


@dataclass
class AutobahnResult:
    agent: str
    url: str
    expected: list[str]
    results: dict[str, dict]
    outdir: Path
    wstest_output: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    close_counts: dict[str, int] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.counts = dict(collections.Counter(r.get("behavior", "?") for r in self.results.values()))
        self.close_counts = dict(collections.Counter(r.get("behaviorClose", "?") for r in self.results.values()))
        self.missing = [c for c in self.expected if c not in self.results]
        for case in sorted(self.results, key=_case_key):
            r = self.results[case]
            if r.get("behavior") not in GOOD or r.get("behaviorClose") not in GOOD:
                self.bad.append(case)

    @property
    def ok(self) -> bool:
        return bool(self.expected) and not self.bad and not self.missing

    def report(self, case: str) -> dict | None:
        """The case's own JSON report, or None when it has none or it cannot be read."""
        rf = self.results.get(case, {}).get("reportfile")
        if not rf:
            return None
        try:
            return json.loads((self.outdir / rf).read_text())
        except (OSError, ValueError):
            return None

    def case_detail(self, case: str) -> str:
        r = self.results.get(case, {})
        detail = f"{case}: behavior={r.get('behavior')} behaviorClose={r.get('behaviorClose')}"
        rep = self.report(case)
        if rep is not None:
            detail += f"\n    {rep.get('description', '')[:200]}\n    result: {rep.get('result', '')[:300]}"
            detail += f"\n    resultClose: {rep.get('resultClose', '')[:200]}"
        return detail

    def cases_without_deflate(self) -> list[str]:
        """The cases that ran whose 101, as Autobahn received it, negotiated no
        permessage-deflate (`Sec-WebSocket-Extensions` absent or without it),
        and those whose report cannot be read."""
        out = []
        for case in sorted(self.results, key=_case_key):
            rep = self.report(case)
            head = rep.get("httpResponse", "") if rep is not None else ""
            if not any(name.strip().lower() == "sec-websocket-extensions" and "permessage-deflate" in value
                       for name, _, value in (line.partition(":") for line in head.split("\r\n"))):
                out.append(case)
        return out

    def summary(self) -> str:
        lines = [
            f"Autobahn|Testsuite fuzzingclient against {self.agent} at {self.url}: "
            f"{len(self.results)} of {len(self.expected)} selected cases ran",
            "  behavior:      " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())),
            "  behaviorClose: " + ", ".join(f"{k} {v}" for k, v in sorted(self.close_counts.items())),
        ]
        if self.missing:
            lines.append(f"  MISSING ({len(self.missing)}): {' '.join(self.missing[:50])}")
        if self.bad:
            lines.append(f"  NOT CLEAN ({len(self.bad)}):")
            for c in self.bad[:40]:
                lines.append("    " + self.case_detail(c).replace("\n", "\n    "))
            if len(self.bad) > 40:
                lines.append(f"    ... and {len(self.bad) - 40} more")
        lines.append("  verdict: " + ("CLEAN" if self.ok else "FAILED") + f" (reports in {self.outdir})")
        return "\n".join(lines)


def _case_key(case: str):
    return tuple(int(x) if x.isdigit() else 0 for x in case.split("."))


def run_fuzzingclient(url: str, cases: list[str] | None = None, exclude: list[str] | None = None,
                      outdir: Path | None = None, agent: str = "wsgate", wstest: Path | None = None,
                      timeout: float = 900, options: dict | None = None) -> AutobahnResult:
    wstest = Path(wstest or default_wstest())
    if not os.access(wstest, os.X_OK):
        raise FileNotFoundError(f"{wstest} not found: run scripts/install-test-deps.sh")
    work = Path(outdir) if outdir else Path(tempfile.mkdtemp(prefix="autobahn-"))
    work.mkdir(parents=True, exist_ok=True)
    reports = work / "reports"
    spec = {
        "outdir": str(reports),
        "servers": [{"agent": agent, "url": url, "options": options or {}}],
        "cases": cases or CASES_1_TO_10,
        "exclude-cases": exclude or [],
        "exclude-agent-cases": {},
    }
    spec_path = work / "fuzzingclient.json"
    spec_path.write_text(json.dumps(spec, indent=2))

    expected = _expected_cases(wstest, spec_path)
    try:
        cp = subprocess.run([str(wstest), "-m", "fuzzingclient", "-s", str(spec_path)], cwd=work,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            timeout=timeout)
        output = cp.stdout.decode("utf-8", "replace")
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode("utf-8", "replace") + f"\n[wstest killed after {timeout}s]"
    (work / "wstest.log").write_text(output)
    index_path = reports / "index.json"
    results: dict[str, dict] = {}
    if index_path.exists():
        index = json.loads(index_path.read_text())
        results = index.get(agent, {})
    return AutobahnResult(agent=agent, url=url, expected=expected, results=results, outdir=reports,
                          wstest_output=output)


def _expected_cases(wstest: Path, spec_path: Path) -> list[str]:
    """The case ids the spec selects, as the suite itself resolves them."""
    python = wstest.parent / "python"
    if not os.access(python, os.X_OK):
        return []
    cp = subprocess.run([str(python), "-c", _LIST_CASES, str(spec_path)], capture_output=True, timeout=60)
    if cp.returncode != 0:
        raise RuntimeError(f"cannot list Autobahn cases: {cp.stderr.decode(errors='replace')}")
    return json.loads(cp.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--cases", default=",".join(CASES_1_TO_10), help="comma-separated case patterns")
    ap.add_argument("--exclude", default="", help="comma-separated case patterns to leave out")
    ap.add_argument("--outdir", type=Path, default=None)
    ap.add_argument("--agent", default="wsgate")
    ap.add_argument("--wstest", type=Path, default=None)
    ap.add_argument("--timeout", type=float, default=1800)
    a = ap.parse_args(argv)
    res = run_fuzzingclient(a.url, cases=[c for c in a.cases.split(",") if c],
                            exclude=[c for c in a.exclude.split(",") if c], outdir=a.outdir,
                            agent=a.agent, wstest=a.wstest, timeout=a.timeout)
    print(res.summary())
    if not res.results:
        print(res.wstest_output[-3000:], file=sys.stderr)
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
