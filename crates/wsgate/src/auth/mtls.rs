//! `type = "mtls"`: the identity of a client certificate. The listener's
//! TLS handshake has already verified it (chain to `client_ca`, dates,
//! `crl`); this method reads its subject CN and SANs.

use super::{AuthRequest, Identity, Verdict};
use crate::config::auth::Mtls as Config;

pub struct Mtls {
    subject: String,
}

impl Mtls {
    pub fn new(c: &Config) -> Mtls {
        Mtls {
            subject: c.subject.clone(),
        }
    }

    pub fn check(&self, req: AuthRequest<'_>) -> Verdict {
        let Some(cert) = req.client_cert else {
            return Verdict::Absent;
        };
        let Some(f) = wsgate_auth::cert::CertFields::from_der(cert.as_ref()) else {
            return Verdict::refuse("cert_unreadable");
        };
        let Some(subject) = f.get(&self.subject).map(str::to_string) else {
            return Verdict::refuse("cert_no_subject");
        };
        let mut id = Identity::subject(subject);
        for field in wsgate_auth::cert::FIELDS {
            if let Some(v) = f.get(field) {
                id.attributes.push((format!("cert:{field}"), v.to_string()));
            }
        }
        Verdict::Admit(id)
    }
}
