"""Helpers for the wsgate end-to-end suite: processes, peers, raw WebSocket
frames, Node helpers and the Autobahn|Testsuite harness."""

import os
from pathlib import Path

E2E_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = E2E_DIR.parent
NODE_DIR = E2E_DIR / "node"
CACHE_DIR = Path(os.environ.get("WSGATE_E2E_CACHE", REPO_ROOT / ".cache"))
