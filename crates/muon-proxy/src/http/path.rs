//! Request paths as routes see them and upstreams get them: dot segments removed
//! (RFC 3986 §5.2.4), so `/public/../admin` is matched — and sent — as `/admin`, like
//! Envoy's `normalize_path` that Istio turns on. Percent-encoding and repeated slashes are
//! left as they came.

/// The path without dot segments; `None` when it has none (the common case: no
/// allocation). Paths not starting with `/` (`*`, authority form) are left alone.
pub fn normalize(path: &str) -> Option<String> {
    if !path.starts_with('/') || !has_dot_segment(path) {
        return None;
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.into_iter().enumerate() {
        match seg {
            "." | ".." => {
                if seg == ".." {
                    out.pop();
                }
                // A trailing dot segment leaves a directory: `/a/b/..` is `/a/`.
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let mut normal = String::with_capacity(path.len());
    for s in &out {
        normal.push('/');
        normal.push_str(s);
    }
    if normal.is_empty() {
        normal.push('/');
    }
    Some(normal)
}

fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|s| s == "." || s == "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_go_as_rfc_3986_says() {
        for (path, want) in [
            ("/a/b/c/./../../g", Some("/a/g")),
            ("/public/../admin", Some("/admin")),
            ("/../../etc", Some("/etc")),
            ("/a/b/..", Some("/a/")),
            ("/a/.", Some("/a/")),
            ("/..", Some("/")),
            ("/.", Some("/")),
            ("/a/./b", Some("/a/b")),
            ("/a/b", None),
            ("/a/.b/..c", None),
            ("/a//b", None),
            ("*", None),
        ] {
            assert_eq!(normalize(path).as_deref(), want, "{path}");
        }
    }
}
