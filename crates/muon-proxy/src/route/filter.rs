//! What route filters do, as pure functions of the request or response parts they change:
//! header modifiers, path and host rewrites, and redirect locations (Gateway API
//! `HTTPRouteFilter`). The HTTP layer calls these; nothing here does I/O.

use super::{HeaderModifier, PathModifier, Redirect};
use http::HeaderMap;

/// Applies a `RequestHeaderModifier` or `ResponseHeaderModifier`: `set` replaces, `add`
/// appends a value, `remove` deletes.
pub fn modify_headers(m: &HeaderModifier, headers: &mut HeaderMap) {
    for (name, value) in &m.set {
        headers.insert(name.clone(), value.clone());
    }
    for (name, value) in &m.add {
        headers.append(name.clone(), value.clone());
    }
    for name in &m.remove {
        headers.remove(name);
    }
}

/// The path after a `ReplaceFullPath` or `ReplacePrefixMatch` (element-wise, as the Gateway
/// API's table: `/foo/bar` with prefix `/foo` replaced by `/xyz` is `/xyz/bar`, by `` is
/// `/bar`; `/foo` by `/` is `/`).
pub fn rewrite_path(m: &PathModifier, path: &str) -> String {
    match m {
        PathModifier::Full(p) => p.clone(),
        PathModifier::Prefix { matched, with } => {
            let rest = path.strip_prefix(matched.as_str()).unwrap_or(path);
            let out = format!("{}{rest}", with.trim_end_matches('/'));
            match out.is_empty() {
                true => "/".to_string(),
                false => out,
            }
        }
    }
}

/// The request as the redirect sees it.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub scheme: &'a str,
    /// Without the port.
    pub host: &'a str,
    /// The port the request arrived on (the listener's, or the service's).
    pub port: u16,
    pub path: &'a str,
    pub query: Option<&'a str>,
}

/// The `Location` of a `RequestRedirect`. Without a port in the filter, a changed scheme
/// gets its well-known port and an unchanged one keeps the request's; a scheme's default
/// port is left out of the URL.
pub fn redirect_location(r: &Redirect, o: &Origin<'_>) -> String {
    let scheme = r.scheme.as_deref().unwrap_or(o.scheme);
    let host = r.hostname.as_deref().unwrap_or(o.host);
    let default_port = |s: &str| if s == "https" { 443 } else { 80 };
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => p,
        (None, Some(s)) => default_port(s),
        (None, None) => o.port,
    };
    let path = match &r.path {
        Some(m) => rewrite_path(m, o.path),
        None => o.path.to_string(),
    };
    let mut out = format!("{scheme}://{host}");
    if port != default_port(scheme) {
        out.push_str(&format!(":{port}"));
    }
    out.push_str(&path);
    if let Some(q) = o.query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, HeaderValue, StatusCode};

    fn prefix(matched: &str, with: &str) -> PathModifier {
        PathModifier::Prefix {
            matched: matched.trim_end_matches('/').into(),
            with: with.into(),
        }
    }

    #[test]
    fn prefix_replacement_follows_the_gateway_api_table() {
        for (path, matched, with, want) in [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
            ("/strip-prefix/three", "/strip-prefix", "/", "/three"),
        ] {
            assert_eq!(
                rewrite_path(&prefix(matched, with), path),
                want,
                "{path} {matched} {with}"
            );
        }
        assert_eq!(
            rewrite_path(&PathModifier::Full("/new".into()), "/old/x"),
            "/new"
        );
    }

    #[test]
    fn header_modifiers_set_add_and_remove() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("foo"));
        h.insert("x-b", HeaderValue::from_static("foo"));
        h.insert("x-gone", HeaderValue::from_static("1"));
        let n = |s: &'static str| HeaderName::from_static(s);
        let v = |s: &'static str| HeaderValue::from_static(s);
        modify_headers(
            &HeaderModifier {
                set: vec![(n("x-a"), v("bar"))],
                add: vec![(n("x-b"), v("bar"))],
                remove: vec![n("x-gone")],
            },
            &mut h,
        );
        assert_eq!(h.get_all("x-a").iter().collect::<Vec<_>>(), ["bar"]);
        assert_eq!(h.get_all("x-b").iter().collect::<Vec<_>>(), ["foo", "bar"]);
        assert!(!h.contains_key("x-gone"));
    }

    #[test]
    fn redirect_locations_pick_scheme_host_port_and_path() {
        let o = Origin {
            scheme: "http",
            host: "shop.example",
            port: 8080,
            path: "/old/cart",
            query: Some("id=7"),
        };
        let r = |scheme: Option<&str>, port: Option<u16>| Redirect {
            scheme: scheme.map(Into::into),
            hostname: None,
            path: None,
            port,
            status: StatusCode::FOUND,
        };
        assert_eq!(
            redirect_location(&r(None, None), &o),
            "http://shop.example:8080/old/cart?id=7"
        );
        assert_eq!(
            redirect_location(&r(Some("https"), None), &o),
            "https://shop.example/old/cart?id=7"
        );
        assert_eq!(
            redirect_location(&r(Some("https"), Some(8443)), &o),
            "https://shop.example:8443/old/cart?id=7"
        );
        let moved = Redirect {
            hostname: Some("new.example".into()),
            path: Some(prefix("/old", "/new")),
            port: Some(80),
            ..r(None, None)
        };
        assert_eq!(
            redirect_location(&moved, &o),
            "http://new.example/new/cart?id=7"
        );
    }
}
