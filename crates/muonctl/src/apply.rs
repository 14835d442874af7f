//! `muonctl apply -f FILE|-` and `muonctl delete (-f FILE | KIND NAME [-n NS])`.
//!
//! Every object of every file goes into ONE `Management.Apply`, so the control plane
//! applies all of them or none (it validates them all first). Output, one line per object:
//! `service/web.default created|configured|unchanged` (`deleted` for delete).

use crate::control::{self, status_error};
use crate::get::kind_for;
use crate::manifest;
use anyhow::{bail, Result};
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

pub fn apply(addr: &str, args: ApplyArgs) -> Result<i32> {
    let objects = read_all(&args.files)?;
    control::block_on(async {
        let mut client = control::connect(addr).await?;
        let resp = client
            .apply(ApplyRequest {
                objects,
                dry_run: args.dry_run,
            })
            .await
            .map_err(|s| status_error(addr, "apply", s))?
            .into_inner();
        let suffix = if args.dry_run { " (dry run)" } else { "" };
        for r in &resp.applied {
            println!("{}{suffix}", line(r));
        }
        Ok(0)
    })?
}

pub fn delete(addr: &str, args: DeleteArgs) -> Result<i32> {
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
        read_all(&args.files)?
            .into_iter()
            .map(|o| {
                let meta = o.metadata.unwrap_or_default();
                ObjectRef {
                    kind: o.kind,
                    namespace: meta.namespace,
                    name: meta.name,
                    result: String::new(),
                }
            })
            .collect()
    };
    control::block_on(async {
        let mut client = control::connect(addr).await?;
        let resp = client
            .delete(DeleteRequest { objects: refs })
            .await
            .map_err(|s| status_error(addr, "delete", s))?
            .into_inner();
        for r in &resp.deleted {
            println!("{}", line(r));
        }
        Ok(0)
    })?
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
}
