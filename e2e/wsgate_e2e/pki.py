"""A test PKI made with the openssl CLI: a CA, a server certificate,
client certificates (valid, expired, revoked, from another CA) and a CRL."""

from __future__ import annotations

import subprocess
from pathlib import Path


def openssl(*args, cwd):
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, cwd=cwd)


def make_pki(d: Path, clients: tuple[str, ...] = ()):
    """A CA, a server certificate, clients (valid, expired, revoked), a
    second CA's client, and a CRL listing the revoked one; `clients`: more
    valid client certificates, by CN (NAME.pem, NAME.key)."""
    (d / "newcerts").mkdir()
    (d / "index.txt").write_text("")
    (d / "serial").write_text("1000\n")
    (d / "crlnumber").write_text("1000\n")
    (d / "ca.cnf").write_text(f"""
[ca]
default_ca = CA_default
[CA_default]
dir = {d}
database = $dir/index.txt
new_certs_dir = $dir/newcerts
serial = $dir/serial
crlnumber = $dir/crlnumber
certificate = $dir/ca.pem
private_key = $dir/ca.key
default_md = sha256
default_days = 30
default_crl_days = 30
policy = any
copy_extensions = copy
unique_subject = no
[any]
commonName = supplied
[v3_ca]
basicConstraints = critical,CA:true
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[client]
basicConstraints = CA:false
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectAltName = DNS:client.test,email:ada@example.test
[server]
basicConstraints = CA:false
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
""")
    for ca in ("ca", "other"):
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "30", "-subj", f"/CN={ca} test CA",
                "-config", "ca.cnf", "-extensions", "v3_ca", cwd=d)

    def issue(name, ext, start=None, end=None, ca="ca"):
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        if ca == "ca":
            dates = ["-startdate", start, "-enddate", end] if start else []
            openssl("ca", "-batch", "-config", "ca.cnf", "-extensions", ext, "-in", f"{name}.csr",
                    "-out", f"{name}.pem", *dates, cwd=d)
        else:
            openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                    "-CAcreateserial", "-out", f"{name}.pem", "-days", "30", "-extfile", "ca.cnf",
                    "-extensions", ext, cwd=d)

    issue("server", "server")
    issue("alice", "client")
    for name in clients:
        issue(name, "client")
    issue("expired", "client", "20200101000000Z", "20200102000000Z")
    issue("revoked", "client")
    issue("stranger", "client", ca="other")
    openssl("ca", "-batch", "-config", "ca.cnf", "-revoke", "revoked.pem", cwd=d)
    openssl("ca", "-batch", "-config", "ca.cnf", "-gencrl", "-out", "ca.crl", cwd=d)
