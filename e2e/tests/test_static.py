"""The `static` route (crates/wsgate/src/files.rs) with curl: every way out
of the directory is a 404 (`..` sent as is, encoded in upper and lower
case, encoded slashes and backslashes, overlong UTF-8, NUL, symlinks out of
the tree, a symlinked directory), no directory listing, content types by
extension, `ETag` and `If-None-Match` → 304, `HEAD`, 405 for other methods.
curl sends the paths byte for byte (`--path-as-is`), as an attacker would."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

SECRET = "top secret: outside the served tree"
FILES = {
    "index.html": ("<!doctype html><h1>home</h1>", "text/html; charset=utf-8"),
    "app.js": ("export const x = 1;\n", "text/javascript; charset=utf-8"),
    "m.mjs": ("export {};\n", "text/javascript; charset=utf-8"),
    "style.css": ("h1 { color: red }\n", "text/css; charset=utf-8"),
    "mod.wasm": (b"\x00asm\x01\x00\x00\x00", "application/wasm"),
    "data.json": ('{"a": 1}\n', "application/json"),
    "img.png": (b"\x89PNG\r\n\x1a\n" + bytes(16), "image/png"),
    "notes.txt": ("plain\n", "text/plain; charset=utf-8"),
    "blob.xyz": (b"\x01\x02", "application/octet-stream"),
    "sub/page.html": ("<p>sub</p>", "text/html; charset=utf-8"),
    "docs/index.html": ("<p>docs index</p>", "text/html; charset=utf-8"),
}


@pytest.fixture
def site(tmp_path, start_gateway, write_config):
    """A gateway with `static` on /app/ over tmp/site; tmp/secret.txt and tmp/outside/ lie beside it."""
    root = tmp_path / "site"
    for name, (body, _) in FILES.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(body if isinstance(body, bytes) else body.encode())
    (tmp_path / "secret.txt").write_text(SECRET)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text(SECRET)
    os.symlink(tmp_path / "secret.txt", root / "leak.txt")  # a file link out of the tree
    os.symlink(tmp_path / "outside", root / "linkdir")  # a directory link out of the tree
    os.symlink(root / "app.js", root / "alias.js")  # a link that stays inside
    os.mkfifo(root / "fifo.txt")  # not a regular file (opening it would block)
    cfg = write_config(f"""
        [[listener]]
        address = "127.0.0.1:0"

        [[route]]
        path_prefix = "/app/"
        static = "{root}"

        [[route]]
        path_prefix = "/raw"
        static = "{root}"
    """)
    gw = start_gateway("serve", "--config", cfg)
    return f"http://{gw.host}:{gw.port}"


def curl(*args: str) -> tuple[int, dict[str, str], bytes]:
    """curl -sS --path-as-is ARGS -> (status, headers in lower case, body)."""
    exe = shutil.which("curl")
    if not exe:
        pytest.fail("curl not found: run scripts/install-test-deps.sh")
    r = subprocess.run([exe, "-sS", "--path-as-is", "--max-time", "10", "-D", "-", *args],
                       capture_output=True, timeout=20, check=False)
    assert r.returncode == 0, r.stderr
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


ESCAPES = [
    "/app/../secret.txt",
    "/app/./index.html",
    "/app/sub/../../secret.txt",
    "/app/%2e%2e/secret.txt",
    "/app/%2E%2E/secret.txt",
    "/app/%2e%2E/secret.txt",
    "/app/.%2e/secret.txt",
    "/app/..%2fsecret.txt",
    "/app/..%2Fsecret.txt",
    "/app/%2e%2e%2fsecret.txt",
    "/app/%2E%2E%2Foutside%2Fsecret.txt",
    "/app/sub/..%2f..%2fsecret.txt",
    "/app/..%5csecret.txt",
    "/app/%5c..%5csecret.txt",
    "/app/%c0%ae%c0%ae/secret.txt",  # overlong UTF-8 for '.'
    "/app/index.html%00.png",
    "/app/%00",
    "/app/sub//page.html",
    "/app/leak.txt",
    "/app/linkdir/secret.txt",
    "/app/fifo.txt",
    "/app/missing.html",
]


@pytest.mark.parametrize("path", ESCAPES)
def test_static_route_refuses_paths_out_of_the_tree(site, path):
    status, _, body = curl(site + path)
    assert status == 404, (path, status, body)
    assert SECRET.encode() not in body


def test_static_route_lists_no_directory(site):
    for path in ["/app/sub/", "/app/sub", "/app/linkdir/"]:
        status, _, body = curl(site + path)
        assert status == 404, (path, status)
        assert b"page.html" not in body and b"secret" not in body
    # A directory with an index.html is served by it.
    status, headers, body = curl(site + "/app/docs/")
    assert (status, body) == (200, b"<p>docs index</p>")
    status, _, body = curl(site + "/app/")
    assert (status, body) == (200, FILES["index.html"][0].encode())


def test_static_route_content_types(site):
    for name, (content, ctype) in FILES.items():
        status, headers, body = curl(f"{site}/app/{name}")
        assert status == 200, name
        assert headers["content-type"] == ctype, (name, headers)
        want = content if isinstance(content, bytes) else content.encode()
        assert body == want and headers["content-length"] == str(len(want)), name
        assert headers["cache-control"] == "no-cache"
    # Percent-encoded names and a symlink that stays in the tree are fine.
    status, headers, body = curl(site + "/app/%61pp.js")
    assert (status, body) == (200, FILES["app.js"][0].encode())
    status, headers, _ = curl(site + "/app/alias.js")
    assert status == 200 and headers["content-type"] == "text/javascript; charset=utf-8"


def test_static_route_etag_304_and_head(site):
    status, headers, body = curl(site + "/app/app.js")
    assert status == 200
    tag = headers["etag"]
    assert tag.startswith('"') and tag.endswith('"'), tag
    status, headers2, body = curl("-H", f"If-None-Match: {tag}", site + "/app/app.js")
    assert (status, body) == (304, b"") and headers2["etag"] == tag
    status, _, _ = curl("-H", f'If-None-Match: "other", W/{tag}', site + "/app/app.js")
    assert status == 304, "a weak match in a list counts"
    status, _, body = curl("-H", 'If-None-Match: "other"', site + "/app/app.js")
    assert status == 200 and body == FILES["app.js"][0].encode()
    # HEAD: the GET's headers, no body (read raw: curl -I would not read one).
    host, port = site.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as c:
        c.sendall(b"HEAD /app/style.css HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := c.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").lower().split("\r\n")
    assert lines[0].startswith("http/1.1 200"), lines
    assert "content-type: text/css; charset=utf-8" in lines
    assert f"content-length: {len(FILES['style.css'][0])}" in lines
    assert any(line.startswith("etag: ") for line in lines)
    assert body == b"", body


def test_static_route_prefix_ends_at_a_segment(site):
    """`path_prefix = "/raw"` serves /raw/NAME; /rawNAME is not a name under it."""
    assert curl(site + "/raw/app.js")[0] == 200
    assert curl(site + "/raw/")[0] == 200
    for path in ["/rawapp.js", "/raw%2fapp.js", "/raw..", "/raw%2f..%2fsecret.txt"]:
        status, _, body = curl(site + path)
        assert status == 404, (path, status)


def test_static_route_other_methods_are_405(site):
    for method in ["POST", "PUT", "DELETE"]:
        status, _, _ = curl("-X", method, site + "/app/index.html")
        assert status == 405, method
