//! Muon's CustomResourceDefinitions, with OpenAPI v3 schemas generated from the resource
//! types of [`crate::resource`] (their `schemars` derives, behind the `schema` feature), so
//! the schema users' objects are checked against in a cluster and the parser the control
//! plane runs never disagree about a field's name or type.
//!
//! Kubernetes wants *structural* schemas: every node typed, no `$ref`, no `oneOf`/`anyOf`
//! except in the shapes it knows, and no `additionalProperties: false` (the API server prunes
//! unknown fields instead). [`structural`] turns what schemars generates into that and refuses
//! anything it cannot convert. Which kinds get a CRD, and which spec type each has, is one
//! table: [`spec_schema`]. Nothing here performs I/O.

use crate::resource::{
    AuthorizationPolicySpec, Kind, PeerAuthenticationSpec, ServiceSpec, WorkloadSpec, MUON_GROUP,
};
use schemars::generate::SchemaSettings;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde_json::{json, Map, Value as Json};

/// The version of Muon's group every CRD serves and stores.
pub const CRD_VERSION: &str = "v1alpha1";

/// The spec schema of a kind that Muon defines (`muon.io`), in Kubernetes' structural form;
/// `None` for the Gateway API's kinds, whose CRDs the Gateway API project ships.
///
/// This is the one table of Muon's CRDs: a new `muon.io` kind is one line here.
pub fn spec_schema(kind: Kind) -> Option<Result<Json, String>> {
    let schema = match kind {
        Kind::Service => schema_of::<ServiceSpec>(),
        Kind::Workload => schema_of::<WorkloadSpec>(),
        Kind::AuthorizationPolicy => schema_of::<AuthorizationPolicySpec>(),
        Kind::PeerAuthentication => schema_of::<PeerAuthenticationSpec>(),
        Kind::TrafficPolicy => schema_of::<crate::resource::TrafficPolicySpec>(),
        // The Gateway API's kinds come with the Gateway API's own CRDs.
        Kind::HttpRoute | Kind::GrpcRoute | Kind::Gateway | Kind::BackendTrafficPolicy => {
            return None
        }
    };
    Some(structural(schema).map_err(|e| format!("{kind}: spec{e}")))
}

/// The kinds that get a CRD, in [`Kind::ALL`]'s order.
pub fn crd_kinds() -> impl Iterator<Item = Kind> {
    Kind::ALL.into_iter().filter(|k| is_muon_kind(*k))
}

fn is_muon_kind(kind: Kind) -> bool {
    kind.api_version() == crate::resource::MUON_API_VERSION
}

/// A kind's plural resource name: lowercase, `y` → `ies`, else `s` (`services`,
/// `authorizationpolicies`).
pub fn plural(kind: Kind) -> String {
    let lower = kind.as_str().to_ascii_lowercase();
    match lower.strip_suffix('y') {
        Some(stem) => format!("{stem}ies"),
        None => format!("{lower}s"),
    }
}

/// Every CRD, in [`crd_kinds`]' order.
pub fn crds() -> Result<Vec<Json>, String> {
    crd_kinds().map(crd).collect()
}

/// The CustomResourceDefinition of one of Muon's kinds.
pub fn crd(kind: Kind) -> Result<Json, String> {
    let spec = spec_schema(kind)
        .ok_or_else(|| format!("{kind} is not one of Muon's own kinds; it has no CRD here"))??;
    let plural = plural(kind);
    let singular = kind.as_str().to_ascii_lowercase();
    Ok(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{plural}.{MUON_GROUP}"),
            "labels": {"app.kubernetes.io/part-of": "muon"},
        },
        "spec": {
            "group": MUON_GROUP,
            "names": {
                "kind": kind.as_str(),
                "listKind": format!("{kind}List"),
                "plural": plural,
                "singular": singular,
                "categories": ["muon"],
            },
            "scope": "Namespaced",
            "versions": [{
                "name": CRD_VERSION,
                "served": true,
                "storage": true,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": format!("A Muon {kind} (see docs/configuration.md)."),
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec,
                    },
                    "required": ["spec"],
                }},
            }],
        },
    }))
}

fn schema_of<T: JsonSchema>() -> Json {
    let mut settings = SchemaSettings::draft2020_12();
    settings.inline_subschemas = true;
    settings
        .into_generator()
        .into_root_schema_for::<T>()
        .to_value()
}

/// `ports` of a policy's operation: numbers or strings holding one (`9090`, `"9090"`).
pub fn ports(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {"x-kubernetes-int-or-string": true},
    })
}

/// Converts a generated JSON schema to a Kubernetes structural schema. Errors name the path
/// of the node that has no structural form (a programming error in a resource type, caught by
/// the tests).
pub fn structural(schema: Json) -> Result<Json, String> {
    let mut out = convert(schema, "")?;
    if let Some(o) = out.as_object_mut() {
        o.remove("title");
    }
    Ok(out)
}

fn convert(schema: Json, path: &str) -> Result<Json, String> {
    let node = match schema {
        // `serde_json::Value`: anything.
        Json::Bool(true) => return Ok(json!({"x-kubernetes-preserve-unknown-fields": true})),
        Json::Object(node) => node,
        other => {
            return Err(format!(
                "{path}: {other} is not a schema Kubernetes can take"
            ))
        }
    };
    let mut out = Map::new();
    for (key, value) in node {
        match key.as_str() {
            "$schema" | "$defs" | "definitions" => {}
            // Kubernetes prunes unknown fields; `false` is not allowed in a CRD.
            "additionalProperties" if value == Json::Bool(false) => {}
            "additionalProperties" => {
                out.insert(key, convert(value, &format!("{path}.*"))?);
            }
            "properties" => {
                let Json::Object(props) = value else {
                    return Err(format!("{path}: properties is not an object"));
                };
                let mut converted = Map::new();
                for (name, p) in props {
                    let sub = convert(p, &format!("{path}.{name}"))?;
                    converted.insert(name, sub);
                }
                out.insert(key, Json::Object(converted));
            }
            "items" => {
                out.insert(key, convert(value, &format!("{path}[]"))?);
            }
            // JSON Schema's unsigned formats are not OpenAPI's; `minimum` says it.
            "format" if matches!(value.as_str(), Some(f) if f.starts_with("uint")) => {}
            "const" => {
                out.insert("enum".into(), Json::Array(vec![value]));
            }
            // `Option<T>`: absent is how it is written, so `null` is dropped.
            "type" if !value.is_string() => {
                let types = value.as_array().map(|t| {
                    t.iter()
                        .filter(|t| t.as_str() != Some("null"))
                        .collect::<Vec<_>>()
                });
                match types.as_deref() {
                    Some([one]) => {
                        out.insert(key, (*one).clone());
                    }
                    _ => {
                        return Err(format!(
                            "{path}: type {value} (a choice of types) has no structural form"
                        ))
                    }
                }
            }
            "type"
            | "description"
            | "default"
            | "required"
            | "enum"
            | "minimum"
            | "maximum"
            | "minLength"
            | "maxLength"
            | "minItems"
            | "maxItems"
            | "pattern"
            | "format"
            | "title"
            | "x-kubernetes-int-or-string"
            | "x-kubernetes-preserve-unknown-fields" => {
                out.insert(key, value);
            }
            other => {
                return Err(format!(
                    "{path}: `{other}` has no structural form in a CRD schema"
                ));
            }
        }
    }
    let typed = out.contains_key("type")
        || out.contains_key("x-kubernetes-int-or-string")
        || out.contains_key("x-kubernetes-preserve-unknown-fields");
    if !typed {
        return Err(format!("{path}: a node without a type"));
    }
    out.remove("title");
    Ok(Json::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_muon_kind_has_a_crd_with_its_plural() {
        let kinds: Vec<_> = crd_kinds().collect();
        assert_eq!(
            kinds,
            [
                Kind::Service,
                Kind::Workload,
                Kind::AuthorizationPolicy,
                Kind::PeerAuthentication,
                Kind::TrafficPolicy
            ]
        );
        for k in Kind::ALL {
            assert_eq!(spec_schema(k).is_some(), is_muon_kind(k), "{k}");
        }
        assert_eq!(plural(Kind::AuthorizationPolicy), "authorizationpolicies");
        let crds = crds().unwrap();
        assert_eq!(crds[0]["metadata"]["name"], "services.muon.io");
    }

    #[test]
    fn schemas_follow_serde_names_defaults_and_required_fields() {
        let s = spec_schema(Kind::Service).unwrap().unwrap();
        assert_eq!(s["type"], "object");
        assert_eq!(s["required"], json!(["vips", "ports"]));
        let port = &s["properties"]["ports"]["items"];
        assert_eq!(port["properties"]["targetPort"]["type"], "integer");
        assert_eq!(port["properties"]["targetPort"]["minimum"], 0);
        assert!(port["properties"]["targetPort"].get("format").is_none());
        assert!(port.get("additionalProperties").is_none(), "{port}");
        assert_eq!(
            s["properties"]["selector"]["additionalProperties"]["type"],
            "string"
        );
        let w = spec_schema(Kind::Workload).unwrap().unwrap();
        assert_eq!(w["properties"]["ready"]["default"], true);
        assert_eq!(w["properties"]["weight"]["default"], 1);
        let a = spec_schema(Kind::AuthorizationPolicy).unwrap().unwrap();
        let op = &a["properties"]["rules"]["items"]["properties"]["to"]["items"]["properties"]
            ["operation"]["properties"];
        assert_eq!(op["ports"]["items"]["x-kubernetes-int-or-string"], true);
        assert_eq!(op["notPorts"]["items"]["x-kubernetes-int-or-string"], true);
    }

    #[test]
    fn what_has_no_structural_form_is_refused_by_path() {
        let e = structural(json!({"type": "object", "properties": {
            "a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/B"}}}
        }}))
        .unwrap_err();
        assert_eq!(e, ".a.b: `$ref` has no structural form in a CRD schema");
        let e = structural(json!({"type": "object", "properties": {
            "a": {"type": ["string", "integer"]}
        }}))
        .unwrap_err();
        assert!(e.starts_with(".a: type [\"string\",\"integer\"]"), "{e}");
        assert_eq!(
            structural(json!({"type": ["string", "null"]})).unwrap(),
            json!({"type": "string"})
        );
        let e = structural(json!({"properties": {}})).unwrap_err();
        assert_eq!(e, ": a node without a type");
        assert_eq!(
            structural(json!(true)).unwrap(),
            json!({"x-kubernetes-preserve-unknown-fields": true})
        );
    }
}
