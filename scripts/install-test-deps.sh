#!/usr/bin/env bash
# Installs every external tool the end-to-end tests need. Idempotent: work
# already done is skipped, so a re-run takes a couple of seconds.
#
#   scripts/install-test-deps.sh          # as root, no input needed (CI=true)
#
# What it installs:
#   1. Debian packages: redis-server, redis-tools (redis-benchmark), socat,
#      chromium, curl, apache2-utils (htpasswd),
#      nginx, haproxy, openssh-server + openssh-client (the
#      tunnel tests run their own sshd on an ephemeral loopback port), python3 +
#      venv, gcc (Autobahn's wsaccel is a C extension), ca-certificates and,
#      only where no `node`/`npm` is on PATH, Debian's nodejs + npm.
#      Services are not started (policy-rc.d) — tests start their own servers
#      on ephemeral ports; an ssh service that a package left enabled is not
#      started either (nothing here starts or enables one).
#   2. e2e/.venv: Python 3 virtualenv with e2e/requirements.txt (pytest, websockets, PyJWT, h2).
#   3. e2e/node_modules: `npm ci` from e2e/package-lock.json (ws 8.x, playwright-core;
#      no browser download — the tests use Debian's /usr/bin/chromium).
#   4. clients/ts: the wsgate-client package: `npm ci` (TypeScript, ws; pinned by its
#      package-lock.json) and `npm run build` to dist/, which the Rust interop test
#      (crates/wsmux/tests/js_interop.rs) and the e2e browser tests load.
#   5. .cache/autobahn: Autobahn|Testsuite (Python 2.7 only) on a private CPython 2.7
#      unpacked from Debian bullseye .debs fetched with a private apt configuration
#      that points at the mirror this machine's apt already uses; the wrapper
#      .cache/autobahn/wstest runs it.
#
# Environment: SKIP_APT=1 skips step 1, SKIP_AUTOBAHN=1 skips step 5,
# FORCE=1 redoes steps 2-5.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
E2E="$ROOT/e2e"
CACHE="$ROOT/.cache"
AB="$CACHE/autobahn"
export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '[install-test-deps] %s\n' "$*" >&2; }
die() { printf '[install-test-deps] error: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else SUDO=""; fi
fi

# ---------------------------------------------------------------- 1. Debian
install_debian() {
  local want=(redis-server redis-tools socat chromium curl openssl apache2-utils nginx haproxy
    openssh-server openssh-client python3 python3-venv
    gcc libc6-dev ca-certificates debian-archive-keyring procps)
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    want+=(nodejs npm)
  fi
  local missing=()
  for p in "${want[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$p")
    fi
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    log "Debian packages: all present"
    return
  fi
  log "Debian packages: installing ${missing[*]}"
  # Do not start redis/nginx/haproxy services on their well-known ports.
  local made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  if [ -n "$made_policy" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
}

# Prints a hash of the given files (used as "already done" stamps).
stamp_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

# ------------------------------------------------------------ 2. Python venv
pick_python3() {
  if [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null; then
    echo /usr/bin/python3
  elif command -v python3 >/dev/null 2>&1; then
    command -v python3
  else
    die "no python3 found"
  fi
}

install_venv() {
  local want have=""
  want="$(stamp_of "$E2E/requirements.txt")"
  [ -f "$E2E/.venv/.stamp" ] && have="$(cat "$E2E/.venv/.stamp")"
  if [ -z "${FORCE:-}" ] && [ "$want" = "$have" ] \
    && "$E2E/.venv/bin/python" -c 'import pytest, pytest_timeout, websockets, jwt, cryptography, h2' 2>/dev/null; then
    log "e2e/.venv: up to date"
    return
  fi
  log "e2e/.venv: creating"
  rm -rf "$E2E/.venv"
  "$(pick_python3)" -m venv "$E2E/.venv"
  "$E2E/.venv/bin/pip" install -q --upgrade pip
  "$E2E/.venv/bin/pip" install -q -r "$E2E/requirements.txt"
  echo "$want" > "$E2E/.venv/.stamp"
}

# -------------------------------------------------------------- 3. npm ci
install_node_modules() {
  local want have=""
  want="$(stamp_of "$E2E/package-lock.json" "$E2E/package.json")"
  [ -f "$E2E/node_modules/.e2e-stamp" ] && have="$(cat "$E2E/node_modules/.e2e-stamp")"
  if [ -z "${FORCE:-}" ] && [ "$want" = "$have" ] && [ -d "$E2E/node_modules/ws" ] \
    && [ -d "$E2E/node_modules/playwright-core" ]; then
    log "e2e/node_modules: up to date"
    return
  fi
  log "e2e/node_modules: npm ci"
  (cd "$E2E" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" > "$E2E/node_modules/.e2e-stamp"
}

# ------------------------------------------------- 4. the TypeScript client
install_ts_client() {
  local dir="$ROOT/clients/ts" want have=""
  want="$(stamp_of "$dir/package-lock.json" "$dir/package.json")"
  [ -f "$dir/node_modules/.deps-stamp" ] && have="$(cat "$dir/node_modules/.deps-stamp")"
  if [ -z "${FORCE:-}" ] && [ "$want" = "$have" ] && [ -x "$dir/node_modules/.bin/tsc" ]; then
    log "clients/ts/node_modules: up to date"
  else
    log "clients/ts/node_modules: npm ci"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$want" > "$dir/node_modules/.deps-stamp"
  fi
  # The build's stamp covers its inputs: sources, tsconfig and the compiler.
  want="$(cd "$dir" && find src tsconfig.json package.json package-lock.json -type f | LC_ALL=C sort | xargs cat | sha256sum | cut -d' ' -f1)"
  have=""
  [ -f "$dir/node_modules/.build-stamp" ] && have="$(cat "$dir/node_modules/.build-stamp")"
  if [ -z "${FORCE:-}" ] && [ "$want" = "$have" ] && [ -f "$dir/dist/index.js" ]; then
    log "clients/ts/dist: up to date"
    return
  fi
  log "clients/ts/dist: npm run build"
  (cd "$dir" && rm -rf dist && npm run --silent build)
  echo "$want" > "$dir/node_modules/.build-stamp"
}

# ------------------------------------------------------- 5. Autobahn|Testsuite
AB_PINS=(setuptools==44.0.0 txaio==2.1.0 incremental==16.10.1 pyOpenSSL==19.1.0 cryptography==3.3.2
  Twisted==19.10.0 zope.interface==4.6.0 jinja2==2.11.3 markupsafe==1.1.1 Werkzeug==1.0.1
  klein==17.10.0 service_identity==18.1.0 unittest2==1.1.0 six==1.16.0 'autobahn[twisted,accelerate]==0.10.9')
AB_SUITE=autobahntestsuite==25.10.1
PY27_DEBS=(python2.7 python2.7-minimal libpython2.7-minimal libpython2.7-stdlib libpython2.7-dev
  python2.7-dev libssl1.1 libffi7)

# The Debian archive URI this machine's apt already uses (never hard-coded here).
debian_mirror_uri() {
  local f uri=""
  # deb822 sources: the first URIs entry that is the main archive (not -security).
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri="$(awk '
      /^[[:space:]]*$/ { if (u != "" && s !~ /security/) { print u; exit } u=""; s=""; next }
      /^URIs:/ { u=$2 }
      /^Suites:/ { s=$0 }
      END { if (u != "" && s !~ /security/) print u }' "$f" | head -n1)"
    [ -n "$uri" ] && break
  done
  if [ -z "$uri" ]; then
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
      [ -f "$f" ] || continue
      uri="$(awk '$1 == "deb" {
          for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { u = $i; s = $(i + 1); break }
          if (s !~ /security/) { print u; exit } }' "$f")"
      [ -n "$uri" ] && break
    done
  fi
  [ -n "$uri" ] || die "cannot find the Debian mirror in /etc/apt sources"
  echo "$uri"
}

install_autobahn() {
  local want have=""
  want="$(printf '%s\n' "${AB_PINS[@]}" "$AB_SUITE" "${PY27_DEBS[@]}" | sha256sum | cut -d' ' -f1)"
  [ -f "$AB/.stamp" ] && have="$(cat "$AB/.stamp")"
  if [ -z "${FORCE:-}" ] && [ "$want" = "$have" ] && "$AB/wstest" -a >/dev/null 2>&1; then
    log "Autobahn|Testsuite: up to date ($AB/wstest)"
    return
  fi
  log "Autobahn|Testsuite: installing into $AB"
  rm -rf "$AB"
  mkdir -p "$AB/apt/etc" "$AB/apt/state/lists/partial" "$AB/apt/cache/archives/partial" "$AB/debs"
  local arch triplet uri
  arch="$(dpkg --print-architecture)"
  triplet="$(gcc -print-multiarch 2>/dev/null || true)"
  [ -n "$triplet" ] || triplet="$(uname -m)-linux-gnu"
  uri="$(debian_mirror_uri)"
  local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  echo "deb [signed-by=$keyring] $uri bullseye main" > "$AB/apt/etc/sources.list"
  : > "$AB/apt/state/status"
  local aptopts=(
    -o "Dir::Etc::SourceList=$AB/apt/etc/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State=$AB/apt/state"
    -o "Dir::State::status=$AB/apt/state/status"
    -o "Dir::Cache=$AB/apt/cache"
    -o "APT::Architecture=$arch"
    -o "APT::Sandbox::User=root"
    -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false"
    -o "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false"
  )
  log "  fetching CPython 2.7 .debs from the bullseye suite"
  apt-get "${aptopts[@]}" -q update >"$AB/apt/update.log" 2>&1 || { cat "$AB/apt/update.log" >&2; die "private apt-get update failed"; }
  (cd "$AB/debs" && apt-get "${aptopts[@]}" -q download "${PY27_DEBS[@]}" >"$AB/apt/download.log" 2>&1) \
    || { cat "$AB/apt/download.log" >&2; die "apt-get download failed"; }
  local d
  for d in "$AB"/debs/*.deb; do dpkg -x "$d" "$AB/py27"; done
  local py27="$AB/py27/usr/bin/python2.7"
  local libdir="$AB/py27/usr/lib/$triplet"
  local inc="$AB/py27/usr/include"
  export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  "$py27" -c 'import ssl, zlib, hashlib, ctypes' || die "the unpacked python2.7 does not work"

  log "  virtualenv (<20.22) in a Python 3 tool venv"
  "$(pick_python3)" -m venv "$AB/tools"
  "$AB/tools/bin/pip" install -q 'virtualenv<20.22'
  "$AB/tools/bin/virtualenv" -q --no-periodic-update --app-data "$AB/virtualenv-app-data" -p "$py27" "$AB/venv"

  log "  pip install the pinned Twisted/autobahn stack and $AB_SUITE"
  # wsaccel is built from C: point the compiler at the private Python headers.
  CFLAGS="-I$inc -I$inc/python2.7 -I$inc/$triplet/python2.7" \
    "$AB/venv/bin/pip" install -q --no-python-version-warning "${AB_PINS[@]}" >"$AB/pip.log" 2>&1 \
    || { tail -n 40 "$AB/pip.log" >&2; die "pip install of the Autobahn stack failed"; }
  "$AB/venv/bin/pip" install -q --no-python-version-warning --no-deps "$AB_SUITE" >>"$AB/pip.log" 2>&1 \
    || { tail -n 40 "$AB/pip.log" >&2; die "pip install $AB_SUITE failed"; }

  cat > "$AB/wstest" <<EOF
#!/bin/sh
# Runs Autobahn|Testsuite's wstest on the private CPython 2.7 (generated by
# scripts/install-test-deps.sh).
export LD_LIBRARY_PATH="$libdir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$AB/venv/bin/wstest" "\$@"
EOF
  cat > "$AB/python" <<EOF
#!/bin/sh
# The Autobahn venv's Python 2.7 (generated by scripts/install-test-deps.sh).
export LD_LIBRARY_PATH="$libdir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$AB/venv/bin/python" "\$@"
EOF
  chmod 755 "$AB/wstest" "$AB/python"
  "$AB/wstest" -a >/dev/null 2>&1 || { "$AB/wstest" -a >&2 || true; die "wstest does not start"; }
  rm -rf "$AB/apt/cache" "$AB/apt/state/lists"
  echo "$want" > "$AB/.stamp"
  log "  done: $("$AB/wstest" -a 2>/dev/null | tr '\n' ' ')"
}

if [ -z "${SKIP_APT:-}" ]; then install_debian; fi
install_venv
install_node_modules
install_ts_client
if [ -z "${SKIP_AUTOBAHN:-}" ]; then install_autobahn; fi
log "all test dependencies are installed"
