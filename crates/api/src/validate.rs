//! Checks the CRD schema cannot express. Each error names the field and says how to fix it.

use std::time::Duration;

use leasehold_core::naming::{self, DEFAULT_DYNAMIC_TEMPLATE};
use leasehold_core::{PolicyParams, Strategy};
use leasehold_grants::Dialect;

use crate::{DatabaseSpec, RotationPolicySpec, SecretLeaseSpec};

/// One problem with a spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// JSON path of the field, for example `spec.revoke.maxWait`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// All errors joined into one line, for a condition message.
pub fn summary(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Longest user name each database accepts (MySQL 8 allows 32; MariaDB 80; PostgreSQL 63).
pub const POSTGRES_MAX_USERNAME: usize = 63;
pub const MYSQL_MAX_USERNAME: usize = 32;

/// Placeholders usable in Secret and CSI file templates.
pub const TEMPLATE_PLACEHOLDERS: &[&str] = &[
    "username", "password", "host", "port", "database", "uri", "version",
];

/// Parse `renewBefore`: a Go duration or a percentage of the TTL.
pub fn renew_before(spec: &RotationPolicySpec) -> Result<Duration, FieldError> {
    let ttl: Duration = spec.ttl.into();
    let field = "spec.renewBefore";
    let Some(raw) = spec.renew_before.as_deref() else {
        return Ok(ttl / 3);
    };
    if let Some(pct) = raw.strip_suffix('%') {
        let pct: u32 = pct.parse().map_err(|_| {
            FieldError::new(
                field,
                format!("{raw:?} is not a percentage; write for example \"33%\""),
            )
        })?;
        if !(1..=90).contains(&pct) {
            return Err(FieldError::new(
                field,
                format!("{pct}% is out of range; use 1% to 90% of the TTL"),
            ));
        }
        return Ok(ttl * pct / 100);
    }
    let d: kube::core::Duration = raw.parse().map_err(|_| {
        FieldError::new(
            field,
            format!("{raw:?} is not a duration; write for example \"20m\" or \"33%\""),
        )
    })?;
    if d.is_negative() {
        return Err(FieldError::new(field, "must not be negative"));
    }
    let d: Duration = d.into();
    if d >= ttl {
        return Err(FieldError::new(
            field,
            "must be shorter than ttl, or nothing would ever be current",
        ));
    }
    Ok(d)
}

/// Resolve a policy into the parameters of the state machine, or say what to fix.
pub fn policy_params(spec: &RotationPolicySpec) -> Result<PolicyParams, Vec<FieldError>> {
    let mut errors = Vec::new();
    let non_negative = |field: &str, d: &kube::core::Duration, errors: &mut Vec<FieldError>| {
        if d.is_negative() {
            errors.push(FieldError::new(field, "must not be negative"));
        }
        Duration::from(*d)
    };
    let ttl = non_negative("spec.ttl", &spec.ttl, &mut errors);
    if ttl < Duration::from_secs(60) {
        errors.push(FieldError::new("spec.ttl", "must be at least 1m"));
    }
    let renew = renew_before(spec)
        .map_err(|e| errors.push(e))
        .unwrap_or(ttl / 3);
    let grace = non_negative(
        "spec.revoke.gracePeriod",
        &spec.revoke.grace_period,
        &mut errors,
    );
    let max_wait = match &spec.revoke.max_wait {
        Some(d) => non_negative("spec.revoke.maxWait", d, &mut errors),
        // Unset: as long as the renewal window allows, at most 30 minutes.
        None => crate::policy::DEFAULT_MAX_WAIT.min(renew).max(grace),
    };
    let drain_timeout = non_negative(
        "spec.revoke.drainSessions.timeout",
        &spec.revoke.drain_sessions.timeout,
        &mut errors,
    );
    let interval = spec
        .rotation_interval
        .as_ref()
        .map(|d| non_negative("spec.rotationInterval", d, &mut errors));
    if max_wait < grace {
        errors.push(FieldError::new(
            "spec.revoke.maxWait",
            "must be at least revoke.gracePeriod",
        ));
    }
    // The old version must still work while consumers move over: it expires `renewBefore`
    // after the new one is promoted, so draining has to fit in that time.
    let drain_budget = if spec.revoke.wait_for_consumers {
        max_wait
    } else {
        grace
    };
    if spec.strategy != Strategy::InPlace && drain_budget > renew {
        errors.push(FieldError::new(
            "spec.renewBefore",
            format!(
                "is {}s but revocation may wait up to {}s (revoke.{}): the old credential would expire \
                 before consumers move over; raise renewBefore or lower revoke.{}",
                renew.as_secs(),
                drain_budget.as_secs(),
                if spec.revoke.wait_for_consumers { "maxWait" } else { "gracePeriod" },
                if spec.revoke.wait_for_consumers { "maxWait" } else { "gracePeriod" },
            ),
        ));
    }
    for (i, sa) in spec.access.service_accounts.iter().enumerate() {
        let ok = match sa.split_once('/') {
            Some((ns, name)) => is_dns_label(ns) && is_dns_subdomain(name),
            None => is_dns_subdomain(sa),
        };
        if !ok {
            errors.push(FieldError::new(
                format!("spec.access.serviceAccounts[{i}]"),
                format!("{sa:?} is not a service account; write \"name\" or \"namespace/name\""),
            ));
        }
    }
    for (i, ns) in spec.access.namespaces.iter().enumerate() {
        if !is_dns_label(ns) {
            errors.push(FieldError::new(
                format!("spec.access.namespaces[{i}]"),
                format!("{ns:?} is not a valid namespace name"),
            ));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(PolicyParams {
        strategy: spec.strategy,
        ttl,
        renew_before: renew,
        rotation_interval: interval,
        grace_period: grace,
        wait_for_consumers: spec.revoke.wait_for_consumers,
        max_wait,
        drain: spec.revoke.drain_sessions.mode,
        drain_timeout,
    })
}

/// Pod variables a certificate's names may use (filled in per pod by the broker).
pub const POD_VARIABLES: [&str; 4] = [
    "${POD_NAME}",
    "${POD_NAMESPACE}",
    "${SERVICE_ACCOUNT}",
    "${POD_UID}",
];

fn check_certificate(
    cert: &crate::CertificateSpec,
    secret_delivery: bool,
    errors: &mut Vec<FieldError>,
) {
    let names = std::iter::once(("spec.certificate.commonName".to_owned(), &cert.common_name))
        .chain(
            cert.dns_names
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("spec.certificate.dnsNames[{i}]"), n)),
        )
        .chain(
            cert.ip_addresses
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("spec.certificate.ipAddresses[{i}]"), n)),
        )
        .chain(
            cert.uris
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("spec.certificate.uris[{i}]"), n)),
        );
    for (field, name) in names {
        if !name.contains("${") {
            continue;
        }
        let mut rest = name.replace(' ', "");
        for v in POD_VARIABLES {
            rest = rest.replace(v, "");
        }
        if rest.contains("${") {
            errors.push(FieldError::new(
                field,
                format!(
                    "{name:?} uses an unknown variable; the pod variables are {}",
                    POD_VARIABLES.join(", ")
                ),
            ));
        } else if secret_delivery {
            errors.push(FieldError::new(
                field,
                format!(
                    "{name:?} names a pod, but a Secret holds one certificate for every pod: \
                     pod variables work only with CSI delivery alone (remove delivery.secret)"
                ),
            ));
        }
    }
    if cert.dns_names.is_empty() && cert.ip_addresses.is_empty() && cert.uris.is_empty() {
        errors.push(FieldError::new(
            "spec.certificate.dnsNames",
            "name at least one dnsName, ipAddress or uri",
        ));
    }
}

/// Check a lease against itself and (when found) its policy.
pub fn validate_lease(
    spec: &SecretLeaseSpec,
    policy: Option<&RotationPolicySpec>,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let backends = [
        spec.postgres.is_some(),
        spec.mysql.is_some(),
        spec.certificate.is_some(),
    ];
    if backends.iter().filter(|b| **b).count() != 1 {
        errors.push(FieldError::new(
            "spec",
            "set exactly one backend: postgres, mysql or certificate",
        ));
    }
    let strategy = policy.map(|p| p.strategy);
    if let Some(db) = &spec.postgres {
        check_database(
            "spec.postgres",
            db,
            strategy,
            Dialect::Postgres,
            &mut errors,
        );
    }
    if let Some(db) = &spec.mysql {
        check_database("spec.mysql", db, strategy, Dialect::MySql, &mut errors);
    }
    if let Some(secret) = &spec.delivery.secret {
        if secret
            .name
            .as_deref()
            .is_some_and(|n| n.ends_with(crate::VERSIONS_SECRET_SUFFIX))
        {
            errors.push(FieldError::new(
                "spec.delivery.secret.name",
                "names ending in -leasehold-versions are the controller's own (where it keeps credential versions): choose another Secret name",
            ));
        }
        for (key, template) in &secret.template {
            check_template(
                &format!("spec.delivery.secret.template[{key}]"),
                template,
                &mut errors,
            );
            if !is_secret_key(key) {
                errors.push(FieldError::new(
                    format!("spec.delivery.secret.template[{key}]"),
                    "Secret keys may contain only letters, digits, '-', '_' and '.'",
                ));
            }
        }
    }
    if let Some(csi) = &spec.delivery.csi {
        for (file, template) in &csi.files {
            let field = format!("spec.delivery.csi.files[{file}]");
            check_template(&field, template, &mut errors);
            if !is_file_name(file) {
                errors.push(FieldError::new(
                    field,
                    "file names must be relative, without '..', and contain only letters, digits, '-', '_', '.' and '/'",
                ));
            }
        }
    }
    if let Some(cert) = &spec.certificate {
        check_certificate(cert, spec.delivery.secret.is_some(), &mut errors);
    }
    if spec.per_pod && strategy.is_some_and(|s| s != Strategy::Dynamic) {
        errors.push(FieldError::new(
            "spec.perPod",
            "per-pod credentials need a policy with strategy Dynamic (one user per pod)",
        ));
    }
    errors
}

fn check_database(
    field: &str,
    db: &DatabaseSpec,
    strategy: Option<Strategy>,
    dialect: Dialect,
    errors: &mut Vec<FieldError>,
) {
    let max_username = match dialect {
        Dialect::Postgres => POSTGRES_MAX_USERNAME,
        Dialect::MySql => MYSQL_MAX_USERNAME,
    };
    match strategy {
        Some(Strategy::Dynamic) | None => {
            let template = db
                .username_template
                .as_deref()
                .unwrap_or(DEFAULT_DYNAMIC_TEMPLATE);
            if let Err(e) = naming::check_template(template) {
                errors.push(FieldError::new(
                    format!("{field}.usernameTemplate"),
                    e.to_string(),
                ));
            } else {
                // Longest possible rendering: 63-char namespace and name, 12-char uid, 20-digit version.
                let worst = template
                    .replace("{{namespace}}", &"n".repeat(63))
                    .replace("{{name}}", &"n".repeat(63))
                    .replace("{{uid}}", &"u".repeat(12))
                    .replace("{{version}}", "99999");
                if worst.len() > max_username {
                    errors.push(FieldError::new(
                        format!("{field}.usernameTemplate"),
                        format!(
                            "can render names up to {} characters; this database allows {max_username}: \
                             use {{{{uid}}}} instead of {{{{namespace}}}}/{{{{name}}}}",
                            worst.len()
                        ),
                    ));
                }
            }
            if strategy.is_some() && db.username.is_some() {
                errors.push(FieldError::new(
                    format!("{field}.username"),
                    "is only used by AlternatingUsers and InPlace; Dynamic names users with usernameTemplate",
                ));
            }
        }
        Some(s @ (Strategy::AlternatingUsers | Strategy::InPlace)) => {
            match db.username.as_deref() {
                None => errors.push(FieldError::new(
                    format!("{field}.username"),
                    format!("is required with strategy {s:?}: name the user leasehold rotates"),
                )),
                Some(u) if s == Strategy::AlternatingUsers && u.len() + 2 > max_username => errors
                    .push(FieldError::new(
                        format!("{field}.username"),
                        format!(
                            "{u}_a would exceed the {max_username}-character limit of this database"
                        ),
                    )),
                Some(_) => {}
            }
            if db.username_template.is_some() {
                errors.push(FieldError::new(
                    format!("{field}.usernameTemplate"),
                    format!("is only used by Dynamic; with {s:?} set username instead"),
                ));
            }
        }
    }
    for (i, g) in db.grants.iter().enumerate() {
        if let Err(e) = leasehold_grants::check(dialect, g) {
            let example = match dialect {
                Dialect::Postgres => {
                    "\"SELECT, INSERT ON TABLE app.orders\", \"USAGE ON SCHEMA app\" or \"SELECT ON ALL TABLES IN SCHEMA app\""
                }
                Dialect::MySql => "\"SELECT ON app.*\" or \"SELECT, INSERT ON app.orders\"",
            };
            errors.push(FieldError::new(
                format!("{field}.grants[{i}]"),
                format!("{e}; write `<privileges> ON <object>`, for example {example}"),
            ));
        }
    }
    match (dialect, db.account_host.as_deref()) {
        (Dialect::Postgres, Some(_)) => errors.push(FieldError::new(
            format!("{field}.accountHost"),
            "is only used by MySQL/MariaDB (the host part of 'user'@'host'); remove it",
        )),
        (Dialect::MySql, Some(host)) if !is_account_host(host) => errors.push(FieldError::new(
            format!("{field}.accountHost"),
            format!(
                "{host:?} is not an account host pattern: use letters, digits and . % _ : - / \
                 only (e.g. %, 10.%, localhost), at most 255 characters"
            ),
        )),
        _ => {}
    }
    for (i, r) in db.member_of.iter().enumerate() {
        if r.is_empty() || r.contains(['\'', '"', ';', '`']) {
            errors.push(FieldError::new(
                format!("{field}.memberOf[{i}]"),
                "must be a plain role name without quotes or ';'",
            ));
        }
    }
}

fn check_template(field: &str, template: &str, errors: &mut Vec<FieldError>) {
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            errors.push(FieldError::new(field, "has an unclosed '{{'"));
            return;
        };
        let name = after[..end].trim();
        if !TEMPLATE_PLACEHOLDERS.contains(&name) {
            errors.push(FieldError::new(
                field,
                format!(
                    "unknown placeholder {{{{ {name} }}}}; use one of {}",
                    TEMPLATE_PLACEHOLDERS.join(", ")
                ),
            ));
        }
        rest = &after[end + 2..];
    }
}

/// A MySQL account host: a name, an address, a `%`/`_` pattern or `address/netmask`.
fn is_account_host(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".%_:-/".contains(&b))
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn is_secret_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// A relative file name without `..`, absolute paths or empty components.
pub fn is_file_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && !s.starts_with('/')
        && s.split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.starts_with(".."))
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}
