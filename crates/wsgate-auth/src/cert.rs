//! What a client certificate says about its holder: the subject's common
//! name and the subject alternative names (DNS, URI, email). The chain, the
//! dates and revocation are checked by the TLS handshake before a request
//! exists; this only reads the fields.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// The identity fields of a certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertFields {
    pub cn: Option<String>,
    pub dns: Vec<String>,
    pub uri: Vec<String>,
    pub email: Vec<String>,
}

impl CertFields {
    /// Reads a DER certificate; `None` when it does not parse.
    pub fn from_der(der: &[u8]) -> Option<CertFields> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .map(str::to_string);
        let mut f = CertFields {
            cn,
            ..CertFields::default()
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    GeneralName::DNSName(d) => f.dns.push(d.to_string()),
                    GeneralName::URI(u) => f.uri.push(u.to_string()),
                    GeneralName::RFC822Name(e) => f.email.push(e.to_string()),
                    _ => {}
                }
            }
        }
        Some(f)
    }

    /// The first value of field `name` (`cn`, `dns`, `uri`, `email`).
    pub fn get(&self, name: &str) -> Option<&str> {
        match name {
            "cn" => self.cn.as_deref(),
            "dns" => self.dns.first().map(String::as_str),
            "uri" => self.uri.first().map(String::as_str),
            "email" => self.email.first().map(String::as_str),
            _ => None,
        }
    }
}

/// The certificate fields a config may name.
pub const FIELDS: [&str; 4] = ["cn", "dns", "uri", "email"];

/// Checks that a PEM file holds at least one certificate revocation list
/// that parses; the number of lists.
pub fn check_crls(pem: &[u8]) -> Result<usize, String> {
    let mut n = 0;
    for item in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let p = item.map_err(|e| format!("invalid PEM: {e}"))?;
        if p.label != "X509 CRL" {
            continue;
        }
        x509_parser::revocation_list::CertificateRevocationList::from_der(&p.contents)
            .map_err(|e| format!("CRL {}: {e}", n + 1))?;
        n += 1;
    }
    if n == 0 {
        return Err("no X509 CRL block found".into());
    }
    Ok(n)
}
