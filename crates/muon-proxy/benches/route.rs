//! Route matching on its own (`cargo bench -p muon-proxy --bench route`): a table of 100
//! HTTPRoute rules, the Gateway API's precedence applied at compile time, and `find` for a
//! request that matches the last rule tried, one in the middle, and one that matches none.
//! The target is under 1 µs per request for 100 routes.

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use muon_api::v1;
use muon_proxy::route::{Request, RouteDef, Router, RouterBuilder};
use std::hint::black_box;
use std::sync::Arc;

/// 100 routes of one rule each: prefixes, exact paths, header and query matches, a regex.
fn router() -> Router<usize> {
    let mut b = RouterBuilder::new(false);
    for i in 0..100 {
        let mut m = v1::RouteMatch {
            path_type: if i % 3 == 0 { "Exact" } else { "PathPrefix" }.into(),
            path_value: format!("/api/v{}/service-{i}/items", i % 7),
            ..Default::default()
        };
        if i % 4 == 0 {
            m.headers.push(v1::HeaderMatch {
                name: "x-tenant".into(),
                value: format!("tenant-{i}"),
                r#type: "Exact".into(),
            });
        }
        if i % 10 == 0 {
            m.query_params.push(v1::HeaderMatch {
                name: "version".into(),
                value: format!("{i}"),
                r#type: "Exact".into(),
            });
        }
        if i == 50 {
            m = v1::RouteMatch {
                path_type: "RegularExpression".into(),
                path_value: "/regex/[a-z]+/[0-9]+".into(),
                ..Default::default()
            };
        }
        let route = v1::Route {
            name: format!("route-{i:03}"),
            namespace: "shop".into(),
            kind: "HTTPRoute".into(),
            rules: vec![v1::RouteRule {
                matches: vec![m],
                backends: vec![v1::BackendRef {
                    service: "web.shop".into(),
                    port: 80,
                    weight: 1,
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let def = RouteDef::from_proto(&format!("route-{i:03}.shop"), &route).expect("valid route");
        b.add(Arc::new(def), vec![Arc::new(i)]);
    }
    b.build()
}

fn bench(c: &mut Criterion) {
    let r = router();
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", HeaderValue::from_static("tenant-96"));
    headers.insert("user-agent", HeaderValue::from_static("curl/8"));
    headers.insert("accept", HeaderValue::from_static("*/*"));
    let req = |path: &'static str, query: Option<&'static str>| Request {
        method: &Method::GET,
        path,
        query,
        headers: &headers,
        host: None,
    };
    let last = req("/api/v6/service-97/items/42", None);
    let middle = req("/regex/abc/123", None);
    let none = req("/nothing/here", Some("a=1&b=2"));
    assert!(r.find(&last).is_some() && r.find(&middle).is_some() && r.find(&none).is_none());
    let mut g = c.benchmark_group("route_find_100_routes");
    g.bench_function("match_late", |b| {
        b.iter(|| r.find(black_box(&last)).map(|f| **f.target))
    });
    g.bench_function("match_regex", |b| {
        b.iter(|| r.find(black_box(&middle)).map(|f| **f.target))
    });
    g.bench_function("no_match", |b| {
        b.iter(|| r.find(black_box(&none)).map(|f| **f.target))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
