//! Matching a request against the routes of one parent, in the Gateway API's precedence.
//!
//! A [`Router`] holds every (hostname, rule, match) of the routes attached to a parent,
//! sorted once at compile time by precedence, so [`Router::find`] returns the first entry
//! that matches. The order, continuing on ties:
//!
//! 1. at a Gateway, the route's hostname: an exact hostname before a wildcard, longer first
//!    (a route without hostnames matches any host, after both);
//! 2. HTTPRoute: an `Exact` path, then a `RegularExpression` path (longer pattern first; the
//!    spec leaves regular expressions to the implementation, this is Envoy Gateway's order),
//!    then the longest `PathPrefix`; then a method match; then the most header matches; then
//!    the most query parameter matches;
//!    GRPCRoute: the longest service match, the longest method match, the most header matches;
//! 3. the route first in `namespace/name` order (Muon has no creation timestamps);
//! 4. the rule first in its route, then the match first in its rule.
//!
//! HTTPRoutes and GRPCRoutes are never merged: when both attach to one parent, the GRPCRoutes
//! win (GAMMA's route-type precedence).

use super::{GrpcMatch, MatchDef, PathMatch, RouteDef, RouteKind, RuleDef, StrMatch, ValueMatch};
use http::{HeaderMap, Method};
use std::borrow::Cow;
use std::cmp::Reverse;
use std::sync::Arc;

/// What matching looks at in a request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a Method,
    /// Without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// Lowercase, without the port; `None` when matching ignores hosts (mesh).
    pub host: Option<&'a str>,
}

/// The routes of one parent, ready to match; `T` is what a matched rule leads to.
#[derive(Debug)]
pub struct Router<T> {
    entries: Vec<Entry<T>>,
}

#[derive(Debug)]
struct Entry<T> {
    host: Host,
    route: Arc<RouteDef>,
    rule: usize,
    /// `None`: the rule has no matches (it matches everything).
    matched: Option<usize>,
    target: Arc<T>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Any,
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

impl Host {
    fn parse(h: &str) -> Host {
        match h.strip_prefix('*') {
            Some(suffix) => Host::Suffix(suffix.to_string()),
            None => Host::Exact(h.to_string()),
        }
    }

    fn matches(&self, host: Option<&str>) -> bool {
        match (self, host) {
            (Host::Any, _) => true,
            (_, None) => false,
            (Host::Exact(h), Some(got)) => h == got,
            // A wildcard covers subdomains only, not the bare suffix itself.
            (Host::Suffix(s), Some(got)) => got.len() > s.len() && got.ends_with(s.as_str()),
        }
    }

    /// Larger is more specific.
    fn rank(&self) -> (u8, usize) {
        match self {
            Host::Exact(h) => (2, h.len()),
            Host::Suffix(s) => (1, s.len()),
            Host::Any => (0, 0),
        }
    }
}

impl<T> Default for Router<T> {
    fn default() -> Self {
        Router {
            entries: Vec::new(),
        }
    }
}

/// Collects the routes of one parent, then sorts them into a [`Router`].
pub struct RouterBuilder<T> {
    /// Whether hostnames count (a Gateway) or not (a Service, GAMMA).
    hosts: bool,
    http: Vec<(Arc<RouteDef>, Vec<Arc<T>>)>,
    grpc: Vec<(Arc<RouteDef>, Vec<Arc<T>>)>,
}

impl<T> RouterBuilder<T> {
    pub fn new(hosts: bool) -> Self {
        RouterBuilder {
            hosts,
            http: Vec::new(),
            grpc: Vec::new(),
        }
    }

    /// Adds a route; `targets[i]` is what its rule `i` leads to.
    pub fn add(&mut self, route: Arc<RouteDef>, targets: Vec<Arc<T>>) {
        debug_assert_eq!(route.rules.len(), targets.len());
        match route.kind {
            RouteKind::Http => self.http.push((route, targets)),
            RouteKind::Grpc => self.grpc.push((route, targets)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.http.is_empty() && self.grpc.is_empty()
    }

    /// A service's router has one kind of route: GRPCRoutes, when any attach, else
    /// HTTPRoutes (GAMMA). A gateway's keeps both, hostnames first: for the same hostname,
    /// GRPCRoutes before HTTPRoutes.
    pub fn build(self) -> Router<T> {
        let mut routes = match (self.hosts, self.grpc.is_empty()) {
            (_, true) => self.http,
            (false, false) => self.grpc,
            (true, false) => {
                let mut both = self.grpc;
                both.extend(self.http);
                both
            }
        };
        routes.sort_by(|a, b| {
            (
                a.0.kind != RouteKind::Grpc,
                a.0.namespace.as_str(),
                &*a.0.name,
            )
                .cmp(&(
                    b.0.kind != RouteKind::Grpc,
                    b.0.namespace.as_str(),
                    &*b.0.name,
                ))
        });
        let mut entries = Vec::new();
        for (order, (route, targets)) in routes.iter().enumerate() {
            let hosts: Vec<Host> = match (self.hosts, route.hostnames.is_empty()) {
                (true, false) => route.hostnames.iter().map(|h| Host::parse(h)).collect(),
                _ => vec![Host::Any],
            };
            for host in hosts {
                for (rule, target) in route.rules.iter().zip(targets) {
                    let matched: Vec<Option<usize>> = match rule.matches.is_empty() {
                        true => vec![None],
                        false => (0..rule.matches.len()).map(Some).collect(),
                    };
                    for m in matched {
                        entries.push((
                            order,
                            Entry {
                                host: host.clone(),
                                route: route.clone(),
                                rule: rule.index,
                                matched: m,
                                target: target.clone(),
                            },
                        ));
                    }
                }
            }
        }
        entries.sort_by_key(|(order, e)| {
            let m = e.matched.map(|i| &e.route.rules[e.rule].matches[i]);
            (
                Reverse(e.host.rank()),
                e.route.kind != RouteKind::Grpc,
                Reverse(precedence(e.route.kind, m)),
                *order,
                e.rule,
                e.matched,
            )
        });
        Router {
            entries: entries.into_iter().map(|(_, e)| e).collect(),
        }
    }
}

/// How specific a match is (larger first), within one route kind.
fn precedence(kind: RouteKind, m: Option<&MatchDef>) -> (u8, usize, bool, usize, usize) {
    let Some(m) = m else {
        // No matches: `PathPrefix /` for HTTP (the shortest prefix), every call for gRPC
        // (the least specific of all).
        return match kind {
            RouteKind::Http => (1, 0, false, 0, 0),
            RouteKind::Grpc => (0, 0, false, 0, 0),
        };
    };
    match kind {
        RouteKind::Http => {
            let (class, len) = match &m.path {
                PathMatch::Exact(p) => (3, p.len()),
                PathMatch::Regex(r) => (2, r.as_str().len()),
                PathMatch::Prefix(p) => (1, p.len()),
                PathMatch::Any => (1, 0),
            };
            (
                class,
                len,
                m.method.is_some(),
                m.headers.len(),
                m.query.len(),
            )
        }
        RouteKind::Grpc => {
            let part = |p: Option<&StrMatch>| p.map_or(0, StrMatch::len);
            let (service, method) = m.grpc.as_ref().map_or((0, 0), |g| {
                (part(g.service.as_ref()), part(g.method.as_ref()))
            });
            (0, service, method > 0, method, m.headers.len())
        }
    }
}

/// The result of a successful [`Router::find`].
#[derive(Debug)]
pub struct Found<'a, T> {
    pub route: &'a Arc<RouteDef>,
    pub rule: &'a RuleDef,
    pub target: &'a Arc<T>,
}

impl<T> Router<T> {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The rule the request goes to, or `None` (404: no rule matches).
    pub fn find(&self, req: &Request<'_>) -> Option<Found<'_, T>> {
        self.entries.iter().find_map(|e| {
            if !e.host.matches(req.host) {
                return None;
            }
            let rule = &e.route.rules[e.rule];
            let ok = match e.matched {
                None => true,
                Some(i) => matches(&rule.matches[i], req),
            };
            ok.then_some(Found {
                route: &e.route,
                rule,
                target: &e.target,
            })
        })
    }
}

fn matches(m: &MatchDef, req: &Request<'_>) -> bool {
    if let Some(method) = &m.method {
        if method != req.method {
            return false;
        }
    }
    let path_ok = match &m.path {
        PathMatch::Any => true,
        PathMatch::Exact(p) => req.path == p,
        PathMatch::Prefix(p) => {
            // Element-wise: `/abc` matches `/abc`, `/abc/` and `/abc/def`, not `/abcd`.
            req.path.starts_with(p.as_str())
                && matches!(req.path.as_bytes().get(p.len()), None | Some(b'/'))
        }
        PathMatch::Regex(r) => r.is_match(req.path),
    };
    if !path_ok {
        return false;
    }
    if let Some(g) = &m.grpc {
        if !grpc_matches(g, req.path) {
            return false;
        }
    }
    m.headers.iter().all(|h| header_matches(h, req.headers))
        && m.query.iter().all(|q| query_matches(q, req.query))
}

fn grpc_matches(g: &GrpcMatch, path: &str) -> bool {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return false;
    };
    g.service.as_ref().is_none_or(|s| s.matches(service))
        && g.method.as_ref().is_none_or(|m| m.matches(method))
}

fn header_matches(h: &ValueMatch, headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(h.name.as_str()).iter();
    let Some(first) = values.next() else {
        return false;
    };
    let Ok(first) = first.to_str() else {
        return false;
    };
    match values.next() {
        None => h.value.matches(first),
        // Several fields with one name mean one comma-separated value (RFC 9110 §5.3).
        Some(_) => {
            let joined: Vec<&str> = headers
                .get_all(h.name.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            h.value.matches(&joined.join(","))
        }
    }
}

/// The first parameter of that name (the Gateway API's recommendation for repeats), its value
/// percent-decoded.
fn query_matches(q: &ValueMatch, query: Option<&str>) -> bool {
    let Some(query) = query else {
        return false;
    };
    query
        .split('&')
        .filter_map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(name).as_deref() == Some(q.name.as_str())).then(|| decode(value))
        })
        .next()
        .flatten()
        .is_some_and(|v| q.value.matches(&v))
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space); `None` for bad UTF-8.
fn decode(s: &str) -> Option<Cow<'_, str>> {
    if !s.contains(['%', '+']) {
        return Some(Cow::Borrowed(s));
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::tests::backend;
    use muon_api::v1;

    fn m(path_type: &str, path: &str) -> v1::RouteMatch {
        v1::RouteMatch {
            path_type: path_type.into(),
            path_value: path.into(),
            ..Default::default()
        }
    }

    fn rule(matches: Vec<v1::RouteMatch>) -> v1::RouteRule {
        v1::RouteRule {
            matches,
            backends: vec![backend("web.shop", 1)],
            ..Default::default()
        }
    }

    fn route(name: &str, hostnames: &[&str], rules: Vec<v1::RouteRule>) -> Arc<RouteDef> {
        let r = v1::Route {
            name: name.into(),
            namespace: "shop".into(),
            kind: "HTTPRoute".into(),
            hostnames: hostnames.iter().map(|h| h.to_string()).collect(),
            rules,
            ..Default::default()
        };
        Arc::new(RouteDef::from_proto(&format!("{name}.shop"), &r).unwrap())
    }

    /// A router whose targets name their route and rule.
    fn router(hosts: bool, routes: Vec<Arc<RouteDef>>) -> Router<String> {
        let mut b = RouterBuilder::new(hosts);
        for r in routes {
            let targets = (0..r.rules.len())
                .map(|i| Arc::new(format!("{}#{i}", r.name)))
                .collect();
            b.add(r, targets);
        }
        b.build()
    }

    struct Req {
        method: Method,
        path: String,
        query: Option<String>,
        headers: HeaderMap,
        host: Option<String>,
    }

    impl Req {
        fn get(uri: &str) -> Req {
            let (path, query) = match uri.split_once('?') {
                Some((p, q)) => (p.to_string(), Some(q.to_string())),
                None => (uri.to_string(), None),
            };
            Req {
                method: Method::GET,
                path,
                query,
                headers: HeaderMap::new(),
                host: None,
            }
        }
        fn method(mut self, m: Method) -> Req {
            self.method = m;
            self
        }
        fn header(mut self, k: &'static str, v: &'static str) -> Req {
            self.headers.append(k, http::HeaderValue::from_static(v));
            self
        }
        fn host(mut self, h: &str) -> Req {
            self.host = Some(h.into());
            self
        }
        fn view(&self) -> Request<'_> {
            Request {
                method: &self.method,
                path: &self.path,
                query: self.query.as_deref(),
                headers: &self.headers,
                host: self.host.as_deref(),
            }
        }
    }

    fn find(r: &Router<String>, req: Req) -> Option<String> {
        r.find(&req.view()).map(|f| (**f.target).clone())
    }

    #[test]
    fn path_prefixes_match_element_by_element() {
        let r = router(
            false,
            vec![route("a", &[], vec![rule(vec![m("PathPrefix", "/abc/")])])],
        );
        for hit in ["/abc", "/abc/", "/abc/def"] {
            assert_eq!(
                find(&r, Req::get(hit)).as_deref(),
                Some("a.shop#0"),
                "{hit}"
            );
        }
        for miss in ["/abcd", "/ab", "/"] {
            assert_eq!(find(&r, Req::get(miss)), None, "{miss}");
        }
        let exact = router(
            false,
            vec![route("e", &[], vec![rule(vec![m("Exact", "/abc")])])],
        );
        assert!(find(&exact, Req::get("/abc")).is_some());
        for miss in ["/abc/", "/Abc", "/abcd"] {
            assert_eq!(find(&exact, Req::get(miss)), None, "{miss}");
        }
    }

    #[test]
    fn precedence_is_exact_then_longest_prefix_then_method_headers_and_query() {
        let mut method = m("PathPrefix", "/api");
        method.method = "POST".into();
        let mut one_header = m("PathPrefix", "/api");
        one_header.headers = vec![v1::HeaderMatch {
            name: "x-a".into(),
            value: "1".into(),
            r#type: "Exact".into(),
        }];
        let mut two_headers = one_header.clone();
        two_headers.headers.push(v1::HeaderMatch {
            name: "X-B".into(),
            value: "2".into(),
            r#type: "Exact".into(),
        });
        let mut query = one_header.clone();
        query.query_params = vec![v1::HeaderMatch {
            name: "debug".into(),
            value: "on".into(),
            r#type: "Exact".into(),
        }];
        // Written in the worst order, across routes whose names sort the other way round.
        let r = router(
            false,
            vec![
                route("z", &[], vec![rule(vec![m("PathPrefix", "/")])]),
                route("y", &[], vec![rule(vec![m("PathPrefix", "/api")])]),
                route("x", &[], vec![rule(vec![one_header]), rule(vec![query])]),
                route("w", &[], vec![rule(vec![two_headers])]),
                route("v", &[], vec![rule(vec![method])]),
                route("u", &[], vec![rule(vec![m("PathPrefix", "/api/v1")])]),
                route("t", &[], vec![rule(vec![m("Exact", "/api/v1/items")])]),
            ],
        );
        let got = |req| find(&r, req).unwrap();
        assert_eq!(got(Req::get("/api/v1/items")), "t.shop#0", "exact first");
        assert_eq!(
            got(Req::get("/api/v1/items/7")),
            "u.shop#0",
            "then the longest prefix"
        );
        assert_eq!(
            got(Req::get("/api/x").method(Method::POST)),
            "v.shop#0",
            "then a method"
        );
        let both = Req::get("/api/x").header("x-a", "1").header("x-b", "2");
        assert_eq!(got(both), "w.shop#0", "then the most headers");
        let q = Req::get("/api/x?debug=on").header("x-a", "1");
        assert_eq!(got(q), "x.shop#1", "then the most query params");
        assert_eq!(got(Req::get("/api/x").header("x-a", "1")), "x.shop#0");
        assert_eq!(got(Req::get("/api/x")), "y.shop#0");
        assert_eq!(got(Req::get("/other")), "z.shop#0");
    }

    #[test]
    fn ties_go_to_the_route_first_by_name_then_to_the_first_rule() {
        let r = router(
            false,
            vec![
                route("b", &[], vec![rule(vec![m("PathPrefix", "/x")])]),
                route(
                    "a",
                    &[],
                    vec![
                        rule(vec![m("PathPrefix", "/y")]),
                        rule(vec![m("PathPrefix", "/x")]),
                        rule(vec![m("PathPrefix", "/x")]),
                    ],
                ),
            ],
        );
        assert_eq!(find(&r, Req::get("/x")).as_deref(), Some("a.shop#1"));
    }

    #[test]
    fn headers_regexes_and_query_params_match_as_the_spec_says() {
        let mut mm = m("RegularExpression", "/items/[0-9]+");
        mm.headers = vec![v1::HeaderMatch {
            name: "X-Version".into(),
            value: "v[12]".into(),
            r#type: "RegularExpression".into(),
        }];
        mm.query_params = vec![v1::HeaderMatch {
            name: "q".into(),
            value: "a b".into(),
            r#type: "Exact".into(),
        }];
        let r = router(false, vec![route("r", &[], vec![rule(vec![mm])])]);
        let ok = Req::get("/items/42?x=1&q=a+b&q=other").header("x-version", "v2");
        assert!(find(&r, ok).is_some());
        assert!(find(&r, Req::get("/items/42?q=a%20b").header("X-VERSION", "v1")).is_some());
        assert!(find(&r, Req::get("/items/42x?q=a+b").header("x-version", "v2")).is_none());
        assert!(find(&r, Req::get("/items/42?q=a+b").header("x-version", "v3")).is_none());
        assert!(find(&r, Req::get("/items/42").header("x-version", "v2")).is_none());
        assert!(
            find(&r, Req::get("/items/42?Q=a+b").header("x-version", "v2")).is_none(),
            "query names are case-sensitive"
        );
    }

    #[test]
    fn gateway_hostnames_come_first_and_mesh_routers_ignore_them() {
        let routes = vec![
            route("any", &[], vec![rule(vec![m("Exact", "/")])]),
            route("wild", &["*.example.com"], vec![rule(vec![])]),
            route("exact", &["shop.example.com"], vec![rule(vec![])]),
        ];
        let r = router(true, routes.clone());
        assert_eq!(
            find(&r, Req::get("/").host("shop.example.com")).as_deref(),
            Some("exact.shop#0")
        );
        assert_eq!(
            find(&r, Req::get("/").host("a.b.example.com")).as_deref(),
            Some("wild.shop#0")
        );
        assert_eq!(
            find(&r, Req::get("/").host("example.com")).as_deref(),
            Some("any.shop#0")
        );
        assert_eq!(find(&r, Req::get("/x").host("example.com")), None);
        let mesh = router(false, routes);
        assert_eq!(find(&mesh, Req::get("/")).as_deref(), Some("any.shop#0"));
    }

    #[test]
    fn grpc_routes_match_service_and_method_and_win_over_http_routes() {
        let g = |service: &str, method: &str| v1::RouteMatch {
            grpc_type: "Exact".into(),
            grpc_service: service.into(),
            grpc_method: method.into(),
            ..Default::default()
        };
        let grpc = Arc::new(
            RouteDef::from_proto(
                "grpcroute/pay.shop",
                &v1::Route {
                    name: "pay".into(),
                    namespace: "shop".into(),
                    kind: "GRPCRoute".into(),
                    rules: vec![
                        rule(vec![g("shop.v1.Payment", "")]),
                        rule(vec![g("shop.v1.Payment", "Charge")]),
                    ],
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        let r = router(false, vec![route("h", &[], vec![rule(vec![])]), grpc]);
        assert_eq!(
            find(&r, Req::get("/shop.v1.Payment/Charge")).as_deref(),
            Some("grpcroute/pay.shop#1")
        );
        assert_eq!(
            find(&r, Req::get("/shop.v1.Payment/Refund")).as_deref(),
            Some("grpcroute/pay.shop#0")
        );
        assert_eq!(
            find(&r, Req::get("/shop.v1.Other/Charge")),
            None,
            "HTTPRoutes are not merged in"
        );

        // At a gateway both kinds serve, each for its hostnames; on the same hostname the
        // GRPCRoute comes first.
        let grpc_at = |host: &str| {
            Arc::new(
                RouteDef::from_proto(
                    &format!("grpcroute/{host}"),
                    &v1::Route {
                        name: host.into(),
                        namespace: "shop".into(),
                        kind: "GRPCRoute".into(),
                        hostnames: vec![host.into()],
                        rules: vec![rule(vec![g("shop.v1.Payment", "")])],
                        ..Default::default()
                    },
                )
                .unwrap(),
            )
        };
        let gw = router(
            true,
            vec![
                route("web", &["web.example", "api.example"], vec![rule(vec![])]),
                grpc_at("api.example"),
            ],
        );
        assert_eq!(
            find(&gw, Req::get("/index.html").host("web.example")).as_deref(),
            Some("web.shop#0")
        );
        assert_eq!(
            find(&gw, Req::get("/shop.v1.Payment/Charge").host("api.example")).as_deref(),
            Some("grpcroute/api.example#0")
        );
        assert_eq!(
            find(&gw, Req::get("/other").host("api.example")).as_deref(),
            Some("web.shop#0"),
            "what the GRPCRoute does not match falls to the HTTPRoute"
        );
    }

    #[test]
    fn percent_decoding_handles_bad_escapes() {
        assert_eq!(decode("a%20b+c").as_deref(), Some("a b c"));
        assert_eq!(decode("100%").as_deref(), Some("100%"));
        assert_eq!(decode("%zz").as_deref(), Some("%zz"));
        assert_eq!(decode("%ff"), None);
    }
}
