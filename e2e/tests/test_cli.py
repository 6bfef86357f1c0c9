"""The command-line contract: --help/--version, `check --config` errors with
FILE:LINE:COLUMN and a non-zero exit, `serve` on wss:// with a PEM cert/key,
and a clear error when they do not match."""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess

import pytest

from wsgate_e2e import clients


def run(wsgate_bin, *args, timeout=20):
    return subprocess.run([str(wsgate_bin), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_help_and_version(wsgate_bin):
    r = run(wsgate_bin, "--help")
    assert r.returncode == 0 and "serve" in r.stdout and "check" in r.stdout, r
    r = run(wsgate_bin, "serve", "--help")
    for flag in ("--listen", "--to", "--framing", "--protocol", "--tls-cert", "--tls-key", "--config"):
        assert flag in r.stdout, f"serve --help does not mention {flag}"
    r = run(wsgate_bin, "check", "--help")
    assert r.returncode == 0 and "--config" in r.stdout
    r = run(wsgate_bin, "--version")
    assert r.returncode == 0 and re.search(r"\d+\.\d+\.\d+", r.stdout), r


def test_check_accepts_a_valid_config(wsgate_bin, write_config):
    cfg = write_config("""
        [[listener]]
        address = "127.0.0.1:0"

        [[route]]
        path = "/redis"
        protocols = ["redis"]
        to = "tcp://127.0.0.1:6379"
        framing = "resp"
    """)
    r = run(wsgate_bin, "check", "--config", cfg)
    assert r.returncode == 0, (r.stdout, r.stderr)


def test_check_reports_file_line_column(wsgate_bin, write_config):
    cfg = write_config("""\
        [[listener]]
        address = "127.0.0.1:0"

        [[route]]
        path = "/x"
        to = "echo:"
        no_such_key = 1
    """)
    r = run(wsgate_bin, "check", "--config", cfg)
    assert r.returncode != 0, (r.stdout, r.stderr)
    out = r.stdout + r.stderr
    assert re.search(re.escape(str(cfg)) + r":7:\d+", out), out
    assert "no_such_key" in out, out


def test_check_reports_every_error(wsgate_bin, write_config):
    cfg = write_config("""\
        [[listener]]
        address = "127.0.0.1:0"

        [[route]]
        path = "/a"

        [[route]]
        path = "/b"
        to = "echo:"

        [[route]]
        path = "/c"
    """)
    r = run(wsgate_bin, "check", "--config", cfg)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    # Two routes without a peer, at lines 4 and 11: both reported, each with its position.
    lines = {int(m.group(1)) for m in re.finditer(re.escape(str(cfg)) + r":(\d+):\d+", out)}
    assert {4, 11} <= lines or {5, 12} <= lines, out


def test_serve_refuses_a_bad_config(wsgate_bin, write_config):
    cfg = write_config("""
        [limits]
        max_message_size = "lots"
    """)
    r = run(wsgate_bin, "serve", "--config", cfg)
    assert r.returncode != 0
    assert "listening on" not in r.stdout
    assert re.search(re.escape(str(cfg)) + r":\d+:\d+", r.stdout + r.stderr), r.stderr


def _self_signed(tmp_path, name="localhost"):
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.fail("openssl not found: run scripts/install-test-deps.sh")
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=30)
    return cert, key


def test_wss(start_gateway, tmp_path):
    cert, key = _self_signed(tmp_path)
    gw = start_gateway("serve", "--listen", "127.0.0.1:0", "--to", "echo:", "--tls-cert", cert, "--tls-key", key)
    assert gw.listeners[0].scheme == "wss", gw.listeners
    ctx = ssl.create_default_context(cafile=str(cert))
    big = bytes(range(256)) * 20000
    _, replies = clients.echo_tls(gw.url, ctx, ["over tls", big])
    assert replies[0] == "over tls"
    assert replies[1] == big


def test_tls_cert_key_mismatch_is_a_clear_error(wsgate_bin, tmp_path):
    cert, _ = _self_signed(tmp_path, "a")
    _, other_key = _self_signed(tmp_path, "b")
    r = run(wsgate_bin, "serve", "--listen", "127.0.0.1:0", "--to", "echo:", "--tls-cert", cert, "--tls-key", other_key)
    assert r.returncode != 0
    assert "listening on" not in r.stdout
    assert re.search(r"(?i)match|key", r.stderr), r.stderr
