//! Security policies, in the shape users know from Istio's `security.istio.io` resources:
//! `AuthorizationPolicy` (who may call what) and `PeerAuthentication` (whether a workload's
//! ports accept plaintext), both `muon.io/v1alpha1`.
//!
//! ```yaml
//! kind: AuthorizationPolicy
//! spec:
//!   selector: {matchLabels: {app: payment}}     # absent: every workload of the namespace
//!   action: ALLOW                               # ALLOW | DENY (default ALLOW)
//!   rules:
//!     - from: [{source: {principals: ["cluster.local/ns/shop/sa/orders"]}}]
//!       to: [{operation: {ports: ["9090"], methods: ["POST"], paths: ["/charge"]}}]
//! ---
//! kind: PeerAuthentication
//! spec:
//!   selector: {matchLabels: {app: payment}}     # absent: the whole namespace
//!   mtls: {mode: STRICT}                        # STRICT | PERMISSIVE (absent: inherit)
//!   portLevelMtls: {"9090": {mode: PERMISSIVE}}
//! ```
//!
//! The value checks here ([`principal_match`], [`namespace_match`], [`path_match`],
//! [`check_method`], [`port_number`], [`MtlsMode::parse`], [`Action::parse`]) are the ones
//! both ends use: the control plane refuses at apply time what a sidecar could not use, and a
//! sidecar compiles what it receives with the same functions, so what one accepts, the other
//! accepts. [`StringMatch`] is what they compile to.

use super::Check;
use crate::identity::SpiffeId;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::fmt;

// ---------------------------------------------------------------------------------------------
// Values both ends check

/// A string pattern: exact, or with one `*` as its first or last character (`*` alone
/// matches anything), as Istio's policies write them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StringMatch {
    Exact(String),
    /// `value*`.
    Prefix(String),
    /// `*value`.
    Suffix(String),
    /// `*`.
    Any,
}

impl StringMatch {
    pub fn matches(&self, s: &str) -> bool {
        match self {
            StringMatch::Exact(v) => s == v,
            StringMatch::Prefix(p) => s.starts_with(p.as_str()),
            StringMatch::Suffix(x) => s.ends_with(x.as_str()),
            StringMatch::Any => true,
        }
    }

    /// Splits off the wildcard; `exact` checks a pattern without one, `part` what is left
    /// beside a wildcard.
    fn parse(
        s: &str,
        exact: impl Fn(&str) -> Result<(), String>,
        part: impl Fn(&str) -> Result<(), String>,
    ) -> Result<StringMatch, String> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s == "*" {
            return Ok(StringMatch::Any);
        }
        let stars = s.bytes().filter(|&b| b == b'*').count();
        let one_end = "a wildcard `*` may appear once, as the first or the last character";
        let m = match (s.strip_prefix('*'), s.strip_suffix('*')) {
            _ if stars > 1 => return Err(format!("{s:?}: {one_end}")),
            (Some(rest), _) => StringMatch::Suffix(rest.to_owned()),
            (_, Some(rest)) => StringMatch::Prefix(rest.to_owned()),
            _ if stars == 1 => return Err(format!("{s:?}: {one_end}")),
            _ => StringMatch::Exact(s.to_owned()),
        };
        match &m {
            StringMatch::Exact(v) => exact(v)?,
            StringMatch::Prefix(v) | StringMatch::Suffix(v) => part(v)?,
            StringMatch::Any => {}
        }
        Ok(m)
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Exact(v) => f.write_str(v),
            StringMatch::Prefix(v) => write!(f, "{v}*"),
            StringMatch::Suffix(v) => write!(f, "*{v}"),
            StringMatch::Any => f.write_str("*"),
        }
    }
}

/// A principal as policies name it: `spiffe://` taken off (both forms are accepted).
pub fn normalize_principal(s: &str) -> &str {
    s.strip_prefix("spiffe://").unwrap_or(s)
}

/// A principal pattern: `<trust-domain>/ns/<namespace>/sa/<service-account>` (or its
/// `spiffe://` form), `*` as a prefix or suffix wildcard, or `*` alone (any peer with an
/// identity).
pub fn principal_match(s: &str) -> Result<StringMatch, String> {
    let p = normalize_principal(s);
    StringMatch::parse(
        p,
        |v| {
            SpiffeId::parse(v).map(drop).map_err(|_| {
                format!(
                    "{s:?} is not a principal like cluster.local/ns/shop/sa/orders \
                     (<trust-domain>/ns/<namespace>/sa/<service-account>)"
                )
            })
        },
        |v| match v
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-./".contains(&b))
        {
            true => Ok(()),
            false => Err(format!(
                "{s:?}: besides the wildcard, a principal has only lowercase letters, digits, \
                 '-', '.' and '/'"
            )),
        },
    )
}

/// A namespace pattern: a namespace name, `*` as a prefix or suffix wildcard, or `*` alone.
pub fn namespace_match(s: &str) -> Result<StringMatch, String> {
    StringMatch::parse(s, super::check_dns_label, |v| {
        match v
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            true => Ok(()),
            false => Err(format!(
                "{s:?}: besides the wildcard, a namespace has only lowercase letters, digits \
                 and '-'"
            )),
        }
    })
}

/// A path pattern: exact (`/charge`), `*` as a prefix or suffix wildcard (`/api/*`,
/// `*/info`), or `*` alone. Paths are matched without the query, after the proxy's
/// normalisation.
pub fn path_match(s: &str) -> Result<StringMatch, String> {
    if !s.starts_with('/') && !s.starts_with('*') {
        return Err(format!(
            "{s:?} must start with '/' (or be a `*` suffix pattern)"
        ));
    }
    if s.contains(['?', '#']) {
        return Err(format!(
            "{s:?}: paths are matched without the query or fragment; leave out what follows '?'"
        ));
    }
    if s.bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(format!("{s:?}: a path has no spaces or control characters"));
    }
    StringMatch::parse(s, |_| Ok(()), |_| Ok(()))
}

/// An HTTP method as policies name it: an uppercase token (`GET`, `POST`, `PURGE`); methods
/// are case-sensitive (RFC 9110 §9.1), so `get` would never match.
pub fn check_method(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(format!(
            "{s:?}: methods are case-sensitive; write it in uppercase ({:?})",
            s.to_ascii_uppercase()
        ));
    }
    let token = s
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b"!#$%&'+-.^_`|~".contains(&b));
    match token {
        true => Ok(()),
        false => Err(format!(
            "{s:?} is not an HTTP method (an uppercase token like GET or POST; no wildcards)"
        )),
    }
}

/// A port number from 1 to 65535.
pub fn port_number(n: u64) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("must be a port number from 1 to 65535, got {n}"))
}

/// A port as users write it in a policy: a number, or a string holding one (`"9090"`, as
/// Istio writes them).
pub fn port_value(v: &Json) -> Result<u16, String> {
    match v {
        Json::Number(n) => match n.as_u64() {
            Some(n) => port_number(n),
            None => Err(format!("must be a port number from 1 to 65535, got {n}")),
        },
        Json::String(s) => match s.trim().parse::<u64>() {
            Ok(n) if s.trim() == s => port_number(n),
            _ => Err(format!(
                "{s:?} is not a port number (from 1 to 65535, like \"9090\")"
            )),
        },
        other => Err(format!(
            "must be a port number from 1 to 65535 (like 9090 or \"9090\"), got {other}"
        )),
    }
}

/// What an authorization policy does with what it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn parse(s: &str) -> Result<Action, String> {
        match s {
            "ALLOW" => Ok(Action::Allow),
            "DENY" => Ok(Action::Deny),
            "AUDIT" | "CUSTOM" => Err(format!("{s} is not supported; expected ALLOW or DENY")),
            other => Err(format!(
                "{other:?} is not an action; expected ALLOW or DENY"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
        }
    }
}

/// Whether a workload's port accepts plaintext from outside the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MtlsMode {
    /// Inherit: the next less specific policy decides (in the end, PERMISSIVE).
    #[default]
    Unset,
    /// mTLS from sidecars, plaintext from anyone else.
    Permissive,
    /// mTLS only: plaintext is refused.
    Strict,
}

impl MtlsMode {
    pub fn parse(s: &str) -> Result<MtlsMode, String> {
        match s {
            "UNSET" => Ok(MtlsMode::Unset),
            "PERMISSIVE" => Ok(MtlsMode::Permissive),
            "STRICT" => Ok(MtlsMode::Strict),
            "DISABLE" => Err(
                "DISABLE is not supported: sidecars always accept mTLS from each other; \
                 PERMISSIVE accepts plaintext too"
                    .into(),
            ),
            other => Err(format!(
                "{other:?} is not a mode; expected STRICT, PERMISSIVE or UNSET"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Unset => "UNSET",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The objects

/// Which workloads of the policy's namespace it applies to: those whose labels include every
/// one of `matchLabels`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Absent: every workload of the namespace (in the root namespace `muon-system`: of the
    /// whole mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// `ALLOW` (the default) or `DENY`.
    #[serde(default = "default_action")]
    pub action: String,
    /// A request matches the policy when it matches any rule. None: the policy matches
    /// nothing (an ALLOW policy without rules allows nothing).
    #[serde(default)]
    pub rules: Vec<AuthorizationRule>,
}

fn default_action() -> String {
    Action::Allow.as_str().to_string()
}

impl AuthorizationPolicySpec {
    /// The action (valid once the object is validated).
    pub fn action(&self) -> Action {
        Action::parse(&self.action).unwrap_or(Action::Allow)
    }
}

/// Matches when any `from` and any `to` entry match; an absent or empty list matches
/// everything.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<RuleFrom>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<RuleTo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    pub operation: Operation,
}

/// Who calls: every non-empty field must match.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
}

/// What is called: every non-empty field must match.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// Workload ports (numbers or strings holding one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::ports"))]
    pub ports: Vec<Json>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::ports"))]
    pub not_ports: Vec<Json>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

impl Operation {
    /// `ports` as numbers (valid once the object is validated).
    pub fn port_numbers(&self) -> Vec<u16> {
        self.ports
            .iter()
            .filter_map(|p| port_value(p).ok())
            .collect()
    }

    pub fn not_port_numbers(&self) -> Vec<u16> {
        self.not_ports
            .iter()
            .filter_map(|p| port_value(p).ok())
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Absent: the whole namespace (in the root namespace `muon-system`: the whole mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Absent: inherit from the less specific policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsSpec>,
    /// By workload port (a number as a string, as JSON keys are): overrides `mtls` there.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<String, MtlsSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtlsSpec {
    /// `STRICT`, `PERMISSIVE` or `UNSET` (absent: `UNSET`, inherit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

impl MtlsSpec {
    /// The mode (valid once the object is validated).
    pub fn mode(&self) -> MtlsMode {
        self.mode
            .as_deref()
            .and_then(|m| MtlsMode::parse(m).ok())
            .unwrap_or_default()
    }
}

impl PeerAuthenticationSpec {
    /// The policy's own mode.
    pub fn mode(&self) -> MtlsMode {
        self.mtls.as_ref().map(MtlsSpec::mode).unwrap_or_default()
    }

    /// The port-level modes (valid once the object is validated).
    pub fn port_modes(&self) -> Vec<(u16, MtlsMode)> {
        self.port_level_mtls
            .iter()
            .filter_map(|(k, m)| Some((port_value(&Json::String(k.clone())).ok()?, m.mode())))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Validation

fn validate_selector(check: &mut Check<'_>, selector: Option<&WorkloadSelector>) {
    let Some(s) = selector else { return };
    if s.match_labels.is_empty() {
        check.fail(
            "spec.selector.matchLabels",
            "must name at least one label; leave `selector` out to select every workload of \
             the namespace",
        );
    }
    check.labels("spec.selector.matchLabels", &s.match_labels);
}

fn each(
    check: &mut Check<'_>,
    field: &str,
    values: &[String],
    parse: impl Fn(&str) -> Result<(), String>,
) {
    for (i, v) in values.iter().enumerate() {
        if let Err(reason) = parse(v) {
            check.fail(format!("{field}[{i}]"), reason);
        }
    }
}

fn ports(check: &mut Check<'_>, field: &str, values: &[Json]) {
    for (i, v) in values.iter().enumerate() {
        if let Err(reason) = port_value(v) {
            check.fail(format!("{field}[{i}]"), reason);
        }
    }
}

pub(super) fn validate_authorization(check: &mut Check<'_>, p: &AuthorizationPolicySpec) {
    validate_selector(check, p.selector.as_ref());
    if let Err(reason) = Action::parse(&p.action) {
        check.fail("spec.action", reason);
    }
    for (r, rule) in p.rules.iter().enumerate() {
        for (i, from) in rule.from.iter().enumerate() {
            let field = format!("spec.rules[{r}].from[{i}].source");
            let s = &from.source;
            if s == &Source::default() {
                check.fail(
                    &field,
                    "must name at least one of principals, notPrincipals, namespaces, \
                     notNamespaces; leave `from` out to match every source",
                );
            }
            let principal = |v: &str| principal_match(v).map(drop);
            let namespace = |v: &str| namespace_match(v).map(drop);
            each(
                check,
                &format!("{field}.principals"),
                &s.principals,
                principal,
            );
            each(
                check,
                &format!("{field}.notPrincipals"),
                &s.not_principals,
                principal,
            );
            each(
                check,
                &format!("{field}.namespaces"),
                &s.namespaces,
                namespace,
            );
            each(
                check,
                &format!("{field}.notNamespaces"),
                &s.not_namespaces,
                namespace,
            );
        }
        for (i, to) in rule.to.iter().enumerate() {
            let field = format!("spec.rules[{r}].to[{i}].operation");
            let o = &to.operation;
            if o == &Operation::default() {
                check.fail(
                    &field,
                    "must name at least one of ports, notPorts, methods, notMethods, paths, \
                     notPaths; leave `to` out to match every operation",
                );
            }
            ports(check, &format!("{field}.ports"), &o.ports);
            ports(check, &format!("{field}.notPorts"), &o.not_ports);
            each(check, &format!("{field}.methods"), &o.methods, check_method);
            each(
                check,
                &format!("{field}.notMethods"),
                &o.not_methods,
                check_method,
            );
            let path = |v: &str| path_match(v).map(drop);
            each(check, &format!("{field}.paths"), &o.paths, path);
            each(check, &format!("{field}.notPaths"), &o.not_paths, path);
        }
    }
}

pub(super) fn validate_peer_authentication(check: &mut Check<'_>, p: &PeerAuthenticationSpec) {
    validate_selector(check, p.selector.as_ref());
    let mode = |check: &mut Check<'_>, field: String, m: &MtlsSpec| {
        if let Some(Err(reason)) = m.mode.as_deref().map(MtlsMode::parse) {
            check.fail(field, reason);
        }
    };
    if let Some(m) = &p.mtls {
        mode(check, "spec.mtls.mode".into(), m);
    }
    for (port, m) in &p.port_level_mtls {
        let field = format!("spec.portLevelMtls[{port:?}]");
        if let Err(reason) = port_value(&Json::String(port.clone())) {
            check.fail(&field, format!("the key: {reason}"));
        }
        mode(check, format!("{field}.mode"), m);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Kind, Object, Spec};
    use super::*;
    use serde_json::json;

    fn parse(v: Json) -> Result<Object, String> {
        Object::from_json(&v, 0).map_err(|e| e.to_string())
    }

    fn authz(spec: Json) -> Json {
        json!({
            "apiVersion": "muon.io/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "payment-callers", "namespace": "shop"},
            "spec": spec,
        })
    }

    fn peer_authn(spec: Json) -> Json {
        json!({
            "apiVersion": "muon.io/v1alpha1", "kind": "PeerAuthentication",
            "metadata": {"name": "strict", "namespace": "shop"},
            "spec": spec,
        })
    }

    #[test]
    fn the_issues_authorization_policy_parses_with_its_defaults_and_round_trips() {
        let o = parse(authz(json!({
            "selector": {"matchLabels": {"app": "payment"}},
            "rules": [{
                "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/orders"]}}],
                "to": [{"operation": {"ports": ["9090", 8080], "methods": ["POST"],
                                      "paths": ["/charge", "/api/*"]}}],
            }],
        })))
        .unwrap();
        assert_eq!(o.kind(), Kind::AuthorizationPolicy);
        let Spec::AuthorizationPolicy(p) = &o.spec else {
            panic!("not an authorization policy")
        };
        assert_eq!(p.action(), Action::Allow);
        assert_eq!(o.to_json()["spec"]["action"], "ALLOW");
        assert_eq!(p.rules[0].to[0].operation.port_numbers(), [9090, 8080]);
        assert_eq!(parse(o.to_json()).unwrap(), o);
        // No rules at all is valid (an ALLOW policy that allows nothing), and so is a rule
        // that matches everything.
        for spec in [json!({}), json!({"action": "DENY", "rules": [{}]})] {
            parse(authz(spec)).unwrap();
        }
    }

    #[test]
    fn every_authorization_problem_is_named_with_its_field() {
        let err = parse(authz(json!({
            "selector": {"matchLabels": {}},
            "action": "AUDIT",
            "rules": [{
                "from": [
                    {"source": {"principals": ["cluster.local/ns/shop/sa/*", "*/sa/orders",
                                               "spiffe://cluster.local/ns/shop/sa/orders",
                                               "orders", "cluster.*.local", "*a*"],
                                "namespaces": ["shop-*", "Shop"],
                                "notNamespaces": ["*"]}},
                    {"source": {}},
                ],
                "to": [
                    {"operation": {"ports": [0, "70000", "http", true, "9090"],
                                   "notPorts": ["8080"],
                                   "methods": ["GET", "get", "G T", "*"],
                                   "paths": ["/ok", "/api/*", "*/info", "*", "api", "/a?b=1",
                                             "/a*b"]}},
                    {"operation": {}},
                ],
            }],
        })))
        .unwrap_err();
        let want = [
            "AuthorizationPolicy shop/payment-callers: spec.selector.matchLabels: must name at least one label",
            "spec.action: AUDIT is not supported; expected ALLOW or DENY",
            "spec.rules[0].from[0].source.principals[3]: \"orders\" is not a principal like",
            "spec.rules[0].from[0].source.principals[4]: \"cluster.*.local\": a wildcard",
            "spec.rules[0].from[0].source.principals[5]: \"*a*\": a wildcard",
            "spec.rules[0].from[0].source.namespaces[1]: \"Shop\" is not a DNS-1123 label",
            "spec.rules[0].from[1].source: must name at least one of principals",
            "spec.rules[0].to[0].operation.ports[0]: must be a port number from 1 to 65535, got 0",
            "spec.rules[0].to[0].operation.ports[1]: must be a port number from 1 to 65535, got 70000",
            "spec.rules[0].to[0].operation.ports[2]: \"http\" is not a port number",
            "spec.rules[0].to[0].operation.ports[3]: must be a port number from 1 to 65535 (like 9090 or \"9090\"), got true",
            "spec.rules[0].to[0].operation.methods[1]: \"get\": methods are case-sensitive; write it in uppercase (\"GET\")",
            "spec.rules[0].to[0].operation.methods[2]: \"G T\" is not an HTTP method",
            "spec.rules[0].to[0].operation.methods[3]: \"*\" is not an HTTP method",
            "spec.rules[0].to[0].operation.paths[4]: \"api\" must start with '/'",
            "spec.rules[0].to[0].operation.paths[5]: \"/a?b=1\": paths are matched without the query",
            "spec.rules[0].to[0].operation.paths[6]: \"/a*b\": a wildcard",
            "spec.rules[0].to[1].operation: must name at least one of ports",
        ];
        for w in want {
            assert!(err.contains(w), "{w}\nmissing from\n{err}");
        }
        assert_eq!(err.lines().count(), want.len(), "{err}");
    }

    #[test]
    fn unknown_istio_fields_are_refused_by_name() {
        let err = parse(authz(
            json!({"rules": [{"when": [{"key": "request.headers[x]"}]}]}),
        ))
        .unwrap_err();
        assert!(err.contains("spec: unknown field `when`"), "{err}");
        let err = parse(authz(
            json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/8"]}}]}]}),
        ))
        .unwrap_err();
        assert!(err.contains("unknown field `ipBlocks`"), "{err}");
    }

    #[test]
    fn patterns_match_exactly_by_prefix_by_suffix_or_anything() {
        let p = |s: &str| principal_match(s).unwrap();
        assert_eq!(
            p("spiffe://cluster.local/ns/shop/sa/orders"),
            StringMatch::Exact("cluster.local/ns/shop/sa/orders".into())
        );
        assert!(p("cluster.local/ns/shop/sa/*").matches("cluster.local/ns/shop/sa/orders"));
        assert!(!p("cluster.local/ns/shop/sa/*").matches("cluster.local/ns/shopx/sa/orders"));
        assert!(p("*/sa/orders").matches("other.domain/ns/x/sa/orders"));
        assert!(!p("*/sa/orders").matches("cluster.local/ns/x/sa/orders-2"));
        assert!(p("*").matches("anything"));
        assert_eq!(
            p("cluster.local/ns/shop/sa/*").to_string(),
            "cluster.local/ns/shop/sa/*"
        );
        let ns = |s: &str| namespace_match(s).unwrap();
        assert!(ns("shop-*").matches("shop-eu"));
        assert!(!ns("shop-*").matches("shop"));
        assert!(ns("*-prod").matches("pay-prod"));
        let path = |s: &str| path_match(s).unwrap();
        assert!(path("/api/*").matches("/api/v1"));
        assert!(!path("/api/*").matches("/api"));
        assert!(path("*/info").matches("/x/info"));
        assert!(path("/charge").matches("/charge"));
        assert!(!path("/charge").matches("/charge/"));
    }

    #[test]
    fn the_issues_peer_authentication_parses_and_its_modes_are_checked() {
        let o = parse(peer_authn(json!({
            "selector": {"matchLabels": {"app": "payment"}},
            "mtls": {"mode": "STRICT"},
            "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}},
        })))
        .unwrap();
        let Spec::PeerAuthentication(p) = &o.spec else {
            panic!("not a peer authentication")
        };
        assert_eq!(p.mode(), MtlsMode::Strict);
        assert_eq!(p.port_modes(), [(9090, MtlsMode::Permissive)]);
        assert_eq!(parse(o.to_json()).unwrap(), o);
        // Nothing at all: inherit everywhere.
        let o = parse(peer_authn(json!({}))).unwrap();
        let Spec::PeerAuthentication(p) = &o.spec else {
            panic!()
        };
        assert_eq!(p.mode(), MtlsMode::Unset);

        let err = parse(peer_authn(json!({
            "mtls": {"mode": "DISABLE"},
            "portLevelMtls": {"0": {"mode": "STRICT"}, "http": {}, "8080": {"mode": "strict"}},
        })))
        .unwrap_err();
        for w in [
            "PeerAuthentication shop/strict: spec.mtls.mode: DISABLE is not supported",
            "spec.portLevelMtls[\"0\"]: the key: must be a port number from 1 to 65535, got 0",
            "spec.portLevelMtls[\"http\"]: the key: \"http\" is not a port number",
            "spec.portLevelMtls[\"8080\"].mode: \"strict\" is not a mode; expected STRICT, PERMISSIVE or UNSET",
        ] {
            assert!(err.contains(w), "{w}\nmissing from\n{err}");
        }
        assert_eq!(err.lines().count(), 4, "{err}");
    }
}
