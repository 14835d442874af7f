//! `muonctl apply -f FILE|-` and `muonctl delete (-f FILE | KIND NAME [-n NS])`.
//!
//! Every object of every file goes into ONE `Management.Apply`, so the control plane
//! applies all of them or none (it validates them all first). Output, one line per object:
//! `service/web.default created|configured|unchanged` (`deleted` for delete).
//!
//! When the answer is lost (the connection broke after the request was sent), the apply may
//! or may not have been stored. An apply sends whole objects, so sending the same apply again
//! is safe, and its answer tells the truth: muonctl applies once more on a new connection
//! (saying so on stderr; what the first attempt stored shows as `unchanged`). If that fails
//! too, or the answer did not come within `--timeout` (a control plane that is still working
//! on it must not get the same work twice), the error says the apply may have been stored and
//! which `muonctl get` shows it, as kubectl says a request "may still be processing". A delete
//! is not sent again (a second one would find nothing to delete and refuse the whole delete);
//! it gets the same "may have been" message.

use crate::control::{self, Failure, Target};
use crate::get::kind_for;
use crate::manifest;
use anyhow::{anyhow, bail, Result};
use clap::Args;
use muon_api::v1::{ApplyRequest, DeleteRequest, Object, ObjectRef};

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Manifest files (multi-document YAML); `-` reads stdin. Repeatable.
    #[arg(short = 'f', long = "file", required = true)]
    pub files: Vec<String>,
    /// Let the control plane validate, but store nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Delete the objects named in these manifests.
    #[arg(short = 'f', long = "file", conflicts_with_all = ["kind", "name"])]
    pub files: Vec<String>,
    /// service | workload | httproute (plural and short forms accepted).
    #[arg(required_unless_present = "files")]
    pub kind: Option<String>,
    #[arg(required_unless_present = "files")]
    pub name: Option<String>,
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
}

fn read_all(files: &[String]) -> Result<Vec<Object>> {
    let mut objects = Vec::new();
    for f in files {
        let (name, text) = manifest::read(f)?;
        objects.extend(manifest::parse(&name, &text)?.into_iter().map(|d| d.object));
    }
    Ok(objects)
}

/// `service/web.shop created`
pub fn line(r: &ObjectRef) -> String {
    let ns = if r.namespace.is_empty() {
        String::new()
    } else {
        format!(".{}", r.namespace)
    };
    format!("{}/{}{} {}", r.kind.to_lowercase(), r.name, ns, r.result)
}

/// The `muonctl get` commands that show whether these objects are stored: one object by name,
/// else each kind (in its namespace when all objects of the kind share one).
pub fn check_with(refs: &[ObjectRef]) -> String {
    let ns = |n: &str| {
        if n.is_empty() {
            "default".to_owned()
        } else {
            n.to_owned()
        }
    };
    if let [r] = refs {
        return format!(
            "`muonctl get {} {} -n {}`",
            r.kind.to_lowercase(),
            r.name,
            ns(&r.namespace)
        );
    }
    let mut kinds: Vec<(String, Vec<String>)> = Vec::new();
    for r in refs {
        match kinds.iter_mut().find(|(k, _)| *k == r.kind) {
            Some((_, namespaces)) => namespaces.push(ns(&r.namespace)),
            None => kinds.push((r.kind.clone(), vec![ns(&r.namespace)])),
        }
    }
    kinds
        .into_iter()
        .map(|(kind, mut namespaces)| {
            let kind = kind.to_lowercase();
            let plural = match kind.strip_suffix('y') {
                Some(stem) => format!("{stem}ies"),
                None => format!("{kind}s"),
            };
            namespaces.sort();
            namespaces.dedup();
            match namespaces.as_slice() {
                [one] => format!("`muonctl get {plural} -n {one}`"),
                _ => format!("`muonctl get {plural}`"),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn refs_of(objects: &[Object]) -> Vec<ObjectRef> {
    objects
        .iter()
        .map(|o| {
            let meta = o.metadata.clone().unwrap_or_default();
            ObjectRef {
                kind: o.kind.clone(),
                namespace: meta.namespace,
                name: meta.name,
                result: String::new(),
            }
        })
        .collect()
}

pub fn apply(target: &Target, args: ApplyArgs) -> Result<i32> {
    let objects = read_all(&args.files)?;
    let check = check_with(&refs_of(&objects));
    let request = ApplyRequest {
        objects,
        dry_run: args.dry_run,
    };
    let send = |mut c: control::Client| {
        let request = request.clone();
        async move { c.apply(request).await }
    };
    let may_have = |e: anyhow::Error| {
        if args.dry_run {
            e
        } else {
            anyhow!("{e:#}; the apply may have been stored: check with {check}")
        }
    };
    let resp = control::block_on(async {
        let conn = control::connect(target).await?;
        match conn.try_call(send).await {
            Ok(resp) => Ok(resp),
            Err(Failure::Lost(cause)) => {
                let note = if args.dry_run {
                    ""
                } else {
                    " (objects the first attempt stored show as unchanged)"
                };
                eprintln!(
                    "muonctl: the connection to the control plane at {} broke before it answered the apply ({cause}); applying again on a new connection{note}",
                    conn.url()
                );
                let conn = control::connect(target).await.map_err(may_have)?;
                conn.try_call(send)
                    .await
                    .map_err(|e| may_have(conn.explain("apply", e)))
            }
            Err(e @ Failure::TimedOut) => Err(may_have(conn.explain("apply", e))),
            Err(e) => Err(conn.explain("apply", e)),
        }
    })??;
    let suffix = if args.dry_run { " (dry run)" } else { "" };
    for r in &resp.applied {
        println!("{}{suffix}", line(r));
    }
    Ok(0)
}

pub fn delete(target: &Target, args: DeleteArgs) -> Result<i32> {
    let refs: Vec<ObjectRef> = if args.files.is_empty() {
        let (Some(kind), Some(name)) = (args.kind, args.name) else {
            bail!("name what to delete: muonctl delete KIND NAME [-n NS], or -f FILE");
        };
        vec![ObjectRef {
            kind: kind_for(&kind)?.to_owned(),
            namespace: args.namespace,
            name,
            result: String::new(),
        }]
    } else {
        refs_of(&read_all(&args.files)?)
    };
    let check = check_with(&refs);
    let resp = control::block_on(async {
        let conn = control::connect(target).await?;
        let request = DeleteRequest { objects: refs };
        match conn
            .try_call(|mut c| async move { c.delete(request).await })
            .await
        {
            Ok(resp) => Ok(resp),
            Err(e @ (Failure::Lost(_) | Failure::TimedOut)) => Err(anyhow!(
                "{:#}; the delete may have been done: check with {check}",
                conn.explain("delete", e)
            )),
            Err(e) => Err(conn.explain("delete", e)),
        }
    })??;
    for r in &resp.deleted {
        println!("{}", line(r));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_read_like_kubectl() {
        let r = ObjectRef {
            kind: "Service".into(),
            namespace: "default".into(),
            name: "web".into(),
            result: "created".into(),
        };
        assert_eq!(line(&r), "service/web.default created");
        let r = ObjectRef {
            kind: "HTTPRoute".into(),
            namespace: "shop".into(),
            name: "r".into(),
            result: "unchanged".into(),
        };
        assert_eq!(line(&r), "httproute/r.shop unchanged");
    }

    fn r(kind: &str, namespace: &str, name: &str) -> ObjectRef {
        ObjectRef {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
            result: String::new(),
        }
    }

    #[test]
    fn a_lost_answer_says_which_get_shows_the_objects() {
        assert_eq!(
            check_with(&[r("Service", "", "web")]),
            "`muonctl get service web -n default`"
        );
        assert_eq!(
            check_with(&[
                r("Service", "shop", "web"),
                r("Workload", "shop", "web-0"),
                r("Workload", "", "web-1"),
                r("AuthorizationPolicy", "shop", "p"),
            ]),
            "`muonctl get services -n shop`, `muonctl get workloads`, `muonctl get authorizationpolicies -n shop`"
        );
        // Every suggested word is one `get` knows.
        for kind in [
            "service",
            "workloads",
            "httproutes",
            "grpcroutes",
            "gateways",
            "authorizationpolicies",
        ] {
            assert!(kind_for(kind).is_ok(), "{kind}");
        }
    }
}
