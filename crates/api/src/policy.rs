//! `RotationPolicy`: how credentials are issued, rotated and revoked, and who may mount them.

// kube's `printcolumn(...)` repeats keys such as `type_` by design.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use kube::core::Duration;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use leasehold_core::{DrainSessionsMode, Strategy};

/// How credentials that reference this policy are issued, rotated and revoked, and who may mount them.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "leasehold.dev",
    version = "v1alpha1",
    kind = "RotationPolicy",
    namespaced,
    shortname = "rp",
    category = "leasehold",
    status = "RotationPolicyStatus",
    doc = "How SecretLeases that reference this policy are issued, rotated, verified and revoked, and who may mount them.",
    printcolumn(name = "Strategy", type_ = "string", json_path = ".spec.strategy"),
    printcolumn(name = "TTL", type_ = "string", json_path = ".spec.ttl"),
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
        "rule": "duration(self.ttl) >= duration('1m')",
        "message": "ttl must be at least 1m",
        "fieldPath": ".ttl"
    },
    {
        "rule": "!has(self.rotationInterval) || duration(self.rotationInterval) >= duration('1m')",
        "message": "rotationInterval must be at least 1m",
        "fieldPath": ".rotationInterval"
    },
    {
        "rule": "!has(self.renewBefore) || self.renewBefore.endsWith('%') || duration(self.renewBefore) < duration(self.ttl)",
        "message": "renewBefore must be shorter than ttl",
        "fieldPath": ".renewBefore"
    }
]))]
pub struct RotationPolicySpec {
    /// `Dynamic` (a new user per version, dropped when revoked), `AlternatingUsers`
    /// (two fixed users `<username>_a`/`_b` take turns) or `InPlace` (one existing user's
    /// password changes; clients still using the old password fail until they pick up
    /// the new one).
    #[serde(default)]
    pub strategy: Strategy,

    /// Lifetime of each credential version, as a Go duration (`1h`, `90m`, `24h`). On
    /// PostgreSQL, Dynamic and AlternatingUsers credentials also expire on the database
    /// side after exactly this long (`VALID UNTIL`), so they die by themselves even if
    /// leasehold is gone. MySQL/MariaDB have no per-user expiry: the password only gets a
    /// `PASSWORD EXPIRE INTERVAL` of this long rounded up to whole days, which is not
    /// revocation (a client holding an expired password can still connect and set a new
    /// one); there only leasehold's revocation and orphan sweeper end a credential.
    pub ttl: Duration,

    /// How long before expiry to rotate: a duration (`20m`) or a percentage of the TTL
    /// (`33%`). Default `33%`: renew at two thirds of the life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+|[0-9]{1,2}%)$"))]
    pub renew_before: Option<String>,

    /// Rotate at least this often, even if the TTL would allow longer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_interval: Option<Duration>,

    /// Restrict rotations that are not urgent to a weekly window (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance_window: Option<MaintenanceWindow>,

    /// How a new credential is proven to work before it is promoted. Verification is
    /// never skipped.
    #[serde(default)]
    pub verify: VerifySpec,

    /// When and how the previous credential is revoked.
    #[serde(default)]
    pub revoke: RevokeSpec,

    /// Who may mount leases that use this policy through the CSI driver.
    #[serde(default)]
    pub access: AccessSpec,

    /// Limits on concurrent work against one database.
    #[serde(default)]
    pub rate_limit: RateLimitSpec,

    /// How passwords are generated.
    #[serde(default)]
    pub password: PasswordSpec,
}

/// A weekly window in UTC.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceWindow {
    /// Days the window opens on; empty means every day.
    #[serde(default)]
    pub days: Vec<Weekday>,
    /// Opening time, `HH:MM` in UTC.
    #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub start: String,
    /// How long the window stays open.
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "duration(self) > duration('0s') && duration(self) <= duration('168h')", "message": "maintenanceWindow.duration must be positive and at most 168h"}
    ]))]
    pub duration: Duration,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Weekday {
    Monday,
    Tuesday,
    Wednesday,
    Thursday,
    Friday,
    Saturday,
    Sunday,
}

/// Verification of a new credential.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerifySpec {
    /// Time allowed for a fresh login plus the query.
    #[serde(default = "default_verify_timeout")]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "duration(self) >= duration('1s') && duration(self) <= duration('5m')", "message": "verify.timeout must be between 1s and 5m"}
    ]))]
    pub timeout: Duration,
    /// Query run as the new credential (databases only).
    #[serde(default = "default_verify_query")]
    #[schemars(length(min = 1, max = 4096))]
    pub query: String,
}

fn default_verify_timeout() -> Duration {
    std::time::Duration::from_secs(10).into()
}
fn default_verify_query() -> String {
    "SELECT 1".to_string()
}

impl Default for VerifySpec {
    fn default() -> Self {
        Self {
            timeout: default_verify_timeout(),
            query: default_verify_query(),
        }
    }
}

/// Revocation of superseded credentials.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.maxWait) || duration(self.maxWait) >= duration(self.gracePeriod)",
        "message": "revoke.maxWait must be at least revoke.gracePeriod",
        "fieldPath": ".maxWait"
    }
]))]
pub struct RevokeSpec {
    /// Minimum time between promoting a new credential and revoking the old one.
    #[serde(default = "default_grace_period")]
    pub grace_period: Duration,
    /// Revoke the old credential only once every known consumer (pods mounting it through
    /// CSI, rollout-restart targets) holds the new one, or `maxWait` has passed.
    #[serde(default = "default_true")]
    pub wait_for_consumers: bool,
    /// Upper bound on waiting for consumers after promotion. Default: 30m, or the
    /// renewal window (`renewBefore`) when that is shorter, so the old credential never
    /// expires while consumers still move over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wait: Option<Duration>,
    /// What to do with sessions still open under the old credential.
    #[serde(default)]
    pub drain_sessions: DrainSessionsSpec,
}

fn default_grace_period() -> Duration {
    std::time::Duration::from_secs(120).into()
}
/// `maxWait` when the policy does not set it (capped by the renewal window).
pub const DEFAULT_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(1800);
fn default_true() -> bool {
    true
}

impl Default for RevokeSpec {
    fn default() -> Self {
        Self {
            grace_period: default_grace_period(),
            wait_for_consumers: true,
            max_wait: None,
            drain_sessions: DrainSessionsSpec::default(),
        }
    }
}

/// Session draining before the old credential is dropped.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainSessionsSpec {
    /// `Wait` for sessions to end, `Terminate` them after `timeout`, or `Ignore` them.
    #[serde(default = "default_drain_mode")]
    pub mode: DrainSessionsMode,
    /// With `Terminate`: how long sessions may continue after login is disabled.
    #[serde(default = "default_drain_timeout")]
    pub timeout: Duration,
}

fn default_drain_mode() -> DrainSessionsMode {
    DrainSessionsMode::Terminate
}
fn default_drain_timeout() -> Duration {
    std::time::Duration::from_secs(300).into()
}

impl Default for DrainSessionsSpec {
    fn default() -> Self {
        Self {
            mode: default_drain_mode(),
            timeout: default_drain_timeout(),
        }
    }
}

/// Who may mount leases of this policy through CSI. A pod is allowed when its namespace
/// matches (the lease's own namespace, one of `namespaces`, or `namespaceSelector`) and,
/// if `serviceAccounts` is not empty, its service account is listed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessSpec {
    /// Additional namespaces whose pods may mount the lease.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Namespaces, by label, whose pods may mount the lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Service accounts allowed to mount, as `name` (in the pod's namespace) or
    /// `namespace/name`. Empty: any service account in an allowed namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
}

/// Limits on concurrent work.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// At most this many rotations run at once against one database (host, port, database).
    #[serde(default = "default_max_concurrent")]
    #[schemars(range(min = 1, max = 64))]
    pub max_concurrent_rotations_per_target: u32,
}

fn default_max_concurrent() -> u32 {
    4
}

impl Default for RateLimitSpec {
    fn default() -> Self {
        Self {
            max_concurrent_rotations_per_target: default_max_concurrent(),
        }
    }
}

/// Password generation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PasswordSpec {
    /// Length in characters.
    #[serde(default = "default_password_length")]
    #[schemars(range(min = 16, max = 128))]
    pub length: u32,
    /// Characters passwords are drawn from.
    #[serde(default)]
    pub alphabet: PasswordAlphabet,
}

fn default_password_length() -> u32 {
    32
}

impl Default for PasswordSpec {
    fn default() -> Self {
        Self {
            length: default_password_length(),
            alphabet: PasswordAlphabet::default(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum PasswordAlphabet {
    /// `A-Z a-z 0-9`: safe in URIs and shells.
    #[default]
    Alphanumeric,
    /// Alphanumeric plus `-_.~!*` (still URI-safe unreserved or sub-delims).
    AlphanumericSymbols,
}

/// Status of a RotationPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotationPolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` says whether the policy is valid.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
