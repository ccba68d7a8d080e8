//! The API reference (`docs/api-reference.md`), generated from the CRD schemas so it
//! never drifts from what the API server enforces.

use serde_json::Value;

/// Markdown reference of every field of every CRD.
pub fn markdown() -> String {
    let mut out = String::from(
        "# API reference: `leasehold.dev/v1alpha1`\n\n\
         Generated from the CRD schemas by `make crds` (`crdgen`); do not edit. \
         Types are OpenAPI types; defaults are applied by the API server.\n",
    );
    for (_, crd) in crate::crds() {
        let kind = &crd.spec.names.kind;
        let Some(schema) = crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| serde_json::to_value(s).ok())
        else {
            continue;
        };
        let short = crd
            .spec
            .names
            .short_names
            .clone()
            .unwrap_or_default()
            .join(", ");
        out.push_str(&format!("\n## {kind} (`kubectl get {short}`)\n\n"));
        if let Some(d) = schema["description"].as_str() {
            out.push_str(&format!("{}\n\n", one_line(d)));
        }
        for rule in schema["properties"]["spec"]["x-kubernetes-validations"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(m) = rule["message"].as_str() {
                out.push_str(&format!("- Rule: {m}.\n"));
            }
        }
        out.push_str("\n| field | type | default | description |\n|---|---|---|---|\n");
        for part in ["spec", "status"] {
            walk(&mut out, part, &schema["properties"][part]);
        }
    }
    out
}

fn one_line(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn type_of(v: &Value) -> String {
    match v["type"].as_str() {
        Some("array") => format!("[]{}", type_of(&v["items"])),
        Some("object") if v["additionalProperties"].is_object() => {
            format!("map[string]{}", type_of(&v["additionalProperties"]))
        }
        Some(t) => match v["enum"].as_array() {
            Some(values) => values
                .iter()
                .filter_map(Value::as_str)
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(" \\| "),
            None => t.to_string(),
        },
        None => "object".into(),
    }
}

fn walk(out: &mut String, path: &str, node: &Value) {
    let Some(props) = node["properties"].as_object() else {
        return;
    };
    let required: Vec<&str> = node["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for (name, child) in props {
        let field = format!("{path}.{name}");
        let default = match &child["default"] {
            Value::Null => String::new(),
            Value::Object(m) if m.is_empty() => String::new(),
            v => format!("`{}`", v.to_string().trim_matches('"')),
        };
        let mut description = child["description"]
            .as_str()
            .map(one_line)
            .unwrap_or_default();
        if required.contains(&name.as_str()) {
            description = format!("**Required.** {description}");
        }
        out.push_str(&format!(
            "| `{field}` | {} | {default} | {description} |\n",
            type_of(child)
        ));
        // Kubernetes' own types (conditions, label selectors) are documented upstream.
        if field.ends_with("conditions") || field.ends_with("namespaceSelector") {
            continue;
        }
        let next = if child["type"] == "array" {
            &child["items"]
        } else {
            child
        };
        let suffix = if child["type"] == "array" { "[]" } else { "" };
        walk(out, &format!("{field}{suffix}"), next);
    }
}
