//! The stored text form of a sealed value.
//!
//! `lhenc1:` followed by the unpadded base64url encoding of:
//!
//! ```text
//! version     u8        1
//! key id      u16 BE length, UTF-8 bytes   (the key-encryption key)
//! wrapped key u16 BE length, bytes         (the data key, wrapped)
//! nonce       12 bytes
//! ciphertext  rest: AES-256-GCM ciphertext with its 16-byte tag
//! ```
//!
//! The associated data is every byte before the nonce (the header) followed by
//! the encryption context's canonical bytes, so changing the key id, the wrapped
//! key or the context makes authentication fail.

use aws_lc_rs::aead::NONCE_LEN;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::{EncryptionContext, EnvelopeError};

/// The prefix of every sealed value this version writes.
pub const SEALED_PREFIX: &str = "lhenc1:";
/// The prefix shared by every envelope version (`lhenc<version>:`).
pub(crate) const FAMILY_PREFIX_STR: &str = "lhenc";
const FAMILY_PREFIX: &[u8] = FAMILY_PREFIX_STR.as_bytes();
const VERSION: u8 = 1;
const TAG_LEN: usize = 16;

/// A parsed envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Envelope {
    /// The key-encryption key named in the header.
    pub key_id: String,
    /// The wrapped data key.
    pub wrapped_key: Vec<u8>,
    pub nonce: [u8; NONCE_LEN],
    /// Ciphertext with tag.
    pub ciphertext: Vec<u8>,
}

/// Whether `stored` is an envelope (of any version) rather than legacy plaintext.
pub(crate) fn is_sealed(stored: &[u8]) -> bool {
    version_prefix_len(stored).is_some()
}

/// Length of `lhenc<digits>:` at the start of `stored`, if it is there.
fn version_prefix_len(stored: &[u8]) -> Option<usize> {
    let rest = stored.strip_prefix(FAMILY_PREFIX)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    (digits > 0 && rest.get(digits) == Some(&b':')).then_some(FAMILY_PREFIX.len() + digits + 1)
}

/// The header bytes (everything before the nonce) for a key id and wrapped key.
pub(crate) fn header(key_id: &str, wrapped_key: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    let key_len = u16::try_from(key_id.len())
        .map_err(|_| EnvelopeError::malformed("key id longer than 65535 bytes"))?;
    let wrapped_len = u16::try_from(wrapped_key.len())
        .map_err(|_| EnvelopeError::malformed("wrapped data key longer than 65535 bytes"))?;
    let mut out = Vec::with_capacity(5 + key_id.len() + wrapped_key.len());
    out.push(VERSION);
    out.extend_from_slice(&key_len.to_be_bytes());
    out.extend_from_slice(key_id.as_bytes());
    out.extend_from_slice(&wrapped_len.to_be_bytes());
    out.extend_from_slice(wrapped_key);
    Ok(out)
}

/// Associated data for the value's AEAD: header, then the context.
pub(crate) fn associated_data(header: &[u8], ctx: &EncryptionContext) -> Vec<u8> {
    let mut aad = header.to_vec();
    aad.extend_from_slice(&ctx.canonical_bytes());
    aad
}

/// The stored text for a header, nonce and ciphertext.
pub(crate) fn encode(header: &[u8], nonce: &[u8; NONCE_LEN], ciphertext: &[u8]) -> String {
    let mut binary = Vec::with_capacity(header.len() + NONCE_LEN + ciphertext.len());
    binary.extend_from_slice(header);
    binary.extend_from_slice(nonce);
    binary.extend_from_slice(ciphertext);
    let mut text = String::with_capacity(SEALED_PREFIX.len() + binary.len().div_ceil(3) * 4);
    text.push_str(SEALED_PREFIX);
    URL_SAFE_NO_PAD.encode_string(&binary, &mut text);
    text
}

/// Parse stored text; `Ok(None)` when it is not an envelope (legacy plaintext).
pub(crate) fn decode(stored: &[u8]) -> Result<Option<Envelope>, EnvelopeError> {
    let Some(prefix_len) = version_prefix_len(stored) else {
        return Ok(None);
    };
    if &stored[..prefix_len] != SEALED_PREFIX.as_bytes() {
        return Err(EnvelopeError::malformed(format!(
            "unsupported envelope version {:?} (this build reads {SEALED_PREFIX:?}); upgrade leasehold",
            String::from_utf8_lossy(&stored[..prefix_len])
        )));
    }
    let body = trim_trailing_newline(&stored[prefix_len..]);
    let binary = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|e| EnvelopeError::malformed(format!("bad base64url: {e}")))?;
    let mut reader = Reader(&binary);
    let version = reader.take(1, "version")?[0];
    if version != VERSION {
        return Err(EnvelopeError::malformed(format!(
            "binary format version {version}, expected {VERSION}"
        )));
    }
    let key_len = reader.take_u16("key id length")?;
    let key_id = std::str::from_utf8(reader.take(key_len, "key id")?)
        .map_err(|_| EnvelopeError::malformed("key id is not UTF-8"))?
        .to_owned();
    if key_id.is_empty() {
        return Err(EnvelopeError::malformed("empty key id"));
    }
    let wrapped_len = reader.take_u16("wrapped key length")?;
    let wrapped_key = reader.take(wrapped_len, "wrapped key")?.to_vec();
    let nonce: [u8; NONCE_LEN] = reader
        .take(NONCE_LEN, "nonce")?
        .try_into()
        .map_err(|_| EnvelopeError::malformed("nonce"))?;
    let ciphertext = reader.0.to_vec();
    if ciphertext.len() < TAG_LEN {
        return Err(EnvelopeError::malformed("ciphertext shorter than its tag"));
    }
    Ok(Some(Envelope {
        key_id,
        wrapped_key,
        nonce,
        ciphertext,
    }))
}

/// Values read back from files or YAML may carry one trailing newline.
fn trim_trailing_newline(bytes: &[u8]) -> &[u8] {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    bytes.strip_suffix(b"\r").unwrap_or(bytes)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], EnvelopeError> {
        if self.0.len() < n {
            return Err(EnvelopeError::malformed(format!("truncated at the {what}")));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn take_u16(&mut self, what: &str) -> Result<usize, EnvelopeError> {
        let bytes = self.take(2, what)?;
        Ok(usize::from(u16::from_be_bytes([bytes[0], bytes[1]])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> String {
        let header = header("local:0011223344556677", &[9u8; 60]).unwrap();
        encode(&header, &[1u8; NONCE_LEN], &[2u8; 40])
    }

    #[test]
    fn round_trip() {
        let text = sample();
        assert!(text.starts_with(SEALED_PREFIX));
        assert!(text.is_ascii());
        assert!(
            text[SEALED_PREFIX.len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        let envelope = decode(text.as_bytes()).unwrap().unwrap();
        assert_eq!(envelope.key_id, "local:0011223344556677");
        assert_eq!(envelope.wrapped_key, vec![9u8; 60]);
        assert_eq!(envelope.nonce, [1u8; NONCE_LEN]);
        assert_eq!(envelope.ciphertext, vec![2u8; 40]);
        // A trailing newline (from a file or YAML block) is tolerated.
        assert_eq!(
            decode(format!("{text}\n").as_bytes()).unwrap().unwrap(),
            envelope
        );
    }

    #[test]
    fn plaintext_is_not_an_envelope() {
        for plain in [
            &b""[..],
            b"hunter2",
            b"lhenc",
            b"lhenc:abc",
            b"lhencx1:abc",
            b"{\"v\":1}",
        ] {
            assert!(!is_sealed(plain));
            assert_eq!(decode(plain).unwrap(), None);
        }
        assert!(is_sealed(sample().as_bytes()));
        assert!(is_sealed(b"lhenc2:AAAA"));
    }

    #[test]
    fn malformed_envelopes_are_refused() {
        let text = sample();
        let cases: Vec<Vec<u8>> = vec![
            b"lhenc2:AAAA".to_vec(),
            b"lhenc1:not base64!".to_vec(),
            b"lhenc1:".to_vec(),
            // Truncated within the nonce, and within the header.
            text.as_bytes()[..text.len() - 60].to_vec(),
            text.as_bytes()[..SEALED_PREFIX.len() + 3].to_vec(),
            // Wrong inner version.
            encode(&[2u8, 0, 1, b'k', 0, 0], &[0; NONCE_LEN], &[0; 16]).into_bytes(),
            // Empty key id.
            encode(&[1u8, 0, 0, 0, 0], &[0; NONCE_LEN], &[0; 16]).into_bytes(),
            // Ciphertext shorter than a tag.
            encode(&[1u8, 0, 1, b'k', 0, 0], &[0; NONCE_LEN], &[0; 15]).into_bytes(),
        ];
        for case in cases {
            let err = decode(&case).unwrap_err();
            assert_eq!(err.reason(), "Malformed", "{err}");
        }
    }

    #[test]
    fn header_and_context_form_the_associated_data() {
        let ctx = EncryptionContext::new().with("lease", "a");
        let h = header("k", b"w").unwrap();
        let aad = associated_data(&h, &ctx);
        assert!(aad.starts_with(&h));
        assert!(aad.ends_with(&ctx.canonical_bytes()));
    }
}
