//! RFC 6902 JSON Patch from two JSON values: the webhook's answer is the difference between
//! the pod it was sent and the pod the injection library made of it, so the patch can never
//! disagree with `muonctl inject`.
//!
//! Objects are compared member by member; arrays keep their common prefix and suffix and
//! patch the middle (element by element, then adds or removes), so prepending containers is
//! a few `add`s, not a rewrite of the list. Pointers escape `~` and `/` (RFC 6901 §3).

use serde_json::{json, Value};

/// One reference token of a JSON Pointer (RFC 6901 §3: `~` → `~0`, then `/` → `~1`).
pub fn escape_token(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// The operations that turn `from` into `to`, in order (RFC 6902: each applies to the result
/// of the ones before it).
pub fn diff(from: &Value, to: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    walk(from, to, &mut String::new(), &mut ops);
    ops
}

fn walk(from: &Value, to: &Value, path: &mut String, ops: &mut Vec<Value>) {
    if from == to {
        return;
    }
    match (from, to) {
        (Value::Object(a), Value::Object(b)) => {
            for key in a.keys().filter(|k| !b.contains_key(*k)) {
                ops.push(json!({"op": "remove", "path": format!("{path}/{}", escape_token(key))}));
            }
            for (key, new) in b {
                let len = path.len();
                path.push('/');
                path.push_str(&escape_token(key));
                match a.get(key) {
                    Some(old) => walk(old, new, path, ops),
                    None => ops.push(json!({"op": "add", "path": path.clone(), "value": new})),
                }
                path.truncate(len);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
            let room = a.len().min(b.len()) - prefix;
            let suffix = a
                .iter()
                .rev()
                .zip(b.iter().rev())
                .take(room)
                .take_while(|(x, y)| x == y)
                .count();
            let (old, new) = (&a[prefix..a.len() - suffix], &b[prefix..b.len() - suffix]);
            let common = old.len().min(new.len());
            for i in 0..common {
                let len = path.len();
                path.push_str(&format!("/{}", prefix + i));
                walk(&old[i], &new[i], path, ops);
                path.truncate(len);
            }
            for (i, value) in new.iter().enumerate().skip(common) {
                ops.push(
                    json!({"op": "add", "path": format!("{path}/{}", prefix + i), "value": value}),
                );
            }
            // Each removal shifts the rest left: the same index, as many times as needed.
            for _ in common..old.len() {
                ops.push(json!({"op": "remove", "path": format!("{path}/{}", prefix + common)}));
            }
        }
        _ => ops.push(json!({"op": "replace", "path": path.clone(), "value": to})),
    }
}

/// Applies `ops` (as [`diff`] makes them: add, remove, replace) to `doc`. For tests of the
/// patch against the library, and as a reference; the webhook's own tests apply its patches
/// with an independent implementation.
pub fn apply(doc: &Value, ops: &[Value]) -> Result<Value, String> {
    let mut doc = doc.clone();
    for op in ops {
        let path = op["path"].as_str().ok_or("an operation without a path")?;
        let tokens: Vec<String> = match path {
            "" => Vec::new(),
            p => p
                .strip_prefix('/')
                .ok_or_else(|| format!("{p:?} is not a JSON pointer"))?
                .split('/')
                .map(|t| t.replace("~1", "/").replace("~0", "~"))
                .collect(),
        };
        let kind = op["op"].as_str().unwrap_or_default();
        let Some((last, parents)) = tokens.split_last() else {
            match kind {
                "replace" | "add" => doc = op["value"].clone(),
                _ => return Err(format!("cannot {kind} the whole document")),
            }
            continue;
        };
        let mut at = &mut doc;
        for t in parents {
            at = match at {
                Value::Object(m) => m.get_mut(t),
                Value::Array(a) => t.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
                _ => None,
            }
            .ok_or_else(|| format!("{path}: no {t:?} on the way"))?;
        }
        let bad = || format!("{path}: cannot {kind} here");
        match (at, kind) {
            (Value::Object(m), "add" | "replace") => {
                if kind == "replace" && !m.contains_key(last) {
                    return Err(bad());
                }
                m.insert(last.clone(), op["value"].clone());
            }
            (Value::Object(m), "remove") => {
                m.remove(last).ok_or_else(bad)?;
            }
            (Value::Array(a), _) => {
                let i = match last.as_str() {
                    "-" if kind == "add" => a.len(),
                    t => t.parse::<usize>().map_err(|_| bad())?,
                };
                match kind {
                    "add" if i <= a.len() => a.insert(i, op["value"].clone()),
                    "replace" if i < a.len() => a[i] = op["value"].clone(),
                    "remove" if i < a.len() => {
                        a.remove(i);
                    }
                    _ => return Err(bad()),
                }
            }
            _ => return Err(bad()),
        }
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(from: Value, to: Value) -> Vec<Value> {
        let ops = diff(&from, &to);
        assert_eq!(apply(&from, &ops).unwrap(), to, "ops: {ops:#?}");
        ops
    }

    #[test]
    fn pointers_escape_tilde_before_slash() {
        assert_eq!(escape_token("muon.io/status"), "muon.io~1status");
        assert_eq!(escape_token("a~/b"), "a~0~1b");
        assert_eq!(escape_token("~1"), "~01");
        let ops = round_trip(
            json!({"metadata": {"annotations": {"x": "1"}}}),
            json!({"metadata": {"annotations": {"x": "1", "muon.io/status": "{}", "a~b": "2"}}}),
        );
        let paths: Vec<&str> = ops.iter().map(|o| o["path"].as_str().unwrap()).collect();
        assert_eq!(
            paths,
            [
                "/metadata/annotations/a~0b",
                "/metadata/annotations/muon.io~1status"
            ]
        );
    }

    #[test]
    fn equal_values_need_no_operation() {
        let v = json!({"a": [1, {"b": null}], "c": "d"});
        assert!(diff(&v, &v).is_empty());
    }

    #[test]
    fn prepending_to_a_list_is_adds_at_its_head() {
        let ops = round_trip(
            json!({"l": [{"name": "app"}]}),
            json!({"l": [{"name": "muon-init"}, {"name": "muon-proxy"}, {"name": "app"}]}),
        );
        assert_eq!(
            ops,
            [
                json!({"op": "add", "path": "/l/0", "value": {"name": "muon-init"}}),
                json!({"op": "add", "path": "/l/1", "value": {"name": "muon-proxy"}}),
            ]
        );
    }

    #[test]
    fn a_missing_member_is_added_whole() {
        let ops = round_trip(
            json!({"spec": {}}),
            json!({"spec": {"volumes": [{"name": "v"}]}}),
        );
        assert_eq!(
            ops,
            [json!({"op": "add", "path": "/spec/volumes", "value": [{"name": "v"}]})]
        );
    }

    #[test]
    fn lists_shrink_grow_and_change_in_the_middle() {
        round_trip(json!([1, 2, 3, 4, 5]), json!([1, 5]));
        round_trip(json!([1, 2, 3]), json!([0, 1, 2, 3, 4]));
        round_trip(json!([1, 2, 3]), json!([1, {"x": 2}, 9, 9, 3]));
        round_trip(json!([1, 1, 1]), json!([1, 1]));
        round_trip(json!([]), json!([1]));
        round_trip(json!([1]), json!([]));
        round_trip(json!([[1, 2], 3]), json!([[1, 3], 3]));
    }

    #[test]
    fn types_and_members_are_replaced_and_removed() {
        round_trip(json!({"a": 1, "b": 2}), json!({"a": "1"}));
        round_trip(json!({"a": {"b": 1}}), json!({"a": [1]}));
        round_trip(json!(1), json!({"a": 1}));
        round_trip(json!({"": {"/": 1}}), json!({"": {"/": 2, "~": 3}}));
    }
}
