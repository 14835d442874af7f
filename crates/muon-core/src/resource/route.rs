//! The Gateway API's routes, as Muon applies them: `HTTPRoute` and `GRPCRoute`
//! (`gateway.networking.k8s.io/v1`), attached to a Service (GAMMA mesh routing) or to a
//! `Gateway` (the edge).
//!
//! Field names, defaults and limits follow the Gateway API (`apis/v1/httproute_types.go`,
//! `grpcroute_types.go`). Validation is the one both ends use: the control plane refuses at
//! apply time what a sidecar could not use, and sidecars check with the same functions
//! ([`compile_regex`]), so what the control plane accepts, sidecars accept.

use super::{default_weight, is_header_name, parse_duration, Check, MAX_WEIGHT, METHODS};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::collections::BTreeSet;
use std::time::Duration;

/// The largest regular expression accepted (compiled size, bytes): a route is matched on
/// every request, so an expression may not cost more than this.
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// Compiles a route's regular expression (RE2-like syntax, as the Gateway API expects) for a
/// match on the whole value. The control plane and sidecars both use this, so an expression
/// one accepts, the other accepts.
pub fn compile_regex(re: &str) -> Result<regex::Regex, String> {
    if re.is_empty() {
        return Err("must not be empty".into());
    }
    regex::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| {
            let text = e.to_string();
            let last = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or(&text)
                .trim()
                .to_string();
            format!("invalid regular expression {re:?}: {last}")
        })
}

// ---------------------------------------------------------------------------------------------
// Shared by both route kinds

/// What a route attaches to: a Service (mesh) or a Gateway (edge).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentRef {
    pub name: String,
    /// Defaults to the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `Service` (the default here, as mesh routing is the common case) or `Gateway`.
    #[serde(default = "default_ref_kind")]
    pub kind: String,
    /// `""` (core) for a Service; `gateway.networking.k8s.io` (or `muon.io`) for a Gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Only this port of the Service (or listeners on this port of the Gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// A Gateway listener's name, or a Service port's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

fn default_ref_kind() -> String {
    "Service".to_string()
}

impl ParentRef {
    pub fn is_gateway(&self) -> bool {
        self.kind == "Gateway"
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    pub value: String,
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default = "default_exact", rename = "type")]
    pub kind: String,
}

fn default_exact() -> String {
    "Exact".to_string()
}

/// A Service a route sends requests to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The backend service's port; when absent, the port the request arrived on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// Share of the rule's requests: weight / sum of the rule's weights. 0: none.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Per-backend filters: recognised so that they are refused clearly (not supported yet).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Json>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifier {
    /// Replaces the header (or adds it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HeaderValue>,
    /// Appends a value to the header.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

/// `RequestMirror`: a copy of each request (or of a fraction) to another Service; its
/// answers are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMirror {
    pub backend_ref: BackendRef,
    /// 0–100; with `fraction`, at most one of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<Fraction>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fraction {
    pub numerator: u32,
    #[serde(default = "default_denominator")]
    pub denominator: u32,
}

fn default_denominator() -> u32 {
    100
}

impl RequestMirror {
    /// The share of requests mirrored, as numerator / denominator.
    pub fn share(&self) -> (u32, u32) {
        match (&self.fraction, self.percent) {
            (Some(f), _) => (f.numerator, f.denominator),
            (None, Some(p)) => (p, 100),
            (None, None) => (100, 100),
        }
    }
}

/// Checks that come with every route: its parents and hostnames.
fn validate_parents(check: &mut Check<'_>, parents: &[ParentRef], hostnames: &[String]) {
    if parents.is_empty() {
        check.fail(
            "spec.parentRefs",
            "needs at least one parent (the Service or Gateway the route attaches to)",
        );
    }
    for (i, p) in parents.iter().enumerate() {
        let field = format!("spec.parentRefs[{i}]");
        check.dns_label(&format!("{field}.name"), &p.name);
        if let Some(ns) = &p.namespace {
            check.dns_label(&format!("{field}.namespace"), ns);
        }
        let group = p.group.as_deref().unwrap_or_default();
        match p.kind.as_str() {
            "Service" => {
                if !group.is_empty() && group != "core" {
                    check.fail(
                        format!("{field}.group"),
                        format!("{group:?} is not the group of a Service; use \"\" (core)"),
                    );
                }
            }
            "Gateway" => {
                if !["", super::GATEWAY_API_GROUP, super::MUON_GROUP].contains(&group) {
                    check.fail(
                        format!("{field}.group"),
                        format!(
                            "{group:?} is not the group of a Gateway; use {:?} or {:?}",
                            super::GATEWAY_API_GROUP,
                            super::MUON_GROUP
                        ),
                    );
                }
            }
            other => check.fail(
                format!("{field}.kind"),
                format!(
                    "{other:?} is not supported; routes attach to a Service (mesh) or a Gateway"
                ),
            ),
        }
        if let Some(port) = p.port {
            check.port(&format!("{field}.port"), port);
        }
        if let Some(s) = &p.section_name {
            if let Err(reason) = super::check_dns_subdomain(s) {
                check.fail(format!("{field}.sectionName"), reason);
            }
        }
    }
    for (i, h) in hostnames.iter().enumerate() {
        let host = h.strip_prefix("*.").unwrap_or(h);
        if let Err(reason) = super::check_dns_subdomain(host) {
            check.fail(format!("spec.hostnames[{i}]"), reason);
        }
    }
}

fn validate_header_matches(check: &mut Check<'_>, field: &str, headers: &[HeaderMatch]) {
    let mut seen = BTreeSet::new();
    for (k, h) in headers.iter().enumerate() {
        let hf = format!("{field}[{k}]");
        if !is_header_name(&h.name) {
            check.fail(
                format!("{hf}.name"),
                format!("{:?} is not a valid header name", h.name),
            );
        } else if !seen.insert(h.name.to_ascii_lowercase()) {
            check.fail(
                format!("{hf}.name"),
                format!("{:?} is matched twice (names are case-insensitive)", h.name),
            );
        }
        match h.kind.as_str() {
            "Exact" => {}
            "RegularExpression" => {
                if let Err(reason) = compile_regex(&h.value) {
                    check.fail(format!("{hf}.value"), reason);
                }
            }
            other => check.fail(
                format!("{hf}.type"),
                format!("unknown match type {other:?}; expected Exact or RegularExpression"),
            ),
        }
    }
}

fn validate_backend(check: &mut Check<'_>, field: &str, b: &BackendRef) {
    check.dns_label(&format!("{field}.name"), &b.name);
    if let Some(ns) = &b.namespace {
        check.dns_label(&format!("{field}.namespace"), ns);
    }
    if let Some(kind) = &b.kind {
        if kind != "Service" {
            check.fail(
                format!("{field}.kind"),
                format!("{kind:?} is not supported; backends are Services"),
            );
        }
    }
    if let Some(g) = &b.group {
        if !g.is_empty() && g != "core" {
            check.fail(
                format!("{field}.group"),
                format!("{g:?} is not supported; use \"\" (the core group of Service)"),
            );
        }
    }
    if let Some(port) = b.port {
        check.port(&format!("{field}.port"), port);
    }
    if b.weight > MAX_WEIGHT {
        check.fail(
            format!("{field}.weight"),
            format!("must be at most {MAX_WEIGHT}, got {}", b.weight),
        );
    }
    if !b.filters.is_empty() {
        check.fail(
            format!("{field}.filters"),
            "filters on a backendRef are not supported yet; put them on the rule",
        );
    }
}

fn validate_header_modifier(check: &mut Check<'_>, field: &str, m: &HeaderModifier) {
    // "Only one action for a given header name is permitted."
    let mut names = BTreeSet::new();
    let mut one = |check: &mut Check<'_>, f: String, name: &str| {
        if !is_header_name(name) {
            check.fail(f, format!("{name:?} is not a valid header name"));
        } else if !names.insert(name.to_ascii_lowercase()) {
            check.fail(
                f,
                format!("{name:?} has more than one action (names are case-insensitive)"),
            );
        }
    };
    for (list, values) in [("set", &m.set), ("add", &m.add)] {
        for (k, hv) in values.iter().enumerate() {
            one(check, format!("{field}.{list}[{k}].name"), &hv.name);
            if hv.value.contains(['\r', '\n', '\0']) {
                check.fail(
                    format!("{field}.{list}[{k}].value"),
                    "must not contain CR, LF or NUL",
                );
            }
        }
    }
    for (k, name) in m.remove.iter().enumerate() {
        one(check, format!("{field}.remove[{k}]"), name);
    }
}

fn validate_mirror(check: &mut Check<'_>, field: &str, m: &RequestMirror) {
    validate_backend(check, &format!("{field}.backendRef"), &m.backend_ref);
    if m.backend_ref.weight != 1 {
        check.fail(
            format!("{field}.backendRef.weight"),
            "a mirror has no weight; use percent or fraction",
        );
    }
    match (m.percent, &m.fraction) {
        (Some(_), Some(_)) => check.fail(field, "set percent or fraction, not both"),
        (Some(p), None) if p > 100 => check.fail(
            format!("{field}.percent"),
            format!("must be 0–100, got {p}"),
        ),
        (None, Some(f)) if f.denominator == 0 || f.numerator > f.denominator => check.fail(
            format!("{field}.fraction"),
            format!(
                "needs 0 ≤ numerator ≤ denominator and denominator ≥ 1, got {}/{}",
                f.numerator, f.denominator
            ),
        ),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// HTTPRoute

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    /// Matched against the Host header at a Gateway; ignored for Service parents (GAMMA).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<RouteRule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any of them (none: every request).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    /// The Gateway API's `HTTPRouteRetry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<super::Retry>,
}

/// Every condition set must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<HeaderMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    /// `Exact`, `PathPrefix` (default) or `RegularExpression`.
    #[serde(default = "default_path_type", rename = "type")]
    pub kind: String,
    #[serde(default = "default_path_value")]
    pub value: String,
}

fn default_path_type() -> String {
    "PathPrefix".to_string()
}

fn default_path_value() -> String {
    "/".to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// For the whole request (every attempt): a Gateway API duration (`10s`, `500ms`,
    /// `1m30s`); `0s` disables it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// For each request to a backend; at most `request`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<String>,
}

impl Timeouts {
    /// The request timeout (valid once the object is validated); `0s` is `None`.
    pub fn request(&self) -> Option<Duration> {
        nonzero(self.request.as_deref())
    }

    /// The per-backend-request timeout; `0s` is `None`.
    pub fn backend_request(&self) -> Option<Duration> {
        nonzero(self.backend_request.as_deref())
    }
}

fn nonzero(s: Option<&str>) -> Option<Duration> {
    s.and_then(|s| parse_duration(s).ok())
        .filter(|d| !d.is_zero())
}

/// A Gateway API filter; exactly the field its `type` names is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Filter {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<RequestMirror>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_rewrite: Option<UrlRewrite>,
    /// Recognised so that they are refused with a clear message rather than as "unknown
    /// field".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension_ref: Option<Json>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<Json>,
}

/// `RequestRedirect`: answer with a redirect instead of forwarding.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestRedirect {
    /// `http` or `https`; absent: the request's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// 301, 302 (default), 303, 307 or 308.
    #[serde(default = "default_redirect_status")]
    pub status_code: u32,
}

fn default_redirect_status() -> u32 {
    302
}

/// `URLRewrite`: change the host and path before forwarding.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathModifier {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

impl PathModifier {
    /// The replacement, whichever the type is.
    pub fn value(&self) -> &str {
        match self.kind.as_str() {
            "ReplaceFullPath" => self.replace_full_path.as_deref().unwrap_or_default(),
            _ => self.replace_prefix_match.as_deref().unwrap_or_default(),
        }
    }
}

const HTTP_FILTERS: [&str; 5] = [
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestRedirect",
    "URLRewrite",
    "RequestMirror",
];

pub(super) fn validate_http_route(check: &mut Check<'_>, r: &HttpRouteSpec) {
    validate_parents(check, &r.parent_refs, &r.hostnames);
    for (i, rule) in r.rules.iter().enumerate() {
        validate_http_rule(check, &format!("spec.rules[{i}]"), rule);
    }
}

fn validate_http_rule(check: &mut Check<'_>, field: &str, rule: &RouteRule) {
    if let Some(name) = &rule.name {
        check.dns_label(&format!("{field}.name"), name);
    }
    for (j, m) in rule.matches.iter().enumerate() {
        let mf = format!("{field}.matches[{j}]");
        if let Some(path) = &m.path {
            match path.kind.as_str() {
                "Exact" | "PathPrefix" => {
                    if let Err(reason) = check_path(&path.value) {
                        check.fail(format!("{mf}.path.value"), reason);
                    }
                }
                "RegularExpression" => {
                    if let Err(reason) = compile_regex(&path.value) {
                        check.fail(format!("{mf}.path.value"), reason);
                    }
                }
                other => check.fail(
                    format!("{mf}.path.type"),
                    format!("unknown path match type {other:?}; expected Exact, PathPrefix or RegularExpression"),
                ),
            }
        }
        if let Some(method) = &m.method {
            if !METHODS.contains(&method.as_str()) {
                check.fail(
                    format!("{mf}.method"),
                    format!(
                        "unknown method {method:?}; expected one of {}",
                        METHODS.join(", ")
                    ),
                );
            }
        }
        validate_header_matches(check, &format!("{mf}.headers"), &m.headers);
        validate_query_matches(check, &format!("{mf}.queryParams"), &m.query_params);
    }
    let redirect = rule.filters.iter().any(|f| f.kind == "RequestRedirect");
    if rule.backend_refs.is_empty() && !redirect {
        check.fail(
            format!("{field}.backendRefs"),
            "needs at least one backend (a rule without backends would answer every request with 500)",
        );
    }
    if !rule.backend_refs.is_empty() && redirect {
        check.fail(
            format!("{field}.backendRefs"),
            "must be empty when the rule has a RequestRedirect filter (the redirect is the answer)",
        );
    }
    for (j, b) in rule.backend_refs.iter().enumerate() {
        validate_backend(check, &format!("{field}.backendRefs[{j}]"), b);
    }
    if let Some(t) = &rule.timeouts {
        let mut parsed = [None, None];
        for (k, (name, value)) in [
            ("request", &t.request),
            ("backendRequest", &t.backend_request),
        ]
        .into_iter()
        .enumerate()
        {
            if let Some(v) = value {
                match parse_duration(v) {
                    Ok(d) => parsed[k] = Some(d),
                    Err(reason) => check.fail(format!("{field}.timeouts.{name}"), reason),
                }
            }
        }
        if let [Some(req), Some(backend)] = parsed {
            if !req.is_zero() && (backend > req || backend.is_zero()) {
                check.fail(
                    format!("{field}.timeouts.backendRequest"),
                    format!(
                        "must be at most timeouts.request ({}), got {}",
                        t.request.as_deref().unwrap_or_default(),
                        t.backend_request.as_deref().unwrap_or_default()
                    ),
                );
            }
        }
    }
    validate_filters(check, field, rule, &HTTP_FILTERS);
    if let Some(r) = &rule.retry {
        super::traffic::validate_retry(check, &format!("{field}.retry"), r);
    }
}

fn validate_query_matches(check: &mut Check<'_>, field: &str, params: &[HeaderMatch]) {
    let mut seen = BTreeSet::new();
    for (k, q) in params.iter().enumerate() {
        let qf = format!("{field}[{k}]");
        if q.name.is_empty() {
            check.fail(format!("{qf}.name"), "must not be empty");
        } else if !seen.insert(q.name.as_str()) {
            check.fail(
                format!("{qf}.name"),
                format!("{:?} is matched twice", q.name),
            );
        }
        match q.kind.as_str() {
            "Exact" => {}
            "RegularExpression" => {
                if let Err(reason) = compile_regex(&q.value) {
                    check.fail(format!("{qf}.value"), reason);
                }
            }
            other => check.fail(
                format!("{qf}.type"),
                format!("unknown match type {other:?}; expected Exact or RegularExpression"),
            ),
        }
    }
}

/// An `Exact` or `PathPrefix` value, as the Gateway API restricts it.
fn check_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("{p:?} must start with '/'"));
    }
    let bad = ["//", "/./", "/../", "%2f", "%2F", "#"];
    if bad.iter().any(|b| p.contains(b)) || p.ends_with("/..") || p.ends_with("/.") {
        return Err(format!(
            "{p:?} must not contain '//', '/./', '/../', '%2f' or '#', nor end in '/.' or '/..'"
        ));
    }
    Ok(())
}

/// The checks every filter list gets: known types, the right field set, no repeats where
/// the Gateway API forbids them, and compatible combinations.
fn validate_filters(check: &mut Check<'_>, field: &str, rule: &RouteRule, allowed: &[&str]) {
    let mut seen = BTreeSet::new();
    for (j, f) in rule.filters.iter().enumerate() {
        let ff = format!("{field}.filters[{j}]");
        if !allowed.contains(&f.kind.as_str()) {
            let why = match f.kind.as_str() {
                "ExtensionRef" | "CORS" | "ExternalAuth" => "is not supported yet",
                k if HTTP_FILTERS.contains(&k) => "does not apply to this kind of route",
                _ => "is not a filter type",
            };
            check.fail(
                format!("{ff}.type"),
                format!(
                    "filter {:?} {why}; supported: {}",
                    f.kind,
                    allowed.join(", ")
                ),
            );
            continue;
        }
        if f.kind != "RequestMirror" && !seen.insert(f.kind.as_str()) {
            check.fail(
                format!("{ff}.type"),
                format!("{} may appear only once per rule", f.kind),
            );
        }
        let fields = [
            (
                "RequestHeaderModifier",
                "requestHeaderModifier",
                f.request_header_modifier.is_some(),
            ),
            (
                "ResponseHeaderModifier",
                "responseHeaderModifier",
                f.response_header_modifier.is_some(),
            ),
            ("RequestMirror", "requestMirror", f.request_mirror.is_some()),
            (
                "RequestRedirect",
                "requestRedirect",
                f.request_redirect.is_some(),
            ),
            ("URLRewrite", "urlRewrite", f.url_rewrite.is_some()),
            ("ExtensionRef", "extensionRef", f.extension_ref.is_some()),
            ("CORS", "cors", f.cors.is_some()),
        ];
        for (kind, name, present) in fields {
            if kind == f.kind && !present {
                check.fail(
                    format!("{ff}.{name}"),
                    format!("is required when type is {kind}"),
                );
            }
            if kind != f.kind && present {
                check.fail(
                    format!("{ff}.{name}"),
                    format!("must not be set on a {} filter", f.kind),
                );
            }
        }
        if let Some(m) = &f.request_header_modifier {
            validate_header_modifier(check, &format!("{ff}.requestHeaderModifier"), m);
        }
        if let Some(m) = &f.response_header_modifier {
            validate_header_modifier(check, &format!("{ff}.responseHeaderModifier"), m);
        }
        if let Some(m) = &f.request_mirror {
            validate_mirror(check, &format!("{ff}.requestMirror"), m);
        }
        if let Some(r) = &f.request_redirect {
            let rf = format!("{ff}.requestRedirect");
            if let Some(s) = &r.scheme {
                if s != "http" && s != "https" {
                    check.fail(
                        format!("{rf}.scheme"),
                        format!("{s:?}: expected http or https"),
                    );
                }
            }
            if let Some(h) = &r.hostname {
                if let Err(reason) = super::check_dns_subdomain(h) {
                    check.fail(format!("{rf}.hostname"), reason);
                }
            }
            if let Some(p) = r.port {
                check.port(&format!("{rf}.port"), p);
            }
            if ![301, 302, 303, 307, 308].contains(&r.status_code) {
                check.fail(
                    format!("{rf}.statusCode"),
                    format!("{}: expected 301, 302, 303, 307 or 308", r.status_code),
                );
            }
            if let Some(p) = &r.path {
                validate_path_modifier(check, &format!("{rf}.path"), p, rule);
            }
        }
        if let Some(r) = &f.url_rewrite {
            let rf = format!("{ff}.urlRewrite");
            if let Some(h) = &r.hostname {
                if let Err(reason) = super::check_dns_subdomain(h) {
                    check.fail(format!("{rf}.hostname"), reason);
                }
            }
            if let Some(p) = &r.path {
                validate_path_modifier(check, &format!("{rf}.path"), p, rule);
            }
        }
    }
    if seen.contains("RequestRedirect") && seen.contains("URLRewrite") {
        check.fail(
            format!("{field}.filters"),
            "may have a RequestRedirect or a URLRewrite filter, not both",
        );
    }
}

fn validate_path_modifier(check: &mut Check<'_>, field: &str, p: &PathModifier, rule: &RouteRule) {
    match p.kind.as_str() {
        "ReplaceFullPath" => {
            if p.replace_prefix_match.is_some() {
                check.fail(
                    format!("{field}.replacePrefixMatch"),
                    "must not be set when type is ReplaceFullPath",
                );
            }
            match &p.replace_full_path {
                None => check.fail(
                    format!("{field}.replaceFullPath"),
                    "is required when type is ReplaceFullPath",
                ),
                Some(v) => {
                    if let Err(reason) = check_path(v) {
                        check.fail(format!("{field}.replaceFullPath"), reason);
                    }
                }
            }
        }
        "ReplacePrefixMatch" => {
            if p.replace_full_path.is_some() {
                check.fail(
                    format!("{field}.replaceFullPath"),
                    "must not be set when type is ReplacePrefixMatch",
                );
            }
            match &p.replace_prefix_match {
                None => check.fail(
                    format!("{field}.replacePrefixMatch"),
                    "is required when type is ReplacePrefixMatch",
                ),
                Some(v) if !v.is_empty() => {
                    if let Err(reason) = check_path(v) {
                        check.fail(format!("{field}.replacePrefixMatch"), reason);
                    }
                }
                Some(_) => {}
            }
            let one_prefix = matches!(rule.matches.as_slice(),
                [m] if m.path.as_ref().is_some_and(|p| p.kind == "PathPrefix"));
            if !one_prefix {
                check.fail(
                    format!("{field}.type"),
                    "ReplacePrefixMatch needs the rule to have exactly one match, a PathPrefix path",
                );
            }
        }
        other => check.fail(
            format!("{field}.type"),
            format!(
                "unknown path modifier {other:?}; expected ReplaceFullPath or ReplacePrefixMatch"
            ),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// GRPCRoute

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any of them (none: every call).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<GrpcRouteMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// As an HTTPRoute rule's `retry` (a Muon extension: GRPCRoute has none yet); 503 also
    /// retries `UNAVAILABLE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<super::Retry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
}

/// `/service/method`; a missing part matches any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMethodMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default = "default_exact", rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

const GRPC_FILTERS: [&str; 3] = [
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestMirror",
];

pub(super) fn validate_grpc_route(check: &mut Check<'_>, r: &GrpcRouteSpec) {
    validate_parents(check, &r.parent_refs, &r.hostnames);
    for (i, rule) in r.rules.iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        if let Some(name) = &rule.name {
            check.dns_label(&format!("{field}.name"), name);
        }
        for (j, m) in rule.matches.iter().enumerate() {
            let mf = format!("{field}.matches[{j}]");
            if let Some(method) = &m.method {
                validate_grpc_method(check, &format!("{mf}.method"), method);
            }
            validate_header_matches(check, &format!("{mf}.headers"), &m.headers);
        }
        if rule.backend_refs.is_empty() {
            check.fail(
                format!("{field}.backendRefs"),
                "needs at least one backend (a rule without backends would fail every call)",
            );
        }
        for (j, b) in rule.backend_refs.iter().enumerate() {
            validate_backend(check, &format!("{field}.backendRefs[{j}]"), b);
        }
        // The filter checks work on an HTTP rule's shape: only the filters matter here.
        let as_http = RouteRule {
            filters: rule.filters.clone(),
            ..Default::default()
        };
        validate_filters(check, &field, &as_http, &GRPC_FILTERS);
        if let Some(r) = &rule.retry {
            super::traffic::validate_retry(check, &format!("{field}.retry"), r);
        }
    }
}

fn validate_grpc_method(check: &mut Check<'_>, field: &str, m: &GrpcMethodMatch) {
    if m.service.is_none() && m.method.is_none() {
        check.fail(field, "needs a service, a method or both");
    }
    match m.kind.as_str() {
        "Exact" => {
            let service_ok = |s: &str| {
                let s = s.strip_prefix('.').unwrap_or(s);
                !s.is_empty()
                    && s.split('.').all(|part| {
                        part.chars()
                            .next()
                            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                            && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    })
            };
            if let Some(s) = &m.service {
                if !service_ok(s) {
                    check.fail(
                        format!("{field}.service"),
                        format!("{s:?} is not a gRPC service name like pkg.v1.Service"),
                    );
                }
            }
            if let Some(name) = &m.method {
                let ok = name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !ok {
                    check.fail(
                        format!("{field}.method"),
                        format!("{name:?} is not a gRPC method name"),
                    );
                }
            }
        }
        "RegularExpression" => {
            for (part, value) in [("service", &m.service), ("method", &m.method)] {
                if let Some(v) = value {
                    if let Err(reason) = compile_regex(v) {
                        check.fail(format!("{field}.{part}"), reason);
                    }
                }
            }
        }
        other => check.fail(
            format!("{field}.type"),
            format!("unknown match type {other:?}; expected Exact or RegularExpression"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Invalid, Object, Spec};
    use super::*;
    use serde_json::json;

    fn problems(v: Json) -> Vec<String> {
        Object::from_json(&v, 0)
            .unwrap_err()
            .0
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn parse(v: Json) -> Result<Object, Invalid> {
        Object::from_json(&v, 0)
    }

    fn route() -> Json {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "orders", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"name": "orders", "port": 8080}],
                "rules": [{
                    "matches": [{"path": {"type": "PathPrefix", "value": "/v2"}, "method": "GET",
                                 "headers": [{"name": "x-canary", "value": "1"}],
                                 "queryParams": [{"name": "debug", "value": "1"}]}],
                    "backendRefs": [{"name": "orders-v2", "port": 8080, "weight": 90},
                                    {"name": "orders-v1", "port": 8080}],
                    "timeouts": {"request": "1m30s", "backendRequest": "10s"},
                    "filters": [{"type": "RequestHeaderModifier",
                                 "requestHeaderModifier": {"set": [{"name": "x-mesh", "value": "muon"}]}}]
                }]
            }
        })
    }

    #[test]
    fn route_parses_with_defaults() {
        let o = parse(route()).unwrap();
        let Spec::HttpRoute(r) = &o.spec else {
            panic!("not a route")
        };
        assert_eq!(r.parent_refs[0].kind, "Service");
        assert_eq!(r.rules[0].backend_refs[1].weight, 1);
        let t = r.rules[0].timeouts.as_ref().unwrap();
        assert_eq!(t.request(), Some(Duration::from_secs(90)));
        assert_eq!(t.backend_request(), Some(Duration::from_secs(10)));
        assert_eq!(r.rules[0].matches[0].query_params[0].kind, "Exact");
        // Round trip keeps everything.
        assert_eq!(parse(o.to_json()).unwrap(), o);
    }

    #[test]
    fn every_standard_filter_is_accepted() {
        let mut v = route();
        v["spec"]["rules"] = json!([
            {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
             "filters": [{"type": "RequestRedirect", "requestRedirect": {
                 "scheme": "https", "hostname": "shop.example", "statusCode": 301,
                 "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
             "filters": [
                {"type": "URLRewrite", "urlRewrite": {"hostname": "backend.shop",
                  "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}},
                {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                  "add": [{"name": "x-served-by", "value": "muon"}], "remove": ["server"]}},
                {"type": "RequestMirror", "requestMirror": {
                  "backendRef": {"name": "shadow", "port": 8080}, "percent": 50}}
             ],
             "backendRefs": [{"name": "api", "port": 8080}]}
        ]);
        parse(v).unwrap();
    }

    #[test]
    fn incompatible_and_malformed_filters_are_refused_with_their_field() {
        let mut v = route();
        v["spec"]["rules"][0]["filters"] = json!([
            {"type": "RequestRedirect", "requestRedirect": {"statusCode": 304}},
            {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplaceFullPath"}}},
            {"type": "CORS", "cors": {}},
            {"type": "RequestHeaderModifier", "responseHeaderModifier": {}},
        ]);
        let p = problems(v);
        let want = [
            "spec.rules[0].backendRefs: must be empty when the rule has a RequestRedirect",
            "spec.rules[0].filters[0].requestRedirect.statusCode: 304",
            "spec.rules[0].filters[1].urlRewrite.path.replaceFullPath: is required",
            "spec.rules[0].filters[2].type: filter \"CORS\" is not supported yet",
            "spec.rules[0].filters[3].requestHeaderModifier: is required",
            "spec.rules[0].filters[3].responseHeaderModifier: must not be set",
            "spec.rules[0].filters: may have a RequestRedirect or a URLRewrite filter, not both",
        ];
        for w in want {
            assert!(p.iter().any(|m| m.contains(w)), "{w} missing from {p:#?}");
        }
        assert_eq!(p.len(), want.len(), "{p:#?}");
    }

    #[test]
    fn a_regex_that_does_not_compile_is_refused_at_apply_with_its_field() {
        let mut v = route();
        v["spec"]["rules"][0]["matches"][0]["path"] =
            json!({"type": "RegularExpression", "value": "/items/([0-9]+"});
        v["spec"]["rules"][0]["matches"][0]["headers"] =
            json!([{"name": "x-v", "type": "RegularExpression", "value": "a{99999}"}]);
        let p = problems(v);
        assert_eq!(p.len(), 2, "{p:#?}");
        assert!(
            p[0].contains("spec.rules[0].matches[0].path.value: invalid regular expression"),
            "{}",
            p[0]
        );
        assert!(p[1].contains("matches[0].headers[0].value: invalid regular expression"));
        assert!(compile_regex("/items/[0-9]+")
            .unwrap()
            .is_match("/items/42"));
        // A whole-value match, not a search.
        assert!(!compile_regex("/items").unwrap().is_match("/items/42"));
    }

    #[test]
    fn route_problems_name_nested_fields() {
        let mut v = route();
        v["spec"]["parentRefs"][0]["kind"] = json!("Mesh");
        v["spec"]["rules"][0]["matches"][0]["path"] = json!({"type": "Prefix", "value": "v2"});
        v["spec"]["rules"][0]["matches"][0]["method"] = json!("FETCH");
        v["spec"]["rules"][0]["timeouts"] = json!({"request": "10 seconds"});
        v["spec"]["rules"][0]["backendRefs"] = json!([]);
        let p = problems(v);
        assert_eq!(p.len(), 5, "{p:#?}");
        assert!(p[0].contains("spec.parentRefs[0].kind: \"Mesh\" is not supported"));
        assert!(p[1].contains("spec.rules[0].matches[0].path.type: unknown path match type"));
        assert!(p[2].contains("spec.rules[0].matches[0].method: unknown method \"FETCH\""));
        assert!(p[3].contains("spec.rules[0].backendRefs: needs at least one backend"));
        assert!(p[4].contains("spec.rules[0].timeouts.request: \"10 seconds\" is not a duration"));
    }

    #[test]
    fn a_backend_timeout_longer_than_the_request_timeout_is_refused() {
        let mut v = route();
        v["spec"]["rules"][0]["timeouts"] = json!({"request": "1s", "backendRequest": "2s"});
        let p = problems(v);
        assert!(p[0].contains("timeouts.backendRequest: must be at most timeouts.request (1s)"));
        let mut v = route();
        v["spec"]["rules"][0]["timeouts"] = json!({"request": "0s", "backendRequest": "2s"});
        parse(v).unwrap();
    }

    #[test]
    fn a_route_may_attach_to_a_gateway() {
        let mut v = route();
        v["spec"]["parentRefs"] = json!([{"name": "edge", "kind": "Gateway",
            "group": "gateway.networking.k8s.io", "sectionName": "http"}]);
        v["spec"]["hostnames"] = json!(["shop.example", "*.shop.example"]);
        let o = parse(v).unwrap();
        let Spec::HttpRoute(r) = &o.spec else {
            panic!()
        };
        assert!(r.parent_refs[0].is_gateway());
    }

    fn grpc_route() -> Json {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GRPCRoute",
            "metadata": {"name": "payment", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"name": "payment"}],
                "rules": [{
                    "matches": [{"method": {"service": "shop.v1.Payment", "method": "Charge"},
                                 "headers": [{"name": "x-tenant", "value": "a"}]}],
                    "backendRefs": [{"name": "payment-v2", "port": 9090}]
                }]
            }
        })
    }

    #[test]
    fn grpc_routes_parse_and_check_their_method_matches() {
        let o = parse(grpc_route()).unwrap();
        let Spec::GrpcRoute(r) = &o.spec else {
            panic!()
        };
        assert_eq!(r.rules[0].matches[0].method.as_ref().unwrap().kind, "Exact");
        let mut v = grpc_route();
        v["spec"]["rules"][0]["matches"][0]["method"] = json!({"service": "shop/v1"});
        v["spec"]["rules"][0]["filters"] =
            json!([{"type": "RequestRedirect", "requestRedirect": {}}]);
        let p = problems(v);
        assert!(p[0].contains("matches[0].method.service: \"shop/v1\" is not a gRPC service"));
        assert!(p[1].contains("filters[0].type: filter \"RequestRedirect\" does not apply"));
        let mut v = grpc_route();
        v["spec"]["rules"][0]["matches"][0]["method"] = json!({});
        assert!(problems(v)[0].contains("needs a service, a method or both"));
    }
}
