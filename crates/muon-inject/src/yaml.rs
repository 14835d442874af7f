//! Multi-document YAML in, multi-document YAML out. Documents injection does not change are
//! copied byte for byte (comments, key order, quoting and all), and so are the `---` lines
//! between documents; only changed documents are written anew (by serde_norway).

use crate::template::Template;
use crate::workload::{describe, inject_object, ObjectReport};
use serde_json::Value;

/// What injecting a whole file did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    /// The file with every workload injected.
    pub text: String,
    pub reports: Vec<DocumentReport>,
}

/// One object's outcome, and where it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentReport {
    /// 1-based, counting the documents that are not empty.
    pub document: usize,
    /// The line the document starts on (1-based).
    pub line: usize,
    pub object: ObjectReport,
}

impl DocumentReport {
    /// `document 2 (Deployment shop/web): already injected ...`; list items say so.
    pub fn message(&self) -> String {
        let item = match self.object.item {
            Some(i) => format!(" items[{i}]"),
            None => String::new(),
        };
        format!(
            "document {}{item} ({}): {}",
            self.document,
            self.object.object,
            self.object.outcome.describe()
        )
    }
}

/// Every problem of a file, each naming its document and line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct InjectError {
    pub problems: Vec<String>,
}

/// Part of a file: a document's text, or a `---` line (with its line break).
enum Part {
    Document { text: String, line: usize },
    Separator(String),
}

fn is_separator(line: &str) -> bool {
    let t = line.trim_end_matches(['\n', '\r']).trim_end();
    t == "---" || t.starts_with("--- ") || t.starts_with("---\t")
}

fn split(text: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut start = 1;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if is_separator(line) {
            parts.push(Part::Document {
                text: std::mem::take(&mut cur),
                line: start,
            });
            parts.push(Part::Separator(line.to_string()));
            start = i + 2;
        } else {
            cur.push_str(line);
        }
    }
    parts.push(Part::Document {
        text: cur,
        line: start,
    });
    parts
}

/// Injects every workload of `text` (`file` names it in errors). Fails, naming every
/// problem, when a document is not YAML or a workload cannot be injected; then nothing is
/// written.
pub fn inject_yaml(file: &str, text: &str, template: &Template) -> Result<Injected, InjectError> {
    let mut out = String::with_capacity(text.len() * 2);
    let mut reports = Vec::new();
    let mut problems = Vec::new();
    let mut index = 0;
    for part in split(text) {
        let (doc, line) = match part {
            Part::Separator(s) => {
                out.push_str(&s);
                continue;
            }
            Part::Document { text, line } => (text, line),
        };
        let mut value: Value = match serde_norway::from_str(&doc) {
            Ok(v) => v,
            Err(e) => {
                index += 1;
                let at = e.location().map_or(line, |l| line + l.line() - 1);
                let msg = e.to_string();
                let reason = msg.split(" at line ").next().unwrap_or(&msg);
                problems.push(format!("{file}:{at}: document {index}: {reason}"));
                continue;
            }
        };
        if value.is_null() {
            out.push_str(&doc);
            continue;
        }
        index += 1;
        if !value.is_object() {
            problems.push(format!(
                "{file}:{line}: document {index}: not a Kubernetes object (a map with apiVersion and kind)"
            ));
            continue;
        }
        let object = describe(&value);
        match inject_object(&mut value, template) {
            Ok(objects) => {
                let changed = objects.iter().any(|o| o.outcome.changed());
                reports.extend(objects.into_iter().map(|object| DocumentReport {
                    document: index,
                    line,
                    object,
                }));
                if !changed {
                    out.push_str(&doc);
                    continue;
                }
                match serde_norway::to_string(&value) {
                    Ok(yaml) => out.push_str(&yaml),
                    Err(e) => problems.push(format!(
                        "{file}:{line}: document {index} ({object}): cannot write it: {e}"
                    )),
                }
            }
            Err(e) => problems.extend(
                e.into_iter()
                    .map(|e| format!("{file}:{line}: document {index} ({object}): {e}")),
            ),
        }
    }
    if !problems.is_empty() {
        return Err(InjectError { problems });
    }
    if index == 0 {
        return Err(InjectError {
            problems: vec![format!("{file}: no objects in it")],
        });
    }
    Ok(Injected { text: out, reports })
}
