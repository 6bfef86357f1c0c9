//! `type = "mtls"`: the identity of a client certificate. The listener's
//! TLS handshake has already verified it (chain to `client_ca`, dates,
//! `crl`); this method reads its subject CN and SANs.

use rustls::CertificateError as C;

use super::{AuthRequest, Identity, Verdict};
use crate::config::auth::Mtls as Config;

/// Why a TLS handshake failed over the client's certificate (the `reason`
/// label of `wsgate_handshake_refusals_total`); `None` when it failed for
/// another reason.
pub fn tls_refusal(e: &std::io::Error) -> Option<&'static str> {
    let e = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(match e {
        rustls::Error::NoCertificatesPresented => "client_cert_missing",
        rustls::Error::InvalidCertificate(c) => match c {
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => "client_cert_expired",
            C::Revoked => "client_cert_revoked",
            C::UnknownIssuer => "client_cert_unknown_ca",
            _ => "client_cert_invalid",
        },
        _ => return None,
    })
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_failures_of_a_tls_handshake_have_a_reason() {
        let io = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let r = |e| tls_refusal(&io(e));
        assert_eq!(
            r(rustls::Error::NoCertificatesPresented),
            Some("client_cert_missing")
        );
        let cert = |c| r(rustls::Error::InvalidCertificate(c));
        assert_eq!(cert(C::Expired), Some("client_cert_expired"));
        assert_eq!(cert(C::Revoked), Some("client_cert_revoked"));
        assert_eq!(cert(C::UnknownIssuer), Some("client_cert_unknown_ca"));
        assert_eq!(cert(C::BadSignature), Some("client_cert_invalid"));
        assert_eq!(r(rustls::Error::HandshakeNotComplete), None);
        assert_eq!(tls_refusal(&std::io::Error::other("eof")), None);
    }
}
