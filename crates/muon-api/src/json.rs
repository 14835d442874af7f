//! `google.protobuf.Struct` ⇄ JSON, for object specs in the management API.

use prost_types::{value::Kind, ListValue, Struct, Value};
use serde_json::Value as Json;

/// A JSON object as a `Struct`; `None` when `json` is not an object.
pub fn struct_from_json(json: &Json) -> Option<Struct> {
    match json {
        Json::Object(map) => Some(Struct {
            fields: map
                .iter()
                .map(|(k, v)| (k.clone(), value_from_json(v)))
                .collect(),
        }),
        _ => None,
    }
}

pub fn json_from_struct(s: &Struct) -> Json {
    Json::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), json_from_value(v)))
            .collect(),
    )
}

pub fn value_from_json(json: &Json) -> Value {
    let kind = match json {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        // Protobuf's Value has only doubles; integers up to 2^53 survive exactly, which covers
        // every port, weight and timeout a spec holds.
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(value_from_json).collect(),
        }),
        Json::Object(_) => Kind::StructValue(struct_from_json(json).unwrap_or_default()),
    };
    Value { kind: Some(kind) }
}

pub fn json_from_value(v: &Value) -> Json {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            // Whole numbers come back as integers, so `port: 8080` stays 8080, not 8080.0.
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                Json::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n)
                    .map(Json::Number)
                    .unwrap_or(Json::Null)
            }
        }
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::ListValue(l)) => Json::Array(l.values.iter().map(json_from_value).collect()),
        Some(Kind::StructValue(s)) => json_from_struct(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_with_integers_intact() {
        let spec = serde_json::json!({
            "ports": [{"port": 8080, "protocol": "http"}],
            "selector": {"app": "web"},
            "weight": 0.5,
            "enabled": true,
            "nothing": null
        });
        let s = struct_from_json(&spec).unwrap();
        assert_eq!(json_from_struct(&s), spec);
    }

    #[test]
    fn only_objects_become_structs() {
        assert!(struct_from_json(&serde_json::json!([1, 2])).is_none());
    }
}
