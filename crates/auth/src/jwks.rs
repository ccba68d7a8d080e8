//! OIDC discovery and JWK set documents, and their conversion into
//! `jsonwebtoken` decoding keys.

use jsonwebtoken::DecodingKey;
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

    /// The `jsonwebtoken` algorithm of the same name.
    pub(crate) fn to_jwt(self) -> jsonwebtoken::Algorithm {
        match self {
            Algorithm::RS256 => jsonwebtoken::Algorithm::RS256,
            Algorithm::RS384 => jsonwebtoken::Algorithm::RS384,
            Algorithm::RS512 => jsonwebtoken::Algorithm::RS512,
            Algorithm::PS256 => jsonwebtoken::Algorithm::PS256,
            Algorithm::PS384 => jsonwebtoken::Algorithm::PS384,
            Algorithm::PS512 => jsonwebtoken::Algorithm::PS512,
            Algorithm::ES256 => jsonwebtoken::Algorithm::ES256,
            Algorithm::ES384 => jsonwebtoken::Algorithm::ES384,
        }
    }

    /// The supported algorithm for a `jsonwebtoken` one; `None` for HMAC,
    /// EdDSA and anything else.
    pub(crate) fn from_jwt(alg: jsonwebtoken::Algorithm) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|a| a.to_jwt() == alg)
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

/// A key from the set, turned into a `jsonwebtoken` decoding key once, with
/// the algorithms it may be used with.
pub(crate) struct VerifyKey {
    pub(crate) kid: Option<Box<str>>,
    key_type: KeyType,
    pinned_alg: Option<Algorithm>,
    /// The allowed algorithms that fit this key (never empty).
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("key_type", &self.key_type)
            .field("pinned_alg", &self.pinned_alg)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

impl VerifyKey {
    /// The decoding key, if the header's algorithm may be used with this key:
    /// `None` for a wrong key type or curve, a JWK that pins another `alg`,
    /// or an algorithm outside the allowed set.
    pub(crate) fn decoding_key_for(&self, alg: Algorithm) -> Option<&DecodingKey> {
        if alg.key_type() != self.key_type || self.pinned_alg.is_some_and(|p| p != alg) {
            return None;
        }
        self.algorithms.contains(&alg).then_some(&self.key)
    }

    /// Checks a JWK and builds its decoding key, for the allowed algorithms
    /// it fits. The key material itself is checked by aws-lc when a
    /// signature is verified: a key it refuses verifies nothing.
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
        let algorithms: Vec<Algorithm> = allowed
            .iter()
            .copied()
            .filter(|a| a.key_type() == key_type && pinned_alg.is_none_or(|p| p == *a))
            .collect();
        if algorithms.is_empty() {
            return Err(skip("no allowed algorithm fits this key"));
        }
        let key = match key_type {
            KeyType::Rsa => {
                let (Some(n), Some(e)) = (jwk.n.as_deref(), jwk.e.as_deref()) else {
                    return Err(skip("missing n or e"));
                };
                if n.is_empty() || e.is_empty() {
                    return Err(skip("empty n or e"));
                }
                DecodingKey::from_rsa_components(n, e)
                    .map_err(|_| skip("n or e is not base64url"))?
            }
            KeyType::EcP256 | KeyType::EcP384 => {
                let coord_len = if key_type == KeyType::EcP256 { 32 } else { 48 };
                let (Some(x), Some(y)) = (jwk.x.as_deref(), jwk.y.as_deref()) else {
                    return Err(skip("missing x or y"));
                };
                let key = DecodingKey::from_ec_components(x, y)
                    .map_err(|_| skip("x or y is not base64url"))?;
                // The key is the SEC 1 point 0x04 || x || y; equal encoded
                // lengths mean equal decoded lengths, so each is coord_len.
                let point_len = key.try_get_as_bytes().ok().map(<[u8]>::len);
                if x.len() != y.len() || point_len != Some(1 + 2 * coord_len) {
                    return Err(skip("bad coordinate length"));
                }
                key
            }
        };
        Ok(VerifyKey {
            kid: jwk.kid.as_deref().map(Box::from),
            key_type,
            pinned_alg,
            algorithms,
            key,
        })
    }
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
