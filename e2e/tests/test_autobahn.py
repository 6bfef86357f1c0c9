"""Autobahn|Testsuite fuzzingclient against `wsgate serve --to echo:`: every
case of 1.* to 10.* OK, NON-STRICT or INFORMATIONAL (parsed from index.json),
and with `--deflate` the permessage-deflate cases 12.* and 13.* (12.1.* and
13.* by default; all 216 under `-m slow`) plus 1.*–10.* again."""

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


@pytest.mark.parametrize("cases", [
    pytest.param(["12.1.*", "13.*"], id="12.1-13", marks=pytest.mark.timeout(900)),
    pytest.param(["12.*", "13.*"], id="12-13-full", marks=[pytest.mark.slow, pytest.mark.timeout(2400)]),
    pytest.param(autobahn.CASES_1_TO_10, id="1-10", marks=[pytest.mark.slow, pytest.mark.timeout(900)]),
])
def test_autobahn_permessage_deflate_against_echo(quick_gateway, tmp_path, cases):
    """`echo:` with --deflate: the gateway inflates what Autobahn sends and
    compresses the echo (min_size=0, so every message is compressed). Every
    selected case clean, and in 12/13 every one ran compressed."""
    gw = quick_gateway("echo:", "--deflate-config", "min_size=0",
                       env={"RUST_LOG": os.environ.get("RUST_LOG", "warn")})
    res = autobahn.run_fuzzingclient(gw.url, cases=cases, agent="wsgate-deflate", outdir=tmp_path / "autobahn",
                                     timeout=2300)
    print(res.summary())
    assert res.expected, "no cases selected"
    assert res.ok, res.summary()
    if cases != autobahn.CASES_1_TO_10:
        missing = res.cases_without_deflate()
        assert not missing, f"no permessage-deflate in {len(missing)} cases: {missing[:10]}"
    assert gw.proc.popen.poll() is None, "wsgate died during Autobahn:\n" + gw.proc.describe()
