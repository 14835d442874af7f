//! What the CA asks of Kubernetes: whether a ServiceAccount token is genuine (TokenReview),
//! and the root every replica signs with (a Secret).
//!
//! A sidecar presents a projected token of audience [`TOKEN_AUDIENCE`]; the API server
//! reviews it for that audience only, so a token meant for anything else (the default
//! ServiceAccount token, another service's audience) is refused. Only a ServiceAccount
//! (`system:serviceaccount:<ns>:<sa>`) gets an identity.
//!
//! The root lives in the Secret `--ca-secret` (keys [`SECRET_CERT`], [`SECRET_KEY`]). At
//! start a control plane reads it; when it is absent, it creates it from its own CA. It only
//! ever creates, never updates: when replicas race, the API server accepts one create and
//! answers the others 409 AlreadyExists, and they read the winner's root and use it.
//!
//! Injected sidecars check the control plane's certificate against the ConfigMap
//! [`CA_CONFIGMAP`] (key [`CA_KEY`]) of their namespace; [`publish_bundle`] keeps it in every
//! namespace with meshed pods.

use crate::ca::Root;
use crate::identity::{Review, ServiceAccountTokens};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

pub use muon_inject::template::{CA_CONFIGMAP, CA_KEY, TOKEN_AUDIENCE};

/// The Secret's key holding the signing CA's certificate (then its chain), PEM.
pub const SECRET_CERT: &str = "ca.crt";
/// The Secret's key holding the CA's private key, PEM.
pub const SECRET_KEY: &str = "ca.key";

/// A TokenReview's answer is awaited this long at most.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// The prefix of a ServiceAccount's username.
const SERVICE_ACCOUNT_USER: &str = "system:serviceaccount:";

/// Reviews ServiceAccount tokens with the API server.
pub struct TokenReviewer {
    api: Api<TokenReview>,
}

impl TokenReviewer {
    pub fn new(client: kube::Client) -> TokenReviewer {
        TokenReviewer {
            api: Api::all(client),
        }
    }

    async fn check(&self, token: &str) -> Result<(String, String), String> {
        let token = token.trim();
        if token.is_empty() {
            return Err("the Kubernetes token is empty".into());
        }
        let review = TokenReview {
            metadata: ObjectMeta::default(),
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![TOKEN_AUDIENCE.to_string()]),
            },
            status: None,
        };
        let answer = tokio::time::timeout(
            REVIEW_TIMEOUT,
            self.api.create(&PostParams::default(), &review),
        )
        .await
        .map_err(|_| {
            warn!("TokenReview timed out");
            format!(
                "the Kubernetes token could not be reviewed (TokenReview: no answer within {} s)",
                REVIEW_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| {
            warn!(error = %e, "TokenReview failed");
            format!("the Kubernetes token could not be reviewed (TokenReview: {e})")
        })?;
        reviewed(answer)
    }
}

impl ServiceAccountTokens for TokenReviewer {
    fn review<'a>(&'a self, token: &'a str) -> Review<'a> {
        Box::pin(self.check(token))
    }
}

/// What a TokenReview's answer proves: (namespace, service account), or why not.
pub fn reviewed(answer: TokenReview) -> Result<(String, String), String> {
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        let why = status.error.filter(|e| !e.is_empty());
        return Err(match why {
            Some(e) => format!("the Kubernetes token was not authenticated: {e}"),
            None => "the Kubernetes token was not authenticated".into(),
        });
    }
    // The API server answers the audiences the token is valid for among those asked for.
    let audiences = status.audiences.unwrap_or_default();
    if !audiences.iter().any(|a| a == TOKEN_AUDIENCE) {
        return Err(format!(
            "the Kubernetes token is not for audience {TOKEN_AUDIENCE:?} (it is for {audiences:?}): \
             use the projected token injection mounts"
        ));
    }
    let user = status.user.and_then(|u| u.username).unwrap_or_default();
    user.strip_prefix(SERVICE_ACCOUNT_USER)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
        .map(|(ns, sa)| (ns.to_string(), sa.to_string()))
        .ok_or_else(|| format!("the Kubernetes token is {user:?}'s, not a ServiceAccount's"))
}

/// The root every replica shares: the Secret `namespace/name`'s, or, when there is none yet,
/// `own`, stored there (create only; when another replica's create won, its root).
pub async fn shared_root(
    client: kube::Client,
    namespace: &str,
    name: &str,
    own: Root,
) -> anyhow::Result<Root> {
    use anyhow::Context;
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let origin = format!("Secret {namespace}/{name}");
    let read = || async {
        api.get_opt(name)
            .await
            .with_context(|| format!("reading the CA's {origin}"))
    };
    if let Some(secret) = read().await? {
        return from_secret(&secret, &origin, &own);
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_string(),
                "muon".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (
                SECRET_CERT.to_string(),
                ByteString(own.chain.clone().into_bytes()),
            ),
            (
                SECRET_KEY.to_string(),
                ByteString(own.key.clone().into_bytes()),
            ),
        ])),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            info!(secret = %origin, from = %own.origin, "stored the mesh's root CA for every replica");
            Ok(Root { origin, ..own })
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            info!(secret = %origin, "another replica stored the root CA first; using it");
            let secret = read()
                .await?
                .with_context(|| format!("the CA's {origin} was created, then vanished"))?;
            from_secret(&secret, &origin, &own)
        }
        Err(e) => Err(e).with_context(|| format!("creating the CA's {origin}")),
    }
}

/// The root a Secret holds.
fn from_secret(secret: &Secret, origin: &str, own: &Root) -> anyhow::Result<Root> {
    let field = |key: &str| -> anyhow::Result<String> {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(|s| s.clone().into_bytes())
            })
            .filter(|b| !b.is_empty())
            .ok_or_else(|| anyhow::anyhow!("the CA's {origin} has no key {key:?}"))?;
        String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{origin}: {key:?} is not PEM"))
    };
    let root = Root {
        chain: field(SECRET_CERT)?,
        key: field(SECRET_KEY)?,
        origin: origin.to_string(),
        given: false,
    };
    // A CA given by flags that differs from the shared one would be silently ignored.
    if own.given && root.chain != own.chain {
        anyhow::bail!(
            "the CA's {origin} holds another CA than {}: delete the Secret to replace it, or drop --ca-cert/--ca-key",
            own.origin
        );
    }
    Ok(root)
}

/// How long a namespace whose ConfigMap could not be written waits for another try.
const PUBLISH_RETRY: Duration = Duration::from_secs(10);

/// Keeps the ConfigMap [`CA_CONFIGMAP`] with `bundle` in every namespace `namespaces` names,
/// until `shutdown` (or `namespaces` closes). Each namespace is written once per start (more
/// only if it failed): created when absent, replaced when it holds another bundle.
pub async fn publish_bundle(
    client: kube::Client,
    bundle: String,
    mut namespaces: watch::Receiver<BTreeSet<String>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut published: BTreeSet<String> = BTreeSet::new();
    loop {
        let wanted = namespaces.borrow_and_update().clone();
        let mut failed = false;
        for ns in wanted.difference(&published).cloned().collect::<Vec<_>>() {
            match publish(&client, &ns, &bundle).await {
                Ok(()) => {
                    published.insert(ns);
                }
                Err(e) => {
                    failed = true;
                    warn!(namespace = %ns, error = %e, "cannot publish the trust bundle (ConfigMap {CA_CONFIGMAP}); retrying");
                }
            }
        }
        tokio::select! {
            changed = namespaces.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(PUBLISH_RETRY), if failed => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Makes `namespace`'s ConfigMap hold `bundle`.
async fn publish(client: &kube::Client, namespace: &str, bundle: &str) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let want = BTreeMap::from([(CA_KEY.to_string(), bundle.to_string())]);
    match api.get_opt(CA_CONFIGMAP).await? {
        Some(cm)
            if cm
                .data
                .as_ref()
                .and_then(|d| d.get(CA_KEY))
                .map(String::as_str)
                == Some(bundle) =>
        {
            Ok(())
        }
        Some(mut cm) => {
            cm.data = Some(want);
            api.replace(CA_CONFIGMAP, &PostParams::default(), &cm)
                .await?;
            info!(
                namespace,
                "updated the trust bundle (ConfigMap {CA_CONFIGMAP})"
            );
            Ok(())
        }
        None => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(CA_CONFIGMAP.to_string()),
                    namespace: Some(namespace.to_string()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/part-of".to_string(),
                        "muon".to_string(),
                    )])),
                    ..ObjectMeta::default()
                },
                data: Some(want),
                ..ConfigMap::default()
            };
            api.create(&PostParams::default(), &cm).await?;
            info!(
                namespace,
                "published the trust bundle (ConfigMap {CA_CONFIGMAP})"
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};

    fn answer(authenticated: bool, user: &str, audiences: &[&str]) -> TokenReview {
        TokenReview {
            status: Some(TokenReviewStatus {
                authenticated: Some(authenticated),
                audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
                user: Some(UserInfo {
                    username: Some(user.into()),
                    ..UserInfo::default()
                }),
                error: None,
            }),
            ..TokenReview::default()
        }
    }

    #[test]
    fn only_an_authenticated_service_account_token_for_muon_ca_proves_an_identity() {
        assert_eq!(
            reviewed(answer(true, "system:serviceaccount:shop:web", &["muon-ca"])),
            Ok(("shop".into(), "web".into()))
        );
        let refused = [
            answer(false, "system:serviceaccount:shop:web", &["muon-ca"]),
            answer(true, "system:serviceaccount:shop:web", &["vault"]),
            answer(true, "system:serviceaccount:shop:web", &[]),
            answer(true, "alice", &["muon-ca"]),
            answer(true, "system:node:worker-1", &["muon-ca"]),
            answer(true, "system:serviceaccount:shop", &["muon-ca"]),
            answer(true, "system:serviceaccount::web", &["muon-ca"]),
            TokenReview::default(),
        ];
        for a in refused {
            assert!(reviewed(a.clone()).is_err(), "{a:?}");
        }
    }
}
