#!/usr/bin/env python3
"""Mints the benchmark's JWTs with the standard library and the openssl CLI
(no JWT library needed): HS256 with a secret file, ES256 with an EC P-256
private key (openssl signs; its DER signature becomes JOSE's r || s).

    mint.py hs256 SECRET_FILE SUB      # prints the token
    mint.py es256 KEY_PEM SUB
"""

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time


def b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def der_to_raw(der: bytes, size: int = 32) -> bytes:
    # ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER } (short lengths: P-256)
    assert der[0] == 0x30, "not a DER sequence"
    i = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    out = b""
    for _ in range(2):
        assert der[i] == 0x02, "not a DER integer"
        n = der[i + 1]
        v = der[i + 2:i + 2 + n].lstrip(b"\0")
        out += v.rjust(size, b"\0")
        i += 2 + n
    return out


def main():
    alg, key, sub = sys.argv[1:4]
    claims = {"sub": sub, "iat": int(time.time()), "exp": int(time.time()) + 86400}
    head = {"alg": alg.upper(), "typ": "JWT"}
    signing = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(claims).encode())}".encode()
    if alg == "hs256":
        secret = open(key, "rb").read().rstrip(b"\r\n")
        sig = hmac.new(secret, signing, hashlib.sha256).digest()
    elif alg == "es256":
        der = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key], input=signing,
                             capture_output=True, check=True).stdout
        sig = der_to_raw(der)
    else:
        sys.exit(f"mint.py: unknown algorithm {alg}")
    print(f"{signing.decode()}.{b64(sig)}")


if __name__ == "__main__":
    main()
