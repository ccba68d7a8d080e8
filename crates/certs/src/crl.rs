use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ca::CertificateAuthority;

/// Why a certificate was revoked (RFC 5280 reason codes leasehold uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RevocationReason {
    Unspecified,
    KeyCompromise,
    CaCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
}

impl RevocationReason {
    fn to_rcgen(self) -> rcgen::RevocationReason {
        match self {
            RevocationReason::Unspecified => rcgen::RevocationReason::Unspecified,
            RevocationReason::KeyCompromise => rcgen::RevocationReason::KeyCompromise,
            RevocationReason::CaCompromise => rcgen::RevocationReason::CaCompromise,
            RevocationReason::AffiliationChanged => rcgen::RevocationReason::AffiliationChanged,
            RevocationReason::Superseded => rcgen::RevocationReason::Superseded,
            RevocationReason::CessationOfOperation => rcgen::RevocationReason::CessationOfOperation,
        }
    }
}

/// One revoked certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevocationEntry {
    /// Serial as lower-case hex, as in [`crate::IssuedCertificate::serial`].
    pub serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub revoked_at: OffsetDateTime,
    pub reason: RevocationReason,
    /// When the certificate expires; a CRL signed after that need not list it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub not_after: Option<OffsetDateTime>,
}

/// The revoked serials of one CA. The caller persists it (for example as JSON in a
/// Secret) and signs a new CRL whenever [`SignedCrl::needs_refresh`] says so.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevocationList {
    pub entries: Vec<RevocationEntry>,
    /// Number of the last CRL signed; each CRL gets the next one (RFC 5280 cRLNumber).
    pub last_crl_number: u64,
}

/// Signing a CRL failed.
#[derive(Debug, thiserror::Error)]
pub enum CrlError {
    #[error("serial {0:?} is not hex")]
    Serial(String),
    #[error("nextUpdate must be after thisUpdate")]
    Window,
    #[error("signing the CRL failed: {0}")]
    Sign(rcgen::Error),
}

/// A CRL as signed, with the window it covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedCrl {
    pub pem: String,
    pub crl_number: u64,
    pub this_update: OffsetDateTime,
    pub next_update: OffsetDateTime,
    /// How many entries of the [`RevocationList`] it lists.
    pub entries: usize,
}

impl RevocationList {
    /// Records a revocation; revoking a serial twice keeps the first entry.
    /// Returns whether the list changed.
    pub fn revoke(&mut self, serial: &str, at: OffsetDateTime, reason: RevocationReason) -> bool {
        let serial = serial.to_ascii_lowercase();
        if self.is_revoked(&serial) {
            return false;
        }
        self.entries.push(RevocationEntry {
            serial,
            revoked_at: at,
            reason,
            not_after: None,
        });
        true
    }

    pub fn is_revoked(&self, serial: &str) -> bool {
        self.entries
            .iter()
            .any(|entry| entry.serial.eq_ignore_ascii_case(serial))
    }

    /// Signs a CRL valid from `now` to `now + validity`, with the next CRL number.
    pub fn sign(
        &mut self,
        ca: &CertificateAuthority,
        now: OffsetDateTime,
        validity: time::Duration,
    ) -> Result<SignedCrl, CrlError> {
        if validity <= time::Duration::ZERO {
            return Err(CrlError::Window);
        }
        let revoked_certs = self
            .entries
            .iter()
            .map(|entry| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(
                        &parse_hex(&entry.serial)
                            .ok_or_else(|| CrlError::Serial(entry.serial.clone()))?,
                    ),
                    revocation_time: entry.revoked_at,
                    reason_code: Some(entry.reason.to_rcgen()),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, CrlError>>()?;
        let crl_number = self.last_crl_number + 1;
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + validity,
            crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(ca.issuer()).map_err(CrlError::Sign)?;
        let pem = crl.pem().map_err(CrlError::Sign)?;
        self.last_crl_number = crl_number;
        Ok(SignedCrl {
            pem,
            crl_number,
            this_update: params.this_update,
            next_update: params.next_update,
            entries: self.entries.len(),
        })
    }
}

impl SignedCrl {
    /// When to sign the next CRL if nothing is revoked meanwhile: two thirds of the way
    /// through its window, so relying parties never see an expired CRL.
    pub fn refresh_at(&self) -> OffsetDateTime {
        self.this_update + (self.next_update - self.this_update) * 2 / 3
    }

    /// Whether a new CRL must be signed now: the refresh time has come, or the list has
    /// entries this CRL does not carry.
    pub fn needs_refresh(&self, list: &RevocationList, now: OffsetDateTime) -> bool {
        now >= self.refresh_at() || list.entries.len() != self.entries
    }
}

fn parse_hex(text: &str) -> Option<Vec<u8>> {
    if text.is_empty() || !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}
