//! Manifests: multi-document YAML of objects in the Kubernetes envelope (`apiVersion`,
//! `kind`, `metadata`, `spec`), read into management-API `Object`s. YAML goes through
//! serde_norway into `serde_json::Value`, and the spec into a protobuf `Struct`
//! (`muon_api::json::struct_from_json`). The objects themselves are validated by the control
//! plane; here only the envelope is checked. Errors name the file, the document and the line.

use anyhow::{bail, Result};
use muon_api::v1::{Metadata, Object};
use serde_json::Value;
use std::collections::HashMap;

/// One document of a manifest, with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// 1-based index among the non-empty documents of its file.
    pub index: usize,
    /// The line its text starts on (1-based).
    pub line: usize,
    pub object: Object,
}

/// Splits `text` at `---` lines; returns each document's text and its first line.
fn split(text: &str) -> Vec<(String, usize)> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") || trimmed.starts_with("---\t") {
            docs.push((std::mem::take(&mut cur), start));
            start = i + 2;
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    docs.push((cur, start));
    docs
}

/// Parses every document of `text` (named `file` in errors). Empty documents are skipped.
/// Every problem is reported, each as `file:line: document N: reason`.
pub fn parse(file: &str, text: &str) -> Result<Vec<Document>> {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    let mut index = 0;
    for (doc, start) in split(text) {
        let value: Value = match serde_norway::from_str(&doc) {
            Ok(v) => v,
            Err(e) => {
                index += 1;
                let line = e.location().map_or(start, |l| start + l.line() - 1);
                // The parser's own positions are relative to the document: drop them.
                let text = e.to_string();
                let reason = text.split(" at line ").next().unwrap_or(&text);
                problems.push(format!("{file}:{line}: document {index}: {reason}"));
                continue;
            }
        };
        if value.is_null() {
            continue;
        }
        index += 1;
        match object(&value) {
            Ok(object) => out.push(Document {
                index,
                line: start,
                object,
            }),
            Err(e) => problems.push(format!("{file}:{start}: document {index}: {e}")),
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    if out.is_empty() {
        bail!("{file}: no objects in it");
    }
    Ok(out)
}

/// One envelope → `Object`.
pub fn object(v: &Value) -> Result<Object, String> {
    let map = v
        .as_object()
        .ok_or("not an object with apiVersion, kind, metadata and spec")?;
    let text = |key: &str| -> Result<String, String> {
        match map.get(key) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(_) => Err(format!("{key} must be a non-empty string")),
            None => Err(format!("{key} is missing")),
        }
    };
    let api_version = text("apiVersion")?;
    let kind = text("kind")?;
    let meta = map
        .get("metadata")
        .and_then(Value::as_object)
        .ok_or("metadata is missing (it needs at least a name)")?;
    let name = match meta.get("name") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err("metadata.name is missing".into()),
    };
    let namespace = match meta.get("namespace") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err("metadata.namespace must be a string".into()),
    };
    let mut labels = HashMap::new();
    if let Some(l) = meta.get("labels") {
        let l = l.as_object().ok_or("metadata.labels must be a map")?;
        for (k, v) in l {
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => return Err(format!("metadata.labels.{k} must be a string")),
            };
            labels.insert(k.clone(), v);
        }
    }
    let unknown: Vec<&String> = map
        .keys()
        .filter(|k| !["apiVersion", "kind", "metadata", "spec"].contains(&k.as_str()))
        .collect();
    if !unknown.is_empty() {
        return Err(format!("unknown field {:?}", unknown[0]));
    }
    let spec = match map.get("spec") {
        None | Some(Value::Null) => Default::default(),
        Some(s) => muon_api::json::struct_from_json(s).ok_or("spec must be a map")?,
    };
    Ok(Object {
        api_version,
        kind,
        metadata: Some(Metadata {
            name,
            namespace,
            labels,
            ..Default::default()
        }),
        spec: Some(spec),
    })
}

/// Reads `path` (`-` = stdin).
pub fn read(path: &str) -> Result<(String, String)> {
    use anyhow::Context;
    if path == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("reading stdin")?;
        Ok(("<stdin>".into(), text))
    } else {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
        Ok((path.to_owned(), text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = "\
apiVersion: muon.io/v1alpha1
kind: Service
metadata:
  name: web
  namespace: shop
  labels: {tier: front}
spec:
  vips: [198.19.0.1]
  ports:
  - port: 80
    targetPort: 8080
---
# a comment only: skipped
---
apiVersion: muon.io/v1alpha1
kind: Workload
metadata: {name: web-0, namespace: shop, labels: {app: web}}
spec: {address: 198.18.0.2}
";

    #[test]
    fn multi_document_yaml_becomes_objects_with_integer_ports() {
        let docs = parse("web.yaml", TWO).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!((docs[0].index, docs[0].line), (1, 1));
        assert_eq!((docs[1].index, docs[1].line), (2, 15));
        let svc = &docs[0].object;
        assert_eq!(svc.kind, "Service");
        let meta = svc.metadata.as_ref().unwrap();
        assert_eq!(
            (meta.name.as_str(), meta.namespace.as_str()),
            ("web", "shop")
        );
        assert_eq!(meta.labels["tier"], "front");
        let spec = muon_api::json::json_from_struct(svc.spec.as_ref().unwrap());
        assert_eq!(spec["ports"][0]["targetPort"], 8080);
        assert_eq!(spec["vips"][0], "198.19.0.1");
    }

    #[test]
    fn errors_name_the_file_the_document_and_the_line() {
        let bad = "\
apiVersion: muon.io/v1alpha1
kind: Service
metadata: {name: a}
spec: {}
---
apiVersion: muon.io/v1alpha1
metadata: {name: b}
---
apiVersion: muon.io/v1alpha1
kind: Service
metadata:
  name: c
  labels: [oops
";
        let err = parse("bad.yaml", bad).unwrap_err().to_string();
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines[0], "bad.yaml:6: document 2: kind is missing");
        assert_eq!(
            lines[1],
            "bad.yaml:14: document 3: did not find expected ',' or ']'"
        );
        let err = parse("x.yaml", "kind: Service\nmetadata: {name: a}\nspek: {}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("apiVersion is missing"), "{err}");
        assert!(parse("e.yaml", "# nothing\n").is_err());
    }
}
