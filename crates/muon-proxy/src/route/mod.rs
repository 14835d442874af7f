//! HTTPRoute and GRPCRoute as the data path uses them: compiled once when received, matched
//! per request. Pure: no I/O, no async, tested and benchmarked on its own.
//!
//! - this module: [`RouteDef`], a route resource checked and compiled (regular expressions
//!   built with muon-core's [`compile_regex`], so what the control plane accepts, sidecars
//!   accept);
//! - [`matching`]: the [`Router`] of one parent (a service port or a gateway): every rule's
//!   matches in the Gateway API's precedence order, and [`Router::find`] for a request;
//! - [`filter`]: what the filters do to a request or response (header modifiers, redirects,
//!   rewrites), as functions of their inputs.

pub mod filter;
pub mod matching;

pub use matching::{Request, Router, RouterBuilder};

use muon_api::v1;
use muon_core::resource::compile_regex;
use regex::Regex;
use std::sync::Arc;
use std::time::Duration;

/// Which of the two route kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Http,
    Grpc,
}

/// What a route attaches to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    pub gateway: bool,
    /// `name.namespace`.
    pub name: String,
    /// 0: every port.
    pub port: u16,
    pub section: String,
}

/// One route, compiled.
#[derive(Debug)]
pub struct RouteDef {
    /// The resource name (`name.namespace`, or `grpcroute/name.namespace`).
    pub name: Arc<str>,
    pub namespace: String,
    pub kind: RouteKind,
    pub parents: Vec<Parent>,
    /// Lowercase; `*.suffix` for a wildcard.
    pub hostnames: Vec<String>,
    pub rules: Vec<RuleDef>,
}

/// One rule of a route.
#[derive(Debug)]
pub struct RuleDef {
    /// Position in the route, for precedence and logs.
    pub index: usize,
    pub name: Option<Arc<str>>,
    /// Any of them (none: every request).
    pub matches: Vec<MatchDef>,
    pub filters: Vec<Filter>,
    pub backends: Vec<BackendRefDef>,
    pub timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    pub retry: Option<RetryDef>,
}

/// A rule's `retry`: which answers are retried, how many times, how long to wait first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryDef {
    pub codes: Vec<u16>,
    pub attempts: u32,
    pub backoff: Duration,
}

impl RetryDef {
    /// Whether an answer with `status` (and `grpc_status`, for a trailers-only gRPC answer)
    /// is retried: a listed status; gRPC `UNAVAILABLE` (14) when 503 is listed.
    pub fn retries(&self, status: u16, grpc_status: Option<u32>) -> bool {
        self.codes.contains(&status) || (grpc_status == Some(14) && self.codes.contains(&503))
    }
}

/// One match: every condition set must hold.
#[derive(Debug)]
pub struct MatchDef {
    pub path: PathMatch,
    pub method: Option<http::Method>,
    pub headers: Vec<ValueMatch>,
    pub query: Vec<ValueMatch>,
    pub grpc: Option<GrpcMatch>,
}

#[derive(Debug)]
pub enum PathMatch {
    /// No path condition (GRPCRoute, or a match that leaves the path out: `PathPrefix /`).
    Any,
    Exact(String),
    /// Element-wise prefix, stored without its trailing `/` (so `/` is the empty prefix).
    Prefix(String),
    Regex(Regex),
}

/// A header (name lowercase) or query parameter (name as written) condition.
#[derive(Debug)]
pub struct ValueMatch {
    pub name: String,
    pub value: StrMatch,
}

#[derive(Debug)]
pub enum StrMatch {
    Exact(String),
    Regex(Regex),
}

impl StrMatch {
    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => e == v,
            StrMatch::Regex(r) => r.is_match(v),
        }
    }

    /// The pattern's length, for precedence.
    fn len(&self) -> usize {
        match self {
            StrMatch::Exact(e) => e.len(),
            StrMatch::Regex(r) => r.as_str().len(),
        }
    }
}

/// A GRPCRoute method match on `/service/method`; `None` parts match any.
#[derive(Debug)]
pub struct GrpcMatch {
    pub service: Option<StrMatch>,
    pub method: Option<StrMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendRefDef {
    /// `name.namespace`.
    pub service: Arc<str>,
    /// 0: the port the request arrived on.
    pub port: u16,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    Redirect(Redirect),
    Rewrite(Rewrite),
    Mirror(Mirror),
}

/// Header changes, names lowercase and checked, values checked: applying them cannot fail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderModifier {
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
    pub add: Vec<(http::HeaderName, http::HeaderValue)>,
    pub remove: Vec<http::HeaderName>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathModifier {
    Full(String),
    /// Replaces the matched prefix (the rule's single `PathPrefix` match, given here).
    Prefix {
        matched: String,
        with: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status: http::StatusCode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    pub hostname: Option<http::HeaderValue>,
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub backend: BackendRefDef,
    pub numerator: u32,
    pub denominator: u32,
}

impl RouteDef {
    /// Checks and compiles a route resource; the error is the NACK reason.
    pub fn from_proto(name: &str, r: &v1::Route) -> Result<RouteDef, String> {
        if r.name.is_empty() {
            return Err("name is empty".into());
        }
        let kind = match r.kind.as_str() {
            "" | "HTTPRoute" => RouteKind::Http,
            "GRPCRoute" => RouteKind::Grpc,
            other => return Err(format!("kind {other:?} is not HTTPRoute or GRPCRoute")),
        };
        let parents = r
            .parent_refs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let gateway = match p.kind.as_str() {
                    "" | "Service" => false,
                    "Gateway" => true,
                    other => {
                        return Err(format!(
                            "parentRefs[{i}]: kind {other:?} is not Service or Gateway"
                        ))
                    }
                };
                Ok(Parent {
                    gateway,
                    name: p.name.clone(),
                    port: port(p.port).map_err(|e| format!("parentRefs[{i}].port: {e}"))?,
                    section: p.section_name.clone(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let rules = r
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| rule_def(i, rule).map_err(|e| format!("rules[{i}]{e}")))
            .collect::<Result<Vec<_>, String>>()?;
        Ok(RouteDef {
            name: name.into(),
            namespace: r.namespace.clone(),
            kind,
            parents,
            hostnames: r.hostnames.iter().map(|h| h.to_ascii_lowercase()).collect(),
            rules,
        })
    }
}

fn port(p: u32) -> Result<u16, String> {
    u16::try_from(p).map_err(|_| format!("{p} is not a port"))
}

fn str_match(kind: &str, value: &str) -> Result<StrMatch, String> {
    match kind {
        "" | "Exact" => Ok(StrMatch::Exact(value.to_string())),
        "RegularExpression" => compile_regex(value).map(StrMatch::Regex),
        other => Err(format!("unknown match type {other:?}")),
    }
}

fn value_matches(
    field: &str,
    list: &[v1::HeaderMatch],
    lower: bool,
) -> Result<Vec<ValueMatch>, String> {
    list.iter()
        .enumerate()
        .map(|(k, h)| {
            if h.name.is_empty() {
                return Err(format!("{field}[{k}].name: must not be empty"));
            }
            if lower && http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                return Err(format!(
                    "{field}[{k}].name: {:?} is not a header name",
                    h.name
                ));
            }
            Ok(ValueMatch {
                name: if lower {
                    h.name.to_ascii_lowercase()
                } else {
                    h.name.clone()
                },
                value: str_match(&h.r#type, &h.value).map_err(|e| format!("{field}[{k}]: {e}"))?,
            })
        })
        .collect()
}

fn match_def(m: &v1::RouteMatch) -> Result<MatchDef, String> {
    let path = match m.path_type.as_str() {
        "" => PathMatch::Any,
        "Exact" => PathMatch::Exact(m.path_value.clone()),
        "PathPrefix" => {
            let p = m.path_value.trim_end_matches('/');
            match p.is_empty() {
                true => PathMatch::Any,
                false => PathMatch::Prefix(p.to_string()),
            }
        }
        "RegularExpression" => {
            PathMatch::Regex(compile_regex(&m.path_value).map_err(|e| format!(".path: {e}"))?)
        }
        other => return Err(format!(".path: unknown path match type {other:?}")),
    };
    let method = match m.method.as_str() {
        "" => None,
        s => Some(
            http::Method::from_bytes(s.as_bytes())
                .map_err(|_| format!(".method: {s:?} is not a method"))?,
        ),
    };
    let grpc = match m.grpc_type.as_str() {
        "" => None,
        kind => {
            let part = |v: &str| (!v.is_empty()).then(|| str_match(kind, v)).transpose();
            Some(GrpcMatch {
                service: part(&m.grpc_service).map_err(|e| format!(".method.service: {e}"))?,
                method: part(&m.grpc_method).map_err(|e| format!(".method.method: {e}"))?,
            })
        }
    };
    Ok(MatchDef {
        path,
        method,
        headers: value_matches(".headers", &m.headers, true)?,
        query: value_matches(".queryParams", &m.query_params, false)?,
        grpc,
    })
}

fn header_modifier(m: &v1::HeaderModifier) -> Result<HeaderModifier, String> {
    let name = |n: &str| {
        http::HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("{n:?} is not a header name"))
    };
    let pairs = |list: &[v1::Header]| {
        list.iter()
            .map(|h| {
                let value = http::HeaderValue::from_str(&h.value).map_err(|_| {
                    format!(
                        "header {:?}: value {:?} is not a header value",
                        h.name, h.value
                    )
                })?;
                Ok((name(&h.name)?, value))
            })
            .collect::<Result<Vec<_>, String>>()
    };
    Ok(HeaderModifier {
        set: pairs(&m.set)?,
        add: pairs(&m.add)?,
        remove: m.remove.iter().map(|n| name(n)).collect::<Result<_, _>>()?,
    })
}

fn backend_ref(b: &v1::BackendRef) -> Result<BackendRefDef, String> {
    if b.service.is_empty() {
        return Err("service is empty".into());
    }
    Ok(BackendRefDef {
        service: b.service.as_str().into(),
        port: port(b.port)?,
        weight: b.weight,
    })
}

fn path_modifier(p: &v1::PathModifier, matches: &[MatchDef]) -> Result<PathModifier, String> {
    match p.r#type.as_str() {
        "ReplaceFullPath" => Ok(PathModifier::Full(p.value.clone())),
        "ReplacePrefixMatch" => match matches {
            [MatchDef {
                path: PathMatch::Prefix(prefix),
                ..
            }] => Ok(PathModifier::Prefix {
                matched: prefix.clone(),
                with: p.value.clone(),
            }),
            [MatchDef {
                path: PathMatch::Any,
                ..
            }] => Ok(PathModifier::Prefix {
                matched: String::new(),
                with: p.value.clone(),
            }),
            _ => Err("ReplacePrefixMatch needs exactly one PathPrefix match".into()),
        },
        other => Err(format!("unknown path modifier {other:?}")),
    }
}

fn rule_def(index: usize, r: &v1::RouteRule) -> Result<RuleDef, String> {
    let matches = r
        .matches
        .iter()
        .enumerate()
        .map(|(j, m)| match_def(m).map_err(|e| format!(".matches[{j}]{e}")))
        .collect::<Result<Vec<_>, String>>()?;
    let mut filters = Vec::with_capacity(r.filters.len());
    for (j, f) in r.filters.iter().enumerate() {
        use v1::route_filter::Kind as F;
        let at = |e: String| format!(".filters[{j}]: {e}");
        let filter = match &f.kind {
            None => return Err(at("empty filter".into())),
            Some(F::RequestHeaderModifier(m)) => {
                Filter::RequestHeaders(header_modifier(m).map_err(at)?)
            }
            Some(F::ResponseHeaderModifier(m)) => {
                Filter::ResponseHeaders(header_modifier(m).map_err(at)?)
            }
            Some(F::RequestRedirect(rd)) => Filter::Redirect(Redirect {
                scheme: (!rd.scheme.is_empty()).then(|| rd.scheme.clone()),
                hostname: (!rd.hostname.is_empty()).then(|| rd.hostname.clone()),
                path: rd
                    .path
                    .as_ref()
                    .map(|p| path_modifier(p, &matches))
                    .transpose()
                    .map_err(at)?,
                port: match rd.port {
                    0 => None,
                    p => Some(port(p).map_err(at)?),
                },
                status: http::StatusCode::from_u16(rd.status_code as u16)
                    .ok()
                    .filter(|s| s.is_redirection())
                    .ok_or_else(|| at(format!("status {} is not a redirect", rd.status_code)))?,
            }),
            Some(F::UrlRewrite(rw)) => Filter::Rewrite(Rewrite {
                hostname: match rw.hostname.as_str() {
                    "" => None,
                    h => Some(
                        http::HeaderValue::from_str(h)
                            .map_err(|_| at(format!("hostname {h:?}")))?,
                    ),
                },
                path: rw
                    .path
                    .as_ref()
                    .map(|p| path_modifier(p, &matches))
                    .transpose()
                    .map_err(at)?,
            }),
            Some(F::RequestMirror(m)) => {
                let b = m
                    .backend
                    .as_ref()
                    .ok_or_else(|| at("mirror without a backend".into()))?;
                Filter::Mirror(Mirror {
                    backend: backend_ref(b).map_err(at)?,
                    numerator: m.numerator,
                    denominator: m.denominator.max(1),
                })
            }
        };
        filters.push(filter);
    }
    let backends = r
        .backends
        .iter()
        .enumerate()
        .map(|(j, b)| backend_ref(b).map_err(|e| format!(".backendRefs[{j}]: {e}")))
        .collect::<Result<Vec<_>, String>>()?;
    let ms = |v: u64| (v > 0).then(|| Duration::from_millis(v));
    Ok(RuleDef {
        index,
        name: (!r.name.is_empty()).then(|| r.name.as_str().into()),
        matches,
        filters,
        backends,
        timeout: ms(r.timeout_ms),
        backend_timeout: ms(r.backend_timeout_ms),
        retry: r.retry.as_ref().map(|rt| RetryDef {
            codes: rt
                .codes
                .iter()
                .filter_map(|&c| u16::try_from(c).ok())
                .collect(),
            attempts: rt
                .attempts
                .min(muon_core::resource::traffic::MAX_RETRY_ATTEMPTS as u32),
            backoff: Duration::from_millis(rt.backoff_ms),
        }),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn prefix_match(p: &str) -> v1::RouteMatch {
        v1::RouteMatch {
            path_type: "PathPrefix".into(),
            path_value: p.into(),
            ..Default::default()
        }
    }

    pub fn backend(service: &str, weight: u32) -> v1::BackendRef {
        v1::BackendRef {
            service: service.into(),
            port: 80,
            weight,
        }
    }

    #[test]
    fn a_route_compiles_with_its_filters_and_a_bad_regex_is_the_nack_reason() {
        let route = v1::Route {
            name: "r".into(),
            namespace: "shop".into(),
            kind: "HTTPRoute".into(),
            parent_refs: vec![v1::ParentRef {
                kind: "Service".into(),
                name: "web.shop".into(),
                port: 80,
                ..Default::default()
            }],
            hostnames: vec!["Shop.Example".into()],
            rules: vec![v1::RouteRule {
                matches: vec![prefix_match("/api/")],
                backends: vec![backend("api.shop", 1)],
                timeout_ms: 1500,
                filters: vec![v1::RouteFilter {
                    kind: Some(v1::route_filter::Kind::UrlRewrite(v1::UrlRewrite {
                        hostname: "api.internal".into(),
                        path: Some(v1::PathModifier {
                            r#type: "ReplacePrefixMatch".into(),
                            value: "/".into(),
                        }),
                    })),
                }],
                ..Default::default()
            }],
        };
        let def = RouteDef::from_proto("r.shop", &route).unwrap();
        assert_eq!(def.hostnames, ["shop.example"]);
        assert_eq!(def.parents[0].port, 80);
        let rule = &def.rules[0];
        assert!(matches!(&rule.matches[0].path, PathMatch::Prefix(p) if p == "/api"));
        assert_eq!(rule.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(rule.backend_timeout, None);
        assert!(matches!(&rule.filters[0], Filter::Rewrite(Rewrite {
            path: Some(PathModifier::Prefix { matched, with }), ..
        }) if matched == "/api" && with == "/"));

        let mut bad = route.clone();
        bad.rules[0].matches[0] = v1::RouteMatch {
            path_type: "RegularExpression".into(),
            path_value: "/items/([0-9]+".into(),
            ..Default::default()
        };
        let err = RouteDef::from_proto("r.shop", &bad).unwrap_err();
        assert!(
            err.starts_with("rules[0].matches[0].path: invalid regular expression"),
            "{err}"
        );
    }
}
