"""The npm package as a user gets it: `npm pack` in clients/ts, `npm install`
of the tarball into an empty project (offline: it has no dependencies), and
a plain `<script type="module">` page in that project (e2e/web/ts-package-page.html)
importing every entry point from its node_modules through an import map,
served by wsgate's static route, in headless Chromium. The page also sends
one message through the same gateway's `echo:` route. (Node's import of the
same tarball is clients/ts/test/pack.test.mjs.)"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from wsgate_e2e import REPO_ROOT

pytestmark = [pytest.mark.browser]

PKG = REPO_ROOT / "clients" / "ts"
PAGE = REPO_ROOT / "e2e" / "web" / "ts-package-page.html"


def test_packed_package_installs_into_an_empty_project_and_imports_in_a_page(
    start_gateway, write_config, browser, tmp_path
):
    npm = shutil.which("npm")
    if not npm:
        pytest.fail("npm not found: run scripts/install-test-deps.sh")
    if not (PKG / "dist" / "index.js").is_file():
        pytest.fail("clients/ts is not built: run scripts/install-test-deps.sh")
    packs = tmp_path / "packs"
    packs.mkdir()
    out = subprocess.run([npm, "pack", "--json", "--ignore-scripts", "--pack-destination", str(packs)], cwd=PKG,
                         check=True, capture_output=True, text=True, timeout=120)
    tarball = packs / json.loads(out.stdout)[0]["filename"]

    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text(json.dumps({"name": "app", "private": True, "type": "module"}))
    subprocess.run([npm, "install", "--offline", "--no-audit", "--no-fund", "--ignore-scripts", str(tarball)],
                   cwd=app, check=True, capture_output=True, text=True, timeout=120)
    installed = sorted(p.name for p in (app / "node_modules").iterdir() if not p.name.startswith("."))
    assert installed == ["wsgate-client"], "no runtime dependencies"
    shutil.copyfile(PAGE, app / "index.html")

    cfg = write_config(f"""
        [[listener]]
        address = "127.0.0.1:0"

        [[route]]
        path = "/echo"
        to = "echo:"

        [[route]]
        path_prefix = "/"
        static = "{app}"
    """)
    gw = start_gateway("serve", "--config", cfg)
    res = browser(f"http://{gw.host}:{gw.port}/", timeout=60)
    assert res["ok"], res
    page = res["result"]
    assert page["error"] is None, page
    assert all(t == "function" for _, t in page["exports"]), page["exports"]
    assert page["sameClass"] is True, "the root and wsgate-client/resp export the same module's functions"
    assert page["frame"] == 4
    assert page["resp"] == ["PING", "héllo"]
    assert page["echo"] == "through the gateway"
    assert page["closed"] == 1000
