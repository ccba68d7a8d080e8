//! `Issuer` (namespaced) and `ClusterIssuer`: where SecretLease certificates come from.
//!
//! Two kinds of issuer: `ca` signs with a CA kept in a Secret (or generated self-signed),
//! `acme` orders from an ACME directory.

// kube's `printcolumn(...)` repeats keys such as `type_` by design.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Issues certificates for SecretLeases in its own namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "leasehold.dev",
    version = "v1alpha1",
    kind = "Issuer",
    namespaced,
    shortname = "lhiss",
    category = "leasehold",
    status = "IssuerStatus",
    doc = "Issues certificates for SecretLeases in its namespace: from a CA (`ca`) or an ACME directory (`acme`).",
    printcolumn(name = "Type", type_ = "string", json_path = ".status.type"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.ca) != has(self.acme)",
        "message": "exactly one of ca and acme must be set"
    }
]))]
pub struct IssuerSpec {
    /// Sign with a CA certificate and key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaIssuer>,
    /// Order certificates from an ACME directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeIssuer>,
}

/// Issues certificates for SecretLeases in any namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "leasehold.dev",
    version = "v1alpha1",
    kind = "ClusterIssuer",
    shortname = "lhciss",
    category = "leasehold",
    status = "IssuerStatus",
    doc = "Issues certificates for SecretLeases in every namespace: from a CA (`ca`) or an ACME directory (`acme`). Secrets it references name their namespace.",
    printcolumn(name = "Type", type_ = "string", json_path = ".status.type"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.ca) != has(self.acme)",
        "message": "exactly one of ca and acme must be set"
    }
]))]
pub struct ClusterIssuerSpec {
    /// Sign with a CA certificate and key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaIssuer>,
    /// Order certificates from an ACME directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeIssuer>,
}

impl From<ClusterIssuerSpec> for IssuerSpec {
    fn from(spec: ClusterIssuerSpec) -> Self {
        IssuerSpec {
            ca: spec.ca,
            acme: spec.acme,
        }
    }
}

/// A CA that signs leaf certificates.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.selfSigned != has(self.secretRef)",
        "message": "set exactly one of secretRef and selfSigned"
    }
]))]
pub struct CaIssuer {
    /// Secret holding the CA: `tls.crt` (certificate, PEM) and `tls.key` (private key,
    /// PEM). With `selfSigned`, the Secret leasehold creates and keeps the generated CA in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<IssuerSecretRef>,
    /// Generate a self-signed CA instead of loading one.
    #[serde(default)]
    pub self_signed: bool,
}

/// A Secret an issuer reads. `namespace` only for a ClusterIssuer; an Issuer always
/// reads from its own namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerSecretRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

/// An ACME account and how its challenges are solved.
///
/// The account (its URL and private key) is kept as JSON under `account.json` in the
/// Secret `accountKeySecretRef` names. The controller registers an account and creates
/// that Secret (type `Opaque`) when it does not exist; it never overwrites one.
/// Challenges are answered over HTTP-01 by the controller's solver: route
/// `/.well-known/acme-challenge/` of every name you order to its Service (see the chart
/// README, "ACME issuers").
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AcmeIssuer {
    /// The ACME directory, for example `https://acme-v02.api.letsencrypt.org/directory`.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https://"))]
    pub directory_url: String,
    /// Contact address registered with the account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Secret the ACME account is kept in (key `account.json`: account URL, directory
    /// and private key); created by the controller if missing, never overwritten. An
    /// Issuer's is in its own namespace; a ClusterIssuer's in `namespace` or the
    /// controller's namespace.
    pub account_key_secret_ref: IssuerSecretRef,
    /// External account binding, for CAs that require one. Read only when an account is
    /// registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_account_binding: Option<ExternalAccountBinding>,
    /// Solve HTTP-01 challenges (the only solver so far, also used when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http01: Option<Http01Solver>,
    /// PEM certificates to trust for the directory's TLS certificate (a private ACME
    /// CA); default: the public web PKI roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 262144))]
    pub ca_bundle: Option<String>,
    /// PEM certificates (typically the ACME CA's root) appended to `ca.crt` after the
    /// issuing certificate, which is the last one of the chain the CA returns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 262144))]
    pub extra_trust_anchors: Option<String>,
}

/// An ACME external account binding (RFC 8555 §7.3.4).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalAccountBinding {
    #[schemars(length(min = 1, max = 256))]
    pub key_id: String,
    /// Secret holding the base64url MAC key under `key`. An Issuer's is in its own
    /// namespace; a ClusterIssuer's in `namespace` or the controller's namespace.
    pub key_secret_ref: IssuerSecretRef,
}

/// HTTP-01: the CA fetches `http://<name>/.well-known/acme-challenge/<token>`, which
/// must reach the controller's solver Service (an Ingress or route you provide).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Http01Solver {
    /// Reserved: the controller does not create Ingresses; route
    /// `/.well-known/acme-challenge/` to the solver Service yourself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_class_name: Option<String>,
}

/// `CA` or `ACME`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum IssuerType {
    #[serde(rename = "CA")]
    Ca,
    #[serde(rename = "ACME")]
    Acme,
}

/// Observed state of an Issuer or ClusterIssuer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Which kind of issuer the spec configures.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<IssuerType>,
    /// `Ready`: the CA loaded (or the ACME account registered); reason and message say
    /// why not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
