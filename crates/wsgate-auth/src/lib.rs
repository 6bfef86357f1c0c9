//! wsgate's credential formats, sans-IO (no sockets, no runtime): what the
//! gateway's authentication methods (`crates/wsgate/src/auth/`), its config
//! checks (`wsgate check`) and the fuzz targets share.
//!
//! * [`jwt`]: JWT keys from PEM, an HMAC secret or JWKS, and token checks;
//! * [`htpasswd`]: htpasswd files (bcrypt, argon2);
//! * [`origin`]: Origin allowlists against cross-site WebSocket hijacking;
//! * [`cert`]: a client certificate's CN and SANs; CRL files checked;
//! * [`template`]: `{claim:…}` / `{cert:…}` templates filled from an identity.

pub mod cert;
pub mod htpasswd;
pub mod jwt;
pub mod origin;
pub mod template;
