//! JSON Web Tokens (RFC 7519) in the JWS compact form, checked with
//! [`jsonwebtoken`]: keys from a PEM file, an HMAC secret or a JWKS document,
//! and the rules a token must meet.
//!
//! What [`KeySet::verify`] guarantees, in this order (the first failure is
//! the [`Refusal`]):
//!
//! 1. the token is at most `max_len` bytes and has three base64url parts
//!    whose header is JSON naming a known algorithm (`alg: none` and unknown
//!    names are refused: [`Refusal::Algorithm`]);
//! 2. the header's `alg` is one of the rules' algorithms, and a key of that
//!    algorithm's **family** exists (an HMAC secret never checks an `RS256`
//!    token, an RSA public key never checks an `HS256` one — the RS/HS key
//!    confusion); a key whose JWK names an `alg` is used for that one only;
//!    a JWK for `use: enc` is not loaded at all;
//! 3. the signature verifies with one such key (the header's `kid` picks the
//!    key when a key has that id);
//! 4. `exp` (required unless the rules say otherwise) and `nbf` hold, with
//!    the rules' leeway; `iss` is one of the issuers and `aud` one of the
//!    audiences, where the rules list any (they are then required).

use std::str::FromStr;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::{Map, Value};

pub use jsonwebtoken::Algorithm as Alg;

/// The claims of a verified token.
pub type Claims = Map<String, Value>;

/// Why a token was refused; [`Refusal::label`] is its metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the token is longer than allowed")]
    TooLong,
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's algorithm is not accepted")]
    Algorithm,
    #[error("no key for the token's algorithm or key id")]
    UnknownKey,
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's issuer is not accepted")]
    Issuer,
    #[error("the token's audience is not accepted")]
    Audience,
    #[error("the token lacks a required claim")]
    MissingClaim,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::TooLong => "token_too_long",
            Refusal::Malformed => "malformed",
            Refusal::Algorithm => "algorithm",
            Refusal::UnknownKey => "unknown_key",
            Refusal::Signature => "bad_signature",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::Issuer => "wrong_issuer",
            Refusal::Audience => "wrong_audience",
            Refusal::MissingClaim => "missing_claim",
        }
    }
}

/// A key file or document that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(pub String);

/// One verification key.
#[derive(Clone)]
pub struct Key {
    pub kid: Option<String>,
    family: AlgorithmFamily,
    /// The only algorithm this key checks (a JWK's `alg`, an EC curve's).
    alg: Option<Algorithm>,
    key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("family", &self.family)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// The keys tokens are checked with.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<Key>,
}

/// What a token must meet besides its signature.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Accepted algorithms; empty: every algorithm of the keys' families.
    pub algorithms: Vec<Algorithm>,
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    /// Seconds of clock skew allowed on `exp` and `nbf`.
    pub leeway: u64,
    pub require_exp: bool,
    pub max_len: usize,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            algorithms: vec![],
            issuers: vec![],
            audiences: vec![],
            leeway: 30,
            require_exp: true,
            max_len: 8192,
        }
    }
}

/// Parses an algorithm name as in a JWT header (`HS256`, `ES256`, `EdDSA`…).
pub fn parse_algorithm(s: &str) -> Result<Algorithm, KeyError> {
    Algorithm::from_str(s).map_err(|_| {
        KeyError(format!(
            "unknown algorithm `{}` (expected HS256, HS384, HS512, RS256, RS384, RS512, \
             PS256, PS384, PS512, ES256, ES384 or EdDSA)",
            s.chars().take(40).collect::<String>()
        ))
    })
}

/// The PEM blocks of a text, each with its BEGIN and END lines.
fn pem_blocks(text: &str) -> Vec<&str> {
    let mut out = vec![];
    let mut rest = text;
    while let Some(b) = rest.find("-----BEGIN ") {
        let from = &rest[b..];
        let Some(e) = from.find("-----END ") else {
            break;
        };
        let tail = &from[e + 9..];
        let end = tail.find("-----").map_or(from.len(), |i| e + 9 + i + 5);
        out.push(&from[..end]);
        rest = &from[end..];
    }
    out
}

impl KeySet {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The public keys of a PEM file (RSA, EC P-256/P-384 or Ed25519
    /// `PUBLIC KEY` blocks; RSA also `RSA PUBLIC KEY`), one key per block.
    pub fn from_pem(text: &[u8]) -> Result<KeySet, KeyError> {
        let text = std::str::from_utf8(text).map_err(|_| KeyError("not PEM text".into()))?;
        let mut keys = vec![];
        for (i, block) in pem_blocks(text).into_iter().enumerate() {
            if block.contains("PRIVATE KEY") {
                return Err(KeyError(format!(
                    "PEM block {}: a private key; give the public key",
                    i + 1
                )));
            }
            let b = block.as_bytes();
            let (family, key) = if let Ok(k) = DecodingKey::from_rsa_pem(b) {
                (AlgorithmFamily::Rsa, k)
            } else if let Ok(k) = DecodingKey::from_ec_pem(b) {
                (AlgorithmFamily::Ec, k)
            } else if let Ok(k) = DecodingKey::from_ed_pem(b) {
                (AlgorithmFamily::Ed, k)
            } else {
                return Err(KeyError(format!(
                    "PEM block {}: not an RSA, EC (P-256, P-384) or Ed25519 public key",
                    i + 1
                )));
            };
            keys.push(Key {
                kid: None,
                family,
                alg: None,
                key,
            });
        }
        if keys.is_empty() {
            return Err(KeyError("no PEM public key found".into()));
        }
        Ok(KeySet { keys })
    }

    /// An HMAC secret (HS256/384/512): at least 32 bytes (RFC 7518 §3.2:
    /// no shorter than the hash).
    pub fn from_secret(secret: &[u8]) -> Result<KeySet, KeyError> {
        if secret.len() < 32 {
            return Err(KeyError(format!(
                "an HMAC secret of {} bytes: at least 32 are needed",
                secret.len()
            )));
        }
        let key = DecodingKey::from_secret(secret).map_err(|e| KeyError(e.to_string()))?;
        Ok(KeySet {
            keys: vec![Key {
                kid: None,
                family: AlgorithmFamily::Hmac,
                alg: None,
                key,
            }],
        })
    }

    /// The signature keys of a JWKS document (`{"keys": [...]}`): keys for
    /// `use: enc`, of unknown types or malformed are left out (a provider
    /// may publish keys this gateway has no use for); none usable is an
    /// error.
    pub fn from_jwks(text: &[u8]) -> Result<KeySet, KeyError> {
        let doc: Value =
            serde_json::from_slice(text).map_err(|e| KeyError(format!("not JSON: {e}")))?;
        let list = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| KeyError("no `keys` array".into()))?;
        let mut keys = vec![];
        let mut skipped = vec![];
        for (i, v) in list.iter().enumerate().take(1024) {
            match jwk_key(v) {
                Ok(Some(k)) => keys.push(k),
                Ok(None) => {}
                Err(why) => skipped.push(format!("key {}: {why}", i + 1)),
            }
        }
        if keys.is_empty() {
            let why = if skipped.is_empty() {
                String::new()
            } else {
                format!(" ({})", skipped.join("; "))
            };
            return Err(KeyError(format!("no usable signature key{why}")));
        }
        Ok(KeySet { keys })
    }

    /// Checks a token; its claims when it passes.
    pub fn verify(&self, token: &str, rules: &Rules) -> Result<Claims, Refusal> {
        if token.len() > rules.max_len {
            return Err(Refusal::TooLong);
        }
        if token.bytes().filter(|&b| b == b'.').count() != 2 {
            return Err(Refusal::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as E;
            match e.kind() {
                E::InvalidAlgorithmName | E::UnsupportedAlgorithm | E::InvalidAlgorithm => {
                    Refusal::Algorithm
                }
                // `alg` names something serde cannot take (`none`...).
                E::Json(j) if j.to_string().contains("variant") => Refusal::Algorithm,
                _ => Refusal::Malformed,
            }
        })?;
        let alg = header.alg;
        if !rules.algorithms.is_empty() && !rules.algorithms.contains(&alg) {
            return Err(Refusal::Algorithm);
        }
        let fits = |k: &&Key| k.family == alg.family() && k.alg.is_none_or(|a| a == alg);
        let mut candidates: Vec<&Key> = self.keys.iter().filter(fits).collect();
        if let Some(kid) = &header.kid {
            // A token naming a key id is checked by that key, or by keys
            // without an id; a set that lacks it says so (a JWKS file is
            // then read again: a rotated key).
            if candidates.iter().any(|k| k.kid.as_deref() == Some(kid)) {
                candidates.retain(|k| k.kid.as_deref() == Some(kid));
            } else {
                candidates.retain(|k| k.kid.is_none());
            }
        }
        if candidates.is_empty() {
            return Err(Refusal::UnknownKey);
        }
        let mut v = Validation::new(alg);
        v.leeway = rules.leeway;
        v.validate_nbf = true;
        v.validate_exp = true;
        v.required_spec_claims.clear();
        if rules.require_exp {
            v.required_spec_claims.insert("exp".into());
        }
        if rules.issuers.is_empty() {
            v.iss = None;
        } else {
            v.set_issuer(&rules.issuers);
            v.required_spec_claims.insert("iss".into());
        }
        if rules.audiences.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&rules.audiences);
            v.required_spec_claims.insert("aud".into());
        }
        let mut last = Refusal::Signature;
        for k in candidates {
            match jsonwebtoken::decode::<Claims>(token, &k.key, &v) {
                Ok(data) => return Ok(data.claims),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as E;
                    last = match e.kind() {
                        E::InvalidSignature
                        | E::InvalidEcdsaKey
                        | E::InvalidEddsaKey
                        | E::InvalidRsaKey(_)
                        | E::InvalidKeyFormat => {
                            last = Refusal::Signature;
                            continue;
                        }
                        E::ExpiredSignature => Refusal::Expired,
                        E::ImmatureSignature => Refusal::NotYetValid,
                        E::InvalidIssuer => Refusal::Issuer,
                        E::InvalidAudience => Refusal::Audience,
                        E::MissingRequiredClaim(_) => Refusal::MissingClaim,
                        E::InvalidAlgorithm | E::UnsupportedAlgorithm | E::MissingAlgorithm => {
                            Refusal::Algorithm
                        }
                        _ => Refusal::Malformed,
                    };
                    // The signature verified (claims are checked after
                    // it): no other key would change the verdict.
                    return Err(last);
                }
            }
        }
        Err(last)
    }
}

/// One JWK as a key; `None` for a key not meant for signatures.
fn jwk_key(v: &Value) -> Result<Option<Key>, String> {
    let jwk: Jwk = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return Ok(None);
    }
    let alg = match &jwk.common.key_algorithm {
        None => None,
        Some(a) => {
            let name = a.to_string();
            Some(
                parse_algorithm(&name)
                    .map_err(|_| format!("`alg` {name} is not a JWS algorithm"))?,
            )
        }
    };
    let (family, curve_alg) = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => (AlgorithmFamily::Rsa, None),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => (AlgorithmFamily::Ec, Some(Algorithm::ES256)),
            EllipticCurve::P384 => (AlgorithmFamily::Ec, Some(Algorithm::ES384)),
            _ => return Err("an EC curve other than P-256 or P-384".into()),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => (AlgorithmFamily::Ed, None),
            _ => return Err("an OKP curve other than Ed25519".into()),
        },
        AlgorithmParameters::OctetKey(_) => (AlgorithmFamily::Hmac, None),
        _ => return Err("an unknown key type".into()),
    };
    if let Some(a) = alg {
        if a.family() != family || curve_alg.is_some_and(|c| c != a) {
            return Err(format!("`alg` {a:?} does not fit the key's type"));
        }
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
    if family == AlgorithmFamily::Hmac && key.try_get_as_bytes().map_or(0, <[u8]>::len) < 32 {
        return Err("an HMAC key shorter than 32 bytes".into());
    }
    Ok(Some(Key {
        kid: jwk.common.key_id.clone(),
        family,
        alg: alg.or(curve_alg),
        key,
    }))
}

/// The families a key set covers (for choosing default algorithms).
pub fn families(set: &KeySet) -> Vec<AlgorithmFamily> {
    let mut out: Vec<AlgorithmFamily> = vec![];
    for k in &set.keys {
        if !out.contains(&k.family) {
            out.push(k.family);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn hs(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn hmac_tokens_and_their_claims_are_checked() {
        let keys = KeySet::from_secret(SECRET).unwrap();
        let rules = Rules {
            issuers: vec!["https://idp".into()],
            audiences: vec!["wsgate".into()],
            ..Rules::default()
        };
        let good = serde_json::json!({"sub": "ada", "exp": now() + 60, "iss": "https://idp", "aud": "wsgate", "tenant": "t1"});
        let c = keys.verify(&hs(good.clone()), &rules).unwrap();
        assert_eq!(c["sub"], "ada");
        let with = |k: &str, v: serde_json::Value| {
            let mut c = good.clone();
            c[k] = v;
            keys.verify(&hs(c), &rules)
        };
        assert_eq!(with("exp", (now() - 120).into()), Err(Refusal::Expired));
        assert!(
            with("exp", (now() - 10).into()).is_ok(),
            "within the leeway"
        );
        assert_eq!(with("nbf", (now() + 120).into()), Err(Refusal::NotYetValid));
        assert_eq!(with("iss", "https://evil".into()), Err(Refusal::Issuer));
        assert_eq!(with("aud", "other".into()), Err(Refusal::Audience));
        let mut no_exp = good.clone();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(keys.verify(&hs(no_exp), &rules), Err(Refusal::MissingClaim));
        let other = encode(
            &Header::new(Algorithm::HS256),
            &good,
            &EncodingKey::from_secret(b"another secret, 32 bytes or more").unwrap(),
        )
        .unwrap();
        assert_eq!(keys.verify(&other, &rules), Err(Refusal::Signature));
        // `alg: none`, garbage, a truncated token, a huge one.
        let none = format!(
            "{}.{}.",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0",
            hs(good.clone()).split('.').nth(1).unwrap()
        );
        assert_eq!(keys.verify(&none, &rules), Err(Refusal::Algorithm));
        assert_eq!(keys.verify("a.b", &rules), Err(Refusal::Malformed));
        let t = hs(good.clone());
        assert!(keys.verify(&t[..t.len() - 5], &rules).is_err());
        let huge = format!("{t}{}", "A".repeat(100_000));
        assert_eq!(keys.verify(&huge, &rules), Err(Refusal::TooLong));
        // An algorithm outside the rules.
        let es_only = Rules {
            algorithms: vec![Algorithm::ES256],
            ..rules.clone()
        };
        assert_eq!(keys.verify(&t, &es_only), Err(Refusal::Algorithm));
    }

    #[test]
    fn short_secrets_private_keys_and_empty_jwks_are_refused() {
        assert!(KeySet::from_secret(b"short").is_err());
        assert!(KeySet::from_pem(
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        )
        .is_err());
        assert!(KeySet::from_pem(b"nothing").is_err());
        assert!(KeySet::from_jwks(b"{\"keys\": []}").is_err());
        assert!(KeySet::from_jwks(b"[]").is_err());
        let enc_only = br#"{"keys":[{"kty":"oct","use":"enc","k":"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY"}]}"#;
        assert!(KeySet::from_jwks(enc_only).is_err());
        let oct = br#"{"keys":[{"kty":"oct","kid":"k1","alg":"HS256","k":"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY"}, {"kty":"weird"}]}"#;
        let set = KeySet::from_jwks(oct).unwrap();
        assert_eq!(set.len(), 1);
        let t = hs(serde_json::json!({"sub": "x", "exp": now() + 60}));
        assert!(set.verify(&t, &Rules::default()).is_ok());
        // A JWK bound to HS256 does not check HS384.
        let t384 = encode(
            &Header::new(Algorithm::HS384),
            &serde_json::json!({"sub": "x", "exp": now() + 60}),
            &EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap();
        assert_eq!(
            set.verify(&t384, &Rules::default()),
            Err(Refusal::UnknownKey)
        );
    }
}
