#![allow(clippy::unwrap_used)]
//! The CRDs: committed files match the types, the examples are valid, and invalid specs
//! are rejected with a message that names the field.

use std::path::{Path, PathBuf};

use kube::CustomResourceExt;
use kube::core::cel::Validator;
use leasehold_api::validate::{policy_params, validate_lease};
use leasehold_api::{RotationPolicy, SecretLease};
use serde::Deserialize;
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn committed_crds_match_the_rust_types() {
    for (file, crd) in leasehold_api::crds() {
        let want = leasehold_api::crd_yaml(&crd).unwrap();
        for dir in ["crds", "charts/leasehold-crds/files"] {
            let path = repo_root().join(dir).join(&file);
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                have == want,
                "{} is out of date with crates/api: run `make crds` (cargo run -p leasehold-api --bin crdgen) and commit the result",
                path.display()
            );
        }
    }
}

#[test]
fn committed_api_reference_matches_the_rust_types() {
    let path = repo_root().join("docs/api-reference.md");
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == leasehold_api::reference::markdown(),
        "{} is out of date: run `make crds` and commit the result",
        path.display()
    );
}

/// The openAPIV3Schema of a CRD as plain JSON.
fn schema_of(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Value {
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .unwrap(),
    )
    .unwrap()
}

/// Validate an object as the API server would: structure first, then CEL rules (after
/// defaulting). Returns the error messages.
fn admit(object: &Value) -> Vec<String> {
    let crd = match object["kind"].as_str() {
        Some("SecretLease") => SecretLease::crd(),
        Some("RotationPolicy") => RotationPolicy::crd(),
        Some("Issuer") => leasehold_api::Issuer::crd(),
        Some("ClusterIssuer") => leasehold_api::ClusterIssuer::crd(),
        other => panic!("not a leasehold object: {other:?}"),
    };
    let schema = schema_of(&crd);
    let mut errors = Vec::new();
    // `nullable` is an OpenAPI keyword JSON Schema does not know; treat it as allowing null.
    let structural = jsonschema::options()
        .should_validate_formats(false)
        .build(&openapi_to_jsonschema(schema.clone()))
        .unwrap();
    for e in structural.iter_errors(object) {
        errors.push(format!("{}: {}", e.instance_path(), e));
    }
    if errors.is_empty()
        && let Err(es) = Validator::new().validate_with_defaults(&schema, object, None)
    {
        for e in es.into_vec() {
            errors.push(e.to_string());
        }
    }
    errors
}

fn openapi_to_jsonschema(mut v: Value) -> Value {
    fn walk(v: &mut Value) {
        if let Value::Object(map) = v {
            if map.remove("nullable") == Some(Value::Bool(true))
                && let Some(Value::String(t)) = map.get("type").cloned()
            {
                map.insert("type".into(), serde_json::json!([t, "null"]));
            }
            // Formats like uint32/int-or-string are OpenAPI-only.
            map.remove("format");
            for (_, child) in map.iter_mut() {
                walk(child);
            }
        } else if let Value::Array(items) = v {
            items.iter_mut().for_each(walk);
        }
    }
    walk(&mut v);
    v
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn example_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in ["examples", "examples/local"] {
        for entry in std::fs::read_dir(repo_root().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_example_is_admitted_and_valid() {
    let mut checked = 0;
    for file in example_files() {
        let docs = documents(&file);
        let policies: Vec<RotationPolicy> = docs
            .iter()
            .filter(|d| d["kind"] == "RotationPolicy")
            .map(|d| serde_json::from_value(d.clone()).unwrap())
            .collect();
        for doc in &docs {
            if !matches!(doc["kind"].as_str(), Some("SecretLease" | "RotationPolicy")) {
                continue;
            }
            let errors = admit(doc);
            assert!(errors.is_empty(), "{}: {errors:?}", file.display());
            match doc["kind"].as_str() {
                Some("RotationPolicy") => {
                    let p: RotationPolicy = serde_json::from_value(doc.clone()).unwrap();
                    policy_params(&p.spec).unwrap_or_else(|e| panic!("{}: {e:?}", file.display()));
                }
                _ => {
                    let l: SecretLease = serde_json::from_value(doc.clone()).unwrap();
                    // Policies live in rotationpolicy.yaml or the same file.
                    let all_policies: Vec<RotationPolicy> = example_files()
                        .iter()
                        .flat_map(|f| documents(f))
                        .filter(|d| d["kind"] == "RotationPolicy")
                        .map(|d| serde_json::from_value(d).unwrap())
                        .chain(policies.iter().cloned())
                        .collect();
                    let policy = all_policies
                        .iter()
                        .find(|p| p.metadata.name.as_deref() == Some(&l.spec.policy_ref.name))
                        .unwrap_or_else(|| {
                            panic!("{}: no policy {}", file.display(), l.spec.policy_ref.name)
                        });
                    let errors = validate_lease(&l.spec, Some(&policy.spec));
                    assert!(errors.is_empty(), "{}: {errors:?}", file.display());
                }
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 4,
        "expected the examples to hold policies and leases"
    );
}

fn lease(spec: Value) -> Value {
    serde_json::json!({
        "apiVersion": "leasehold.dev/v1alpha1",
        "kind": "SecretLease",
        "metadata": {"name": "x", "namespace": "default"},
        "spec": spec,
    })
}

fn policy(spec: Value) -> Value {
    serde_json::json!({
        "apiVersion": "leasehold.dev/v1alpha1",
        "kind": "RotationPolicy",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": spec,
    })
}

fn pg() -> Value {
    serde_json::json!({"host": "db", "database": "app", "adminSecretRef": {"name": "admin"}})
}

/// Cases the API server rejects, with a word each message must contain.
#[test]
fn schema_rejects_invalid_specs_naming_the_field() {
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "no backend",
            lease(serde_json::json!({"policyRef": {"name": "p"}})),
            "exactly one backend",
        ),
        (
            "two backends",
            lease(serde_json::json!({"policyRef": {"name": "p"}, "postgres": pg(), "mysql": pg()})),
            "exactly one backend",
        ),
        (
            "delivery into a versions Secret",
            lease(
                serde_json::json!({"policyRef": {"name": "p"}, "postgres": pg(), "delivery": {"secret": {"name": "other-leasehold-versions"}}}),
            ),
            "-leasehold-versions",
        ),
        (
            "missing policyRef",
            lease(serde_json::json!({"postgres": pg()})),
            "policyRef",
        ),
        (
            "port out of range",
            lease(
                serde_json::json!({"policyRef": {"name": "p"}, "postgres": {"host": "db", "database": "app", "port": 70000, "adminSecretRef": {"name": "a"}}}),
            ),
            "port",
        ),
        (
            "account host with a quote",
            lease(
                serde_json::json!({"policyRef": {"name": "p"}, "mysql": {"host": "db", "database": "app", "accountHost": "%' OR '1", "adminSecretRef": {"name": "a"}}}),
            ),
            "accountHost",
        ),
        (
            "unknown TLS mode",
            lease(
                serde_json::json!({"policyRef": {"name": "p"}, "postgres": {"host": "db", "database": "app", "tls": {"mode": "Sometimes"}, "adminSecretRef": {"name": "a"}}}),
            ),
            "mode",
        ),
        (
            "perPod without CSI",
            lease(
                serde_json::json!({"policyRef": {"name": "p"}, "postgres": pg(), "perPod": true}),
            ),
            "perPod",
        ),
        (
            "unknown strategy",
            policy(serde_json::json!({"ttl": "1h", "strategy": "Sometimes"})),
            "strategy",
        ),
        (
            "ttl too short",
            policy(serde_json::json!({"ttl": "10s"})),
            "ttl",
        ),
        (
            "negative ttl",
            policy(serde_json::json!({"ttl": "-1h"})),
            "ttl",
        ),
        (
            "renewBefore not a duration",
            policy(serde_json::json!({"ttl": "1h", "renewBefore": "soon"})),
            "renewBefore",
        ),
        (
            "renewBefore >= ttl",
            policy(serde_json::json!({"ttl": "1h", "renewBefore": "2h"})),
            "renewBefore",
        ),
        (
            "maxWait < gracePeriod",
            policy(
                serde_json::json!({"ttl": "1h", "revoke": {"gracePeriod": "10m", "maxWait": "1m"}}),
            ),
            "maxWait",
        ),
        (
            "drain mode",
            policy(serde_json::json!({"ttl": "1h", "revoke": {"drainSessions": {"mode": "Kill"}}})),
            "mode",
        ),
        (
            "password too short",
            policy(serde_json::json!({"ttl": "1h", "password": {"length": 8}})),
            "length",
        ),
        (
            "window start",
            policy(
                serde_json::json!({"ttl": "1h", "maintenanceWindow": {"start": "25:00", "duration": "1h"}}),
            ),
            "start",
        ),
        (
            "verify timeout",
            policy(serde_json::json!({"ttl": "1h", "verify": {"timeout": "0s"}})),
            "verify.timeout",
        ),
    ];
    for (name, object, needle) in cases {
        let errors = admit(&object);
        assert!(
            !errors.is_empty(),
            "{name}: accepted but should be rejected"
        );
        assert!(
            errors.iter().any(|e| e.contains(needle)),
            "{name}: no error mentions {needle:?}: {errors:?}"
        );
    }
}

/// Cases only `validate()` can judge (they need the policy, or parse free text).
#[test]
fn validate_rejects_what_the_schema_cannot_express() {
    let p = |spec: Value| -> leasehold_api::RotationPolicySpec {
        serde_json::from_value(spec).unwrap()
    };
    let l =
        |spec: Value| -> leasehold_api::SecretLeaseSpec { serde_json::from_value(spec).unwrap() };

    let err = policy_params(&p(
        serde_json::json!({"ttl": "1h", "renewBefore": "5m", "revoke": {"maxWait": "30m"}}),
    ))
    .unwrap_err();
    assert!(
        err.iter()
            .any(|e| e.field == "spec.renewBefore" && e.message.contains("maxWait")),
        "{err:?}"
    );

    // The defaults alone make a valid policy: maxWait shrinks to fit the renewal window.
    let minimal = policy_params(&p(serde_json::json!({"ttl": "1h"}))).unwrap();
    assert_eq!(minimal.renew_before, std::time::Duration::from_secs(1200));
    assert_eq!(minimal.max_wait, std::time::Duration::from_secs(1200));
    let long = policy_params(&p(serde_json::json!({"ttl": "24h"}))).unwrap();
    assert_eq!(long.max_wait, std::time::Duration::from_secs(1800));
    assert!(admit(&policy(serde_json::json!({"ttl": "1h"}))).is_empty());
    let err =
        policy_params(&p(serde_json::json!({"ttl": "1h", "renewBefore": "95%"}))).unwrap_err();
    assert!(err.iter().any(|e| e.field == "spec.renewBefore"), "{err:?}");

    let err = policy_params(&p(
        serde_json::json!({"ttl": "1h", "access": {"serviceAccounts": ["Bad Name"]}}),
    ))
    .unwrap_err();
    assert!(
        err.iter()
            .any(|e| e.field == "spec.access.serviceAccounts[0]"),
        "{err:?}"
    );

    let alternating = p(serde_json::json!({"ttl": "1h", "strategy": "AlternatingUsers"}));
    let errs = validate_lease(
        &l(serde_json::json!({"policyRef": {"name": "p"}, "postgres": pg()})),
        Some(&alternating),
    );
    assert!(
        errs.iter()
            .any(|e| e.field == "spec.postgres.username" && e.message.contains("required")),
        "{errs:?}"
    );

    let dynamic = p(serde_json::json!({"ttl": "1h"}));
    let errs = validate_lease(
        &l(
            serde_json::json!({"policyRef": {"name": "p"}, "postgres": pg(), "delivery": {"secret": {"name": "db-leasehold-versions"}}}),
        ),
        Some(&dynamic),
    );
    assert!(
        errs.iter()
            .any(|e| e.field == "spec.delivery.secret.name"
                && e.message.contains("controller's own")),
        "{errs:?}"
    );
    let mut bad_template = pg();
    bad_template["usernameTemplate"] = "app_{{name}}".into();
    let errs = validate_lease(
        &l(serde_json::json!({"policyRef": {"name": "p"}, "postgres": bad_template})),
        Some(&dynamic),
    );
    assert!(
        errs.iter()
            .any(|e| e.field == "spec.postgres.usernameTemplate"),
        "{errs:?}"
    );

    // Without the UID first, two leases can render one user (`-` and `.` become `_`).
    let mut colliding = pg();
    colliding["usernameTemplate"] = "app_{{namespace}}_{{name}}_v{{version}}".into();
    let errs = validate_lease(
        &l(serde_json::json!({"policyRef": {"name": "p"}, "postgres": colliding})),
        Some(&dynamic),
    );
    assert!(
        errs.iter()
            .any(|e| e.field == "spec.postgres.usernameTemplate" && e.message.contains("{{uid}}")),
        "{errs:?}"
    );

    let mut long_template = pg();
    long_template["usernameTemplate"] = "app_{{uid}}_{{namespace}}_{{name}}_{{version}}".into();
    let errs = validate_lease(
        &l(serde_json::json!({"policyRef": {"name": "p"}, "mysql": long_template})),
        Some(&dynamic),
    );
    assert!(
        errs.iter()
            .any(|e| e.field == "spec.mysql.usernameTemplate" && e.message.contains("32")),
        "{errs:?}"
    );

    let mut bad_grant = pg();
    bad_grant["grants"] = serde_json::json!(["SELECT ON t TO bob; DROP TABLE t"]);
    let errs = validate_lease(
        &l(serde_json::json!({"policyRef": {"name": "p"}, "postgres": bad_grant})),
        Some(&dynamic),
    );
    assert!(
        errs.iter().any(|e| e.field == "spec.postgres.grants[0]"),
        "{errs:?}"
    );

    let errs = validate_lease(
        &l(
            serde_json::json!({"policyRef": {"name": "p"}, "postgres": pg(), "delivery": {"secret": {"template": {"dsn": "{{ secret }}"}}}}),
        ),
        Some(&dynamic),
    );
    assert!(
        errs.iter()
            .any(|e| e.field == "spec.delivery.secret.template[dsn]"
                && e.message.contains("unknown placeholder")),
        "{errs:?}"
    );

    let errs = validate_lease(
        &l(
            serde_json::json!({"policyRef": {"name": "p"}, "postgres": pg(), "delivery": {"csi": {"files": {"../escape": "{{ password }}"}}}}),
        ),
        Some(&dynamic),
    );
    assert!(
        errs.iter()
            .any(|e| e.field == "spec.delivery.csi.files[../escape]"),
        "{errs:?}"
    );
}

/// Grants are parsed, not spliced: injection attempts are refused naming the grant,
/// the documented forms pass, per database dialect.
#[test]
fn grants_are_parsed_per_database() {
    let dynamic: leasehold_api::RotationPolicySpec =
        serde_json::from_value(serde_json::json!({"ttl": "1h"})).unwrap();
    let check = |db: &str, grants: &[&str]| {
        let mut spec = pg();
        spec["grants"] = serde_json::json!(grants);
        let lease: leasehold_api::SecretLeaseSpec =
            serde_json::from_value(serde_json::json!({"policyRef": {"name": "p"}, db: spec}))
                .unwrap();
        validate_lease(&lease, Some(&dynamic))
    };
    for bad in [
        "SELECT ON t/**/TO/**/bob",
        "SELECT ON t TO bob",
        "SELECT ON t; DROP TABLE t",
        "SELECT ON t -- x",
        "SELECT ON 't'",
        "SELECT ON TABLE t WITH GRANT OPTION",
        "SUPERUSER ON DATABASE d",
    ] {
        let errs = check("postgres", &["USAGE ON SCHEMA app", bad]);
        assert!(
            errs.iter()
                .any(|e| e.field == "spec.postgres.grants[1]"
                    && e.message.contains(&format!("{bad:?}"))),
            "{bad}: {errs:?}"
        );
        assert!(
            !errs.iter().any(|e| e.field == "spec.postgres.grants[0]"),
            "{errs:?}"
        );
    }
    for bad in [
        "SELECT ON app.*# comment",
        "SELECT ON app.*/**/TO/**/x",
        "SELECT ON app.* TO 'x'@'%'",
        "SELECT ON *.*",
        "SELECT ON \"app\".*",
        "SUPER ON app.*",
    ] {
        let errs = check("mysql", &[bad]);
        assert!(
            errs.iter()
                .any(|e| e.field == "spec.mysql.grants[0]"
                    && e.message.contains(&format!("{bad:?}"))),
            "{bad}: {errs:?}"
        );
    }
    assert_eq!(
        check(
            "postgres",
            &[
                "SELECT, INSERT ON TABLE orders",
                "USAGE ON SCHEMA app",
                "ALL ON ALL TABLES IN SCHEMA app",
                "SELECT ON app.\"Orders\"",
            ]
        ),
        vec![]
    );
    assert_eq!(
        check(
            "mysql",
            &["SELECT ON app.*", "SELECT, INSERT ON `app`.orders"]
        ),
        vec![]
    );
}

/// `accountHost` is the MySQL account host pattern: refused on PostgreSQL, checked on
/// MySQL, absent means `%`.
#[test]
fn account_host_is_a_mysql_host_pattern() {
    let dynamic: leasehold_api::RotationPolicySpec =
        serde_json::from_value(serde_json::json!({"ttl": "1h"})).unwrap();
    let check = |db: &str, host: Option<&str>| {
        let mut spec = pg();
        if let Some(host) = host {
            spec["accountHost"] = host.into();
        }
        let lease: leasehold_api::SecretLeaseSpec =
            serde_json::from_value(serde_json::json!({"policyRef": {"name": "p"}, db: spec}))
                .unwrap();
        validate_lease(&lease, Some(&dynamic))
    };
    for ok in [
        None,
        Some("%"),
        Some("10.%"),
        Some("localhost"),
        Some("10.0.0.0/255.0.0.0"),
    ] {
        assert_eq!(check("mysql", ok), vec![], "{ok:?}");
    }
    for bad in ["%' OR '1", "a b", "a\\b", ""] {
        let errs = check("mysql", Some(bad));
        assert!(
            errs.iter().any(|e| e.field == "spec.mysql.accountHost"),
            "{bad}: {errs:?}"
        );
    }
    let errs = check("postgres", Some("%"));
    assert!(
        errs.iter().any(|e| e.field == "spec.postgres.accountHost"),
        "{errs:?}"
    );
}

fn issuer(kind: &str, spec: Value) -> Value {
    serde_json::json!({
        "apiVersion": "leasehold.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "ca", "namespace": "default"},
        "spec": spec,
    })
}

#[test]
fn issuers_need_exactly_one_kind_and_one_ca_source() {
    let acme = serde_json::json!({
        "directoryUrl": "https://acme.example/directory",
        "email": "ops@example.com",
        "accountKeySecretRef": {"name": "acme-account"},
        "externalAccountBinding": {"keyId": "kid", "keySecretRef": {"name": "eab"}},
        "http01": {"ingressClassName": "nginx"},
        "caBundle": "-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n",
        "extraTrustAnchors": "-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n"
    });
    for kind in ["Issuer", "ClusterIssuer"] {
        for spec in [
            serde_json::json!({"ca": {"selfSigned": true}}),
            serde_json::json!({"ca": {"secretRef": {"name": "ca", "namespace": "leasehold"}}}),
            serde_json::json!({"acme": acme}),
        ] {
            let errors = admit(&issuer(kind, spec.clone()));
            assert!(errors.is_empty(), "{kind} {spec}: {errors:?}");
        }
        let cases: Vec<(Value, &str)> = vec![
            (serde_json::json!({}), "exactly one of ca and acme"),
            (
                serde_json::json!({"ca": {"selfSigned": true}, "acme": acme}),
                "exactly one of ca and acme",
            ),
            (
                serde_json::json!({"ca": {}}),
                "exactly one of secretRef and selfSigned",
            ),
            (
                serde_json::json!({"ca": {"selfSigned": true, "secretRef": {"name": "ca"}}}),
                "exactly one of secretRef and selfSigned",
            ),
        ];
        for (spec, word) in cases {
            let errors = admit(&issuer(kind, spec.clone()));
            assert!(
                errors.iter().any(|e| e.contains(word)),
                "{kind} {spec}: expected {word:?} in {errors:?}"
            );
        }
    }
    let issued: leasehold_api::Issuer = serde_json::from_value(issuer(
        "Issuer",
        serde_json::json!({"ca": {"selfSigned": true}}),
    ))
    .expect("parse");
    assert_eq!(
        issued.spec.ca,
        Some(leasehold_api::CaIssuer {
            secret_ref: None,
            self_signed: true
        })
    );
}

#[test]
fn certificate_spec_takes_the_new_fields_and_stays_compatible() {
    let old: leasehold_api::CertificateSpec = serde_json::from_value(serde_json::json!({
        "issuerRef": {"name": "ca"}, "commonName": "db", "dnsNames": ["db"]
    }))
    .expect("old form");
    assert!(old.usages.is_empty() && old.duration.is_none());
    let new: leasehold_api::CertificateSpec = serde_json::from_value(serde_json::json!({
        "issuerRef": {"name": "ca", "kind": "ClusterIssuer"}, "commonName": "db",
        "ipAddresses": ["10.0.0.7"], "uris": ["spiffe://cluster.local/ns/a/sa/b"],
        "duration": "24h", "usages": ["serverAuth", "clientAuth", "keyEncipherment"],
        "keyAlgorithm": "Rsa3072"
    }))
    .expect("new form");
    assert_eq!(new.usages.len(), 3);
}

#[test]
fn certificate_names_with_pod_variables_need_csi_delivery_alone() {
    let l =
        |spec: Value| -> leasehold_api::SecretLeaseSpec { serde_json::from_value(spec).unwrap() };
    let cert = serde_json::json!({"issuerRef": {"name": "ca"}, "commonName": "${POD_NAME}",
                                  "dnsNames": ["${POD_NAME}.${POD_NAMESPACE}.svc"]});
    let csi_only = l(
        serde_json::json!({"policyRef": {"name": "p"}, "certificate": cert,
                                        "delivery": {"csi": {"enabled": true}}}),
    );
    assert!(leasehold_api::validate::validate_lease(&csi_only, None).is_empty());
    let with_secret = l(
        serde_json::json!({"policyRef": {"name": "p"}, "certificate": cert,
                                           "delivery": {"secret": {"name": "tls"}}}),
    );
    let err = leasehold_api::validate::validate_lease(&with_secret, None);
    assert!(
        err.iter().any(|e| e.field == "spec.certificate.dnsNames[0]"
            && e.message.contains("CSI delivery alone")),
        "{err:?}"
    );
    let unknown = l(serde_json::json!({"policyRef": {"name": "p"},
        "certificate": {"issuerRef": {"name": "ca"}, "commonName": "x", "dnsNames": ["${NODE_NAME}.x"]},
        "delivery": {"csi": {"enabled": true}}}));
    let err = leasehold_api::validate::validate_lease(&unknown, None);
    assert!(
        err.iter().any(|e| e.message.contains("unknown variable")),
        "{err:?}"
    );
    let nameless = l(serde_json::json!({"policyRef": {"name": "p"},
        "certificate": {"issuerRef": {"name": "ca"}, "commonName": "x"},
        "delivery": {"secret": {"name": "tls"}}}));
    assert!(!leasehold_api::validate::validate_lease(&nameless, None).is_empty());
}
