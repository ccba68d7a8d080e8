//! OIDC discovery and JWK set documents, and their conversion into parsed
//! verification keys.

use aws_lc_rs::signature::{self as sig, ParsedPublicKey, RsaPublicKeyComponents};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::error::SanitizedValue;

/// The subset of `/.well-known/openid-configuration` we use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OidcDiscovery {
    /// The issuer (`iss`) of the cluster's service-account tokens.
    pub issuer: String,
    /// Where the key set is published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// Signing algorithms the issuer uses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub id_token_signing_alg_values_supported: Vec<String>,
}

/// A JSON Web Key Set (RFC 7517). Keys we cannot use are skipped, not fatal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwkSet {
    /// The keys.
    pub keys: Vec<Jwk>,
}

/// One public key of a [`JwkSet`]. Only the members needed for RSA and EC
/// signature keys are kept; others are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Key type: `RSA` or `EC`.
    pub kty: String,
    /// Key id, matched against the token header's `kid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// The one algorithm this key may be used with, when pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// Intended use: only `sig` (or absent) is accepted.
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    pub key_use: Option<String>,
    /// RSA modulus, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    /// RSA public exponent, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    /// EC curve: `P-256` or `P-384`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    /// EC x coordinate, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    /// EC y coordinate, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
}

/// Signature algorithms that may be allowed. `none` and HMAC are not
/// representable: a verifier with public keys must never accept them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256 (the Kubernetes default).
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// RSASSA-PSS with SHA-384.
    PS384,
    /// RSASSA-PSS with SHA-512.
    PS512,
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// ECDSA on P-384 with SHA-384.
    ES384,
}

impl Algorithm {
    /// Every supported algorithm.
    pub const ALL: [Algorithm; 8] = [
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
        Algorithm::ES256,
        Algorithm::ES384,
    ];

    /// The JOSE name (`RS256`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RS256 => "RS256",
            Algorithm::RS384 => "RS384",
            Algorithm::RS512 => "RS512",
            Algorithm::PS256 => "PS256",
            Algorithm::PS384 => "PS384",
            Algorithm::PS512 => "PS512",
            Algorithm::ES256 => "ES256",
            Algorithm::ES384 => "ES384",
        }
    }

    /// Parses a JOSE name; `None` for anything unsupported (including `none`, HS*).
    pub fn from_name(name: &str) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|a| a.as_str() == name)
    }

    fn key_type(self) -> KeyType {
        match self {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => KeyType::Rsa,
            Algorithm::ES256 => KeyType::EcP256,
            Algorithm::ES384 => KeyType::EcP384,
        }
    }

    fn rsa_params(self) -> Option<&'static sig::RsaParameters> {
        Some(match self {
            Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
            Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
            Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
            Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
            Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
            Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
            Algorithm::ES256 | Algorithm::ES384 => return None,
        })
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyType {
    Rsa,
    EcP256,
    EcP384,
}

/// Why a key from the set was skipped.
#[derive(Debug)]
pub(crate) struct SkippedKey {
    pub(crate) kid: Option<SanitizedValue>,
    pub(crate) reason: &'static str,
}

/// A key from the set, parsed once, with one verifier per algorithm it may
/// be used with.
pub(crate) struct VerifyKey {
    pub(crate) kid: Option<Box<str>>,
    key_type: KeyType,
    pinned_alg: Option<Algorithm>,
    verifiers: Vec<(Algorithm, ParsedPublicKey)>,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("key_type", &self.key_type)
            .field("pinned_alg", &self.pinned_alg)
            .field(
                "algorithms",
                &self.verifiers.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Outcome of asking a key for a verifier for the header's algorithm.
pub(crate) enum KeyMatch<'a> {
    Verifier(&'a ParsedPublicKey),
    /// Wrong key type or curve, or the JWK pins another `alg`.
    Mismatch,
}

impl VerifyKey {
    pub(crate) fn verifier_for(&self, alg: Algorithm) -> KeyMatch<'_> {
        if alg.key_type() != self.key_type || self.pinned_alg.is_some_and(|p| p != alg) {
            return KeyMatch::Mismatch;
        }
        match self.verifiers.iter().find(|(a, _)| *a == alg) {
            Some((_, key)) => KeyMatch::Verifier(key),
            // Compatible but not allowed: the caller checked the allowed set
            // first, so this only happens for a pinned alg outside it.
            None => KeyMatch::Mismatch,
        }
    }

    /// Parses a JWK, keeping verifiers for the allowed algorithms it fits.
    pub(crate) fn from_jwk(jwk: &Jwk, allowed: &[Algorithm]) -> Result<VerifyKey, SkippedKey> {
        let skip = |reason| SkippedKey {
            kid: jwk.kid.as_deref().map(SanitizedValue::new),
            reason,
        };
        if jwk.key_use.as_deref().is_some_and(|u| u != "sig") {
            return Err(skip("key use is not sig"));
        }
        let pinned_alg = match jwk.alg.as_deref() {
            None => None,
            Some(name) => match Algorithm::from_name(name) {
                Some(a) => Some(a),
                None => return Err(skip("unsupported alg")),
            },
        };
        let key_type = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
            ("RSA", _) => KeyType::Rsa,
            ("EC", Some("P-256")) => KeyType::EcP256,
            ("EC", Some("P-384")) => KeyType::EcP384,
            ("EC", _) => return Err(skip("unsupported curve")),
            _ => return Err(skip("unsupported key type")),
        };
        let algorithms = allowed
            .iter()
            .copied()
            .filter(|a| a.key_type() == key_type && pinned_alg.is_none_or(|p| p == *a));
        let mut verifiers = Vec::new();
        match key_type {
            KeyType::Rsa => {
                let n = decode_member(jwk.n.as_deref()).ok_or_else(|| skip("bad n"))?;
                let e = decode_member(jwk.e.as_deref()).ok_or_else(|| skip("bad e"))?;
                let components = RsaPublicKeyComponents {
                    n: n.as_slice(),
                    e: e.as_slice(),
                };
                for alg in algorithms {
                    let Some(params) = alg.rsa_params() else {
                        continue;
                    };
                    let key = components
                        .to_parsed_public_key(params)
                        .map_err(|_| skip("invalid RSA key"))?;
                    verifiers.push((alg, key));
                }
            }
            KeyType::EcP256 | KeyType::EcP384 => {
                let (coord_len, verify_alg): (usize, &'static sig::EcdsaVerificationAlgorithm) =
                    if key_type == KeyType::EcP256 {
                        (32, &sig::ECDSA_P256_SHA256_FIXED)
                    } else {
                        (48, &sig::ECDSA_P384_SHA384_FIXED)
                    };
                let x = decode_member(jwk.x.as_deref()).ok_or_else(|| skip("bad x"))?;
                let y = decode_member(jwk.y.as_deref()).ok_or_else(|| skip("bad y"))?;
                if x.len() != coord_len || y.len() != coord_len {
                    return Err(skip("bad coordinate length"));
                }
                // SEC 1 uncompressed point: 0x04 || x || y.
                let mut point = Vec::with_capacity(1 + 2 * coord_len);
                point.push(0x04);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                for alg in algorithms {
                    let key = ParsedPublicKey::new(verify_alg, &point)
                        .map_err(|_| skip("invalid EC point"))?;
                    verifiers.push((alg, key));
                }
            }
        }
        if verifiers.is_empty() {
            return Err(skip("no allowed algorithm fits this key"));
        }
        Ok(VerifyKey {
            kid: jwk.kid.as_deref().map(Box::from),
            key_type,
            pinned_alg,
            verifiers,
        })
    }
}

fn decode_member(value: Option<&str>) -> Option<Vec<u8>> {
    let bytes = URL_SAFE_NO_PAD.decode(value?).ok()?;
    (!bytes.is_empty()).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_names_round_trip_and_exclude_none_and_hmac() {
        for a in Algorithm::ALL {
            assert_eq!(Algorithm::from_name(a.as_str()), Some(a));
        }
        for bad in [
            "none", "None", "HS256", "HS384", "HS512", "EdDSA", "rs256", "",
        ] {
            assert_eq!(Algorithm::from_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn skips_unusable_keys() {
        let oct = Jwk {
            kty: "oct".into(),
            kid: Some("k".into()),
            ..Jwk::default()
        };
        assert!(VerifyKey::from_jwk(&oct, &Algorithm::ALL).is_err());
        let enc = Jwk {
            kty: "RSA".into(),
            key_use: Some("enc".into()),
            ..Jwk::default()
        };
        assert!(VerifyKey::from_jwk(&enc, &Algorithm::ALL).is_err());
        let bad_ec = Jwk {
            kty: "EC".into(),
            crv: Some("P-256".into()),
            x: Some("AAAA".into()),
            y: Some("AAAA".into()),
            ..Jwk::default()
        };
        assert!(VerifyKey::from_jwk(&bad_ec, &Algorithm::ALL).is_err());
    }

    #[test]
    fn jwk_set_ignores_unknown_members() {
        let set: JwkSet = serde_json::from_str(
            r#"{"keys":[{"kty":"RSA","kid":"a","n":"AQAB","e":"AQAB","x5c":["x"],"extra":1}]}"#,
        )
        .expect("parse");
        assert_eq!(set.keys.len(), 1);
        assert_eq!(set.keys[0].kid.as_deref(), Some("a"));
    }
}
