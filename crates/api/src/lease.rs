//! `SecretLease`: one credential kept alive for its consumers.

// kube's `printcolumn(...)` repeats keys such as `type_` by design.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use kube::core::Duration;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use leasehold_core::rotation::{Phase, Progress, RotationRecord};

/// One credential kept alive for consumers: issued, verified, rotated and revoked by leasehold.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "leasehold.dev",
    version = "v1alpha1",
    kind = "SecretLease",
    namespaced,
    shortname = "sl",
    category = "leasehold",
    status = "SecretLeaseStatus",
    doc = "A credential that leasehold issues, verifies, rotates and revokes for its consumers.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Version",
        type_ = "integer",
        json_path = ".status.currentVersion"
    ),
    // `string`, not `date`: kubectl renders a `date` column as an age, and a time in
    // the future as `<invalid>` (seen on a real API server).
    printcolumn(name = "Expires", type_ = "string", json_path = ".status.expiresAt"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Health",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Degraded\")].reason"
    ),
    printcolumn(
        name = "Next Rotation",
        type_ = "string",
        json_path = ".status.nextRotationAt",
        priority = 1
    ),
    printcolumn(
        name = "Policy",
        type_ = "string",
        json_path = ".spec.policyRef.name",
        priority = 1
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
        "rule": "(has(self.postgres) ? 1 : 0) + (has(self.mysql) ? 1 : 0) + (has(self.certificate) ? 1 : 0) == 1",
        "message": "set exactly one backend: postgres, mysql or certificate"
    },
    {
        "rule": "!self.perPod || (has(self.delivery) && has(self.delivery.csi) && self.delivery.csi.enabled)",
        "message": "perPod requires delivery.csi.enabled: per-pod credentials are handed out through the CSI driver",
        "fieldPath": ".perPod"
    },
    {
        "rule": "!self.perPod || !has(self.delivery) || !has(self.delivery.secret)",
        "message": "perPod leases cannot be synced into a Secret: each pod gets its own credential",
        "fieldPath": ".delivery.secret"
    }
]))]
pub struct SecretLeaseSpec {
    /// The RotationPolicy (in the same namespace) that governs this lease.
    pub policy_ref: PolicyRef,

    /// A PostgreSQL database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<DatabaseSpec>,

    /// A MySQL or MariaDB database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql: Option<DatabaseSpec>,

    /// A certificate from an issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateSpec>,

    /// Where the current credential goes.
    #[serde(default)]
    pub delivery: DeliverySpec,

    /// Every pod that mounts the lease gets a credential of its own, revoked when the
    /// pod's volume is unpublished. Requires `delivery.csi.enabled`.
    #[serde(default)]
    pub per_pod: bool,

    /// Stop rotating (for database maintenance): no new version is issued and nothing is
    /// revoked while set; the current credential stays delivered (it may expire: watch
    /// `expiresAt`). Deleting the lease and an emergency revocation
    /// (`leasehold.dev/revoke-now`) still proceed. Shown as phase `Suspended`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
}

/// Reference to a RotationPolicy in the lease's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A database and how leasehold administers users on it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// Host name or IP address of the server.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// Port; default 5432 for PostgreSQL, 3306 for MySQL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// Database to connect to (and, on PostgreSQL, where objects owned by dropped users are reassigned).
    #[schemars(length(min = 1, max = 63))]
    pub database: String,
    /// Secret (in the lease's namespace) with the admin user that creates and drops users.
    pub admin_secret_ref: AdminSecretRef,
    /// Transport security to the server.
    #[serde(default)]
    pub tls: TlsSpec,
    /// The fixed user for `AlternatingUsers` (users `<username>_a` and `<username>_b`) or
    /// `InPlace` (this user). Not used by `Dynamic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 60),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub username: Option<String>,
    /// `Dynamic` only: the name of each version's user. Placeholders `{{namespace}}`,
    /// `{{name}}`, `{{uid}}` (first 12 hex digits of the lease UID) and `{{version}}`;
    /// `{{uid}}` must be the first placeholder, after a literal prefix of 2 or more
    /// characters, so two leases never render the same user.
    /// Default `lh_{{uid}}_v{{version}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub username_template: Option<String>,
    /// MySQL/MariaDB only: the host part of the accounts leasehold rotates
    /// (`'<user>'@'<accountHost>'`), used for every CREATE/ALTER/DROP USER, GRANT and
    /// lookup. A host name, an IP address, a pattern with `%` and `_` (e.g. `10.%`) or
    /// `address/netmask`. Default `%`. The verification login comes from the
    /// controller's address, which must match it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[A-Za-z0-9.%_:/-]+$"))]
    pub account_host: Option<String>,
    /// Roles the user inherits (PostgreSQL `GRANT role TO user`; MySQL roles).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub member_of: Vec<String>,
    /// Privileges granted directly, each `<privileges> ON <object>`. The text is parsed,
    /// never spliced into SQL: privileges come from an allowlist and the statement is
    /// built with quoted names. PostgreSQL: `SELECT, INSERT ON TABLE app.orders`
    /// (`TABLE` optional), `USAGE, SELECT ON SEQUENCE app.ids`, `USAGE ON SCHEMA app`,
    /// `CONNECT ON DATABASE shop`, `ALL ON ALL TABLES IN SCHEMA app` (also `ALL SEQUENCES`
    /// and, with `EXECUTE`, `ALL FUNCTIONS`). MySQL/MariaDB: `SELECT ON shop.*` or
    /// `SELECT, INSERT ON shop.orders` (the database is required). Names may be quoted
    /// (`"..."` PostgreSQL, `` `...` `` MySQL). Comments, `;`, `TO`, string quotes,
    /// `WITH GRANT OPTION`, several objects and global (`*.*`) grants are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<String>,
}

/// Reference to the admin credentials.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdminSecretRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[serde(default = "default_username_key")]
    pub username_key: String,
    #[serde(default = "default_password_key")]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".into()
}
fn default_password_key() -> String {
    "password".into()
}

/// Transport security.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    #[serde(default)]
    pub mode: TlsMode,
    /// Secret with the CA bundle to verify the server against (key `ca.crt` by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum TlsMode {
    /// Plain TCP. Only for local development and tests.
    Disable,
    /// TLS without certificate verification.
    #[default]
    Require,
    /// TLS, verifying the server certificate and host name.
    VerifyFull,
}

/// A key of a Secret in the lease's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[serde(default = "default_ca_key")]
    pub key: String,
}

fn default_ca_key() -> String {
    "ca.crt".into()
}

/// A certificate from an issuer (issuers are configured separately).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificateSpec {
    pub issuer_ref: IssuerRef,
    #[schemars(length(min = 1, max = 64))]
    pub common_name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    /// IP address SANs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<String>,
    /// URI SANs, for example SPIFFE IDs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uris: Vec<String>,
    /// Lifetime of each certificate; default the policy's `ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<Duration>,
    /// Default `serverAuth` and `digitalSignature`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usages: Vec<CertificateUsage>,
    #[serde(default)]
    pub key_algorithm: KeyAlgorithm,
}

/// What a certificate may be used for.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CertificateUsage {
    ServerAuth,
    ClientAuth,
    DigitalSignature,
    KeyEncipherment,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// `Issuer` (namespaced) or `ClusterIssuer`.
    #[serde(default = "default_issuer_kind")]
    pub kind: IssuerKind,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum IssuerKind {
    #[default]
    Issuer,
    ClusterIssuer,
}

fn default_issuer_kind() -> IssuerKind {
    IssuerKind::Issuer
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum KeyAlgorithm {
    #[default]
    EcdsaP256,
    EcdsaP384,
    Ed25519,
    Rsa2048,
    Rsa3072,
}

/// Where the current credential is delivered.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliverySpec {
    /// Keep a Kubernetes Secret in sync with the current credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretDelivery>,
    /// Let pods mount the lease through the CSI driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csi: Option<CsiDelivery>,
    /// Workloads restarted (pod template annotation) when a new version is promoted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollout_restart: Vec<RolloutTarget>,
    /// Promotions closer together than this cause one restart.
    #[serde(default = "default_debounce")]
    pub restart_debounce: Duration,
}

fn default_debounce() -> Duration {
    std::time::Duration::from_secs(30).into()
}

impl Default for DeliverySpec {
    fn default() -> Self {
        Self {
            secret: None,
            csi: None,
            rollout_restart: Vec::new(),
            restart_debounce: default_debounce(),
        }
    }
}

/// A Secret kept in sync with the current credential.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.name) || !self.name.endsWith('-leasehold-versions')",
        "message": "names ending in -leasehold-versions are the controller's own (where it keeps credential versions): choose another Secret name",
        "fieldPath": ".name"
    }
]))]
pub struct SecretDelivery {
    /// Name of the Secret; default: the lease's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,
    /// Keys and their templates. Placeholders: `{{ username }}`, `{{ password }}`,
    /// `{{ host }}`, `{{ port }}`, `{{ database }}`, `{{ uri }}`, `{{ version }}`.
    /// Default: `username`, `password`, `uri`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub template: BTreeMap<String, String>,
}

/// Delivery through the CSI driver.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CsiDelivery {
    /// Whether pods may mount this lease.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// File names and their templates (placeholders as for `secret.template`).
    /// Default: files `username`, `password`, `uri`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
}

fn default_true() -> bool {
    true
}

/// A workload to restart on promotion.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutTarget {
    pub kind: WorkloadKind,
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

/// Observed state of a SecretLease.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretLeaseStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Pending`, `Active`, `Issuing`, `Verifying`, `Draining`, `Degraded`, `Deleting` or `Invalid`.
    #[serde(default)]
    pub phase: Phase,
    /// The version consumers should use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<u64>,
    /// A version being issued or verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_version: Option<u64>,
    /// The database-side user of the current version (not secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_username: Option<String>,
    /// When the current version expires: PostgreSQL refuses it after this time (`VALID
    /// UNTIL`); MySQL/MariaDB have no per-user expiry time, so leasehold rotates before it
    /// and revokes it after (whole-day `PASSWORD EXPIRE` is a backstop, not revocation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// When the next rotation is planned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_at: Option<Time>,
    /// `Ready`, `Rotating`, `Verified`, `RevocationPending` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Known consumers and the version each holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<ConsumerStatus>,
    /// The last few rotations, newest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rotations: Vec<RotationRecord>,
    /// The rotation engine's recorded progress (versions still alive on the backend).
    #[serde(default)]
    pub progress: Progress,
}

/// A consumer of the lease and the version it holds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerStatus {
    /// `Pod` (CSI volume) or a rollout-restart workload kind.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// The version this consumer has acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_at: Option<Time>,
}
