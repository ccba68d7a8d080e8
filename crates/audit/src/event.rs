//! What an audit record says: [`AuditEvent`], built with a small builder.
//!
//! # No secrets, by construction
//!
//! An event identifies a credential by lease, version and username only. There is no
//! field for a password, private key, token or any other secret value, and the builder
//! takes plain text only for `reason` and `detail_kv`, which are meant for the same
//! texts the project already puts into Kubernetes Events and logs (those are written to
//! be secret-free). As a second line of defence, a text that looks like PEM key material
//! or a JWT is replaced with a marker, and every text is capped at
//! [`MAX_TEXT_LEN`] characters.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Longest text kept in `reason` or a detail value; longer texts are cut.
pub const MAX_TEXT_LEN: usize = 1024;

/// Marker written instead of a text that looked like key material or a token.
pub const REDACTED_TEXT: &str = "[redacted: looked like key material or a token]";

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A new credential version was issued at the backend.
    Issue,
    /// A credential was checked against the backend (see the outcome).
    Verify,
    /// A credential version became the current one.
    Promote,
    /// A credential was delivered to its consumers (Secret, files).
    Deliver,
    /// Consumers acknowledged a version.
    Acknowledge,
    /// A credential version was revoked (see the outcome).
    Revoke,
    /// The broker was asked for a credential for a CSI volume.
    BrokerIssue,
    /// The broker was told a CSI volume's credential is released.
    BrokerRelease,
    /// A node acknowledged a credential through the broker.
    BrokerAcknowledge,
    /// An operator requested an emergency revocation.
    EmergencyRevoke,
    /// Rotation of a lease was suspended.
    Suspend,
    /// Rotation of a lease was resumed.
    Resume,
    /// A key (e.g. an encryption or signing key) was generated.
    KeyGenerate,
    /// Stored material was re-wrapped under a new key.
    KeyRewrap,
    /// A key needed for an operation was unavailable.
    KeyUnavailable,
    /// A certificate was issued for a lease.
    CertificateIssue,
    /// A certificate was revoked at its CA.
    CertificateRevoke,
    /// The audit chain (re)started; written by the log itself.
    ChainStart,
}

impl Action {
    /// The snake_case name, as serialized (and used as the metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Issue => "issue",
            Self::Verify => "verify",
            Self::Promote => "promote",
            Self::Deliver => "deliver",
            Self::Acknowledge => "acknowledge",
            Self::Revoke => "revoke",
            Self::BrokerIssue => "broker_issue",
            Self::BrokerRelease => "broker_release",
            Self::BrokerAcknowledge => "broker_acknowledge",
            Self::EmergencyRevoke => "emergency_revoke",
            Self::Suspend => "suspend",
            Self::Resume => "resume",
            Self::KeyGenerate => "key_generate",
            Self::KeyRewrap => "key_rewrap",
            Self::KeyUnavailable => "key_unavailable",
            Self::CertificateIssue => "certificate_issue",
            Self::CertificateRevoke => "certificate_revoke",
            Self::ChainStart => "chain_start",
        }
    }
}

/// How it ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The operation was done.
    Success,
    /// The operation was attempted and failed.
    Failure,
    /// A request was authorized.
    Allowed,
    /// A request was refused.
    Denied,
    /// An operation was asked for (it happens later, with its own record).
    Requested,
}

/// A namespaced Kubernetes object (a lease, a service account).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

/// A pod, with its UID (names are reused; UIDs are not).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// One security-relevant event. Build it with [`AuditEvent::new`] and the setters; hand
/// it to [`crate::AuditLog::record`].
///
/// ```
/// use leasehold_audit::{Action, AuditEvent, Outcome};
/// let event = AuditEvent::new(Action::Revoke, Outcome::Success)
///     .lease("shop", "orders-db")
///     .version(3)
///     .username("lh_orders_3")
///     .reason("superseded by version 4");
/// assert_eq!(event.action(), Action::Revoke);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    action: Action,
    outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease: Option<ObjectRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod: Option<PodRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service_account: Option<ObjectRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    detail: BTreeMap<String, String>,
}

impl AuditEvent {
    /// An event with only its action and outcome.
    pub fn new(action: Action, outcome: Outcome) -> Self {
        Self {
            action,
            outcome,
            lease: None,
            version: None,
            username: None,
            pod: None,
            service_account: None,
            node: None,
            reason: None,
            detail: BTreeMap::new(),
        }
    }

    /// The same event with another outcome (for events built before the outcome is known).
    pub fn with_outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }

    /// The lease (`SecretLease`) concerned.
    pub fn lease(mut self, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        self.lease = Some(ObjectRef {
            namespace: clean(namespace.into()),
            name: clean(name.into()),
        });
        self
    }

    /// The credential version concerned.
    pub fn version(mut self, version: u64) -> Self {
        self.version = Some(version);
        self
    }

    /// The database username (or certificate subject) of the credential: an identifier,
    /// never a password.
    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.username = Some(clean(username.into()));
        self
    }

    /// The pod on whose behalf the request was made.
    pub fn pod(
        mut self,
        namespace: impl Into<String>,
        name: impl Into<String>,
        uid: impl Into<String>,
    ) -> Self {
        self.pod = Some(PodRef {
            namespace: clean(namespace.into()),
            name: clean(name.into()),
            uid: clean(uid.into()),
        });
        self
    }

    /// The service account of that pod.
    pub fn service_account(
        mut self,
        namespace: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        self.service_account = Some(ObjectRef {
            namespace: clean(namespace.into()),
            name: clean(name.into()),
        });
        self
    }

    /// The node the request came from.
    pub fn node(mut self, node: impl Into<String>) -> Self {
        self.node = Some(clean(node.into()));
        self
    }

    /// Why: the same secret-free text as the matching Kubernetes Event or log line.
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(clean(reason.into()));
        self
    }

    /// One more key/value of context (e.g. `"backend", "postgres"`). Same rule as
    /// [`AuditEvent::reason`]: identifiers and secret-free texts only.
    pub fn detail_kv(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.detail.insert(clean(key.into()), clean(value.into()));
        self
    }

    /// The action.
    pub fn action(&self) -> Action {
        self.action
    }

    /// The outcome.
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// The reason, if any (after cleaning).
    pub fn reason_text(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    /// The detail values (after cleaning).
    pub fn details(&self) -> &BTreeMap<String, String> {
        &self.detail
    }
}

/// Cap the length and replace anything that looks like key material or a token.
fn clean(text: String) -> String {
    if looks_secret(&text) {
        return REDACTED_TEXT.to_owned();
    }
    if text.chars().count() <= MAX_TEXT_LEN {
        return text;
    }
    text.chars().take(MAX_TEXT_LEN).collect()
}

/// PEM blocks, and JWT-shaped words (three base64url parts, the first a JSON header).
fn looks_secret(text: &str) -> bool {
    if text.contains("-----BEGIN") || text.contains("PRIVATE KEY") {
        return true;
    }
    text.split(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '=')
        .any(|word| {
            let parts: Vec<&str> = word.split('.').collect();
            parts.len() == 3 && parts[0].starts_with("eyJ") && parts.iter().all(|p| p.len() >= 4)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_serializes_only_what_was_set() {
        let event = AuditEvent::new(Action::BrokerIssue, Outcome::Denied)
            .lease("shop", "orders-db")
            .pod("shop", "api-0", "0f9a")
            .service_account("shop", "api")
            .node("node-a")
            .reason("the pod does not mount this lease")
            .detail_kv("volume", "csi-123");
        let json = serde_json::to_value(&event).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({
                "action": "broker_issue",
                "outcome": "denied",
                "lease": {"namespace": "shop", "name": "orders-db"},
                "pod": {"namespace": "shop", "name": "api-0", "uid": "0f9a"},
                "service_account": {"namespace": "shop", "name": "api"},
                "node": "node-a",
                "reason": "the pod does not mount this lease",
                "detail": {"volume": "csi-123"},
            })
        );
        let minimal = serde_json::to_string(&AuditEvent::new(Action::Suspend, Outcome::Success))
            .expect("serializes");
        assert_eq!(minimal, r#"{"action":"suspend","outcome":"success"}"#);
    }

    #[test]
    fn action_names_match_serde() {
        for action in [
            Action::Issue,
            Action::BrokerAcknowledge,
            Action::KeyUnavailable,
            Action::ChainStart,
        ] {
            let json = serde_json::to_string(&action).expect("serializes");
            assert_eq!(json, format!("\"{}\"", action.as_str()));
        }
    }

    #[test]
    fn key_material_and_tokens_are_not_kept() {
        let pem =
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----";
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
        let event = AuditEvent::new(Action::Issue, Outcome::Failure)
            .reason(format!("backend said: {pem}"))
            .detail_kv("token", format!("Bearer {jwt}"));
        let json = serde_json::to_string(&event).expect("serializes");
        assert!(!json.contains("MC4CAQAwBQYDK2VwBCIEIA"));
        assert!(!json.contains(jwt));
        assert_eq!(event.reason_text(), Some(REDACTED_TEXT));
    }

    #[test]
    fn long_texts_are_capped() {
        let event = AuditEvent::new(Action::Verify, Outcome::Failure).reason("x".repeat(5000));
        assert_eq!(event.reason_text().map(str::len), Some(MAX_TEXT_LEN));
    }
}
