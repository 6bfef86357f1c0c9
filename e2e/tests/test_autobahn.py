"""Autobahn|Testsuite fuzzingclient against `wsgate serve --to echo:`: every
case of 1.* to 10.* OK, NON-STRICT or INFORMATIONAL (parsed from index.json)."""

import os

import pytest

from wsgate_e2e import autobahn

pytestmark = pytest.mark.autobahn


def test_autobahn_1_to_10_against_echo(quick_gateway, tmp_path):
    gw = quick_gateway("echo:", env={"RUST_LOG": os.environ.get("RUST_LOG", "warn")})
    cases = [c for c in os.environ.get("AUTOBAHN_CASES", "").split(",") if c] or autobahn.CASES_1_TO_10
    res = autobahn.run_fuzzingclient(gw.url, cases=cases, agent="wsgate", outdir=tmp_path / "autobahn")
    print(res.summary())
    assert res.expected, "no cases selected"
    assert res.ok, res.summary()
    assert gw.proc.popen.poll() is None, "wsgate died during Autobahn:\n" + gw.proc.describe()
