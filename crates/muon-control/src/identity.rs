//! The `Identity` service (proto/muon/v1/identity.proto): certificates for sidecars, join
//! tokens for operators.
//!
//! The identity a certificate names comes from what the caller proves, never from what it
//! says: a join token; a Kubernetes ServiceAccount token (through [`ServiceAccountTokens`],
//! which the Kubernetes registry provides); or, to renew, the mesh certificate the caller
//! presents on its TLS connection. Every refusal is logged and counted
//! (`muon_control_certificates_total{result="refused",reason}`).

use crate::auth::{Caller, Peer};
use crate::ca::{Ca, CaError};
use crate::metrics::Metrics;
use muon_api::v1;
use muon_core::identity::SpiffeId;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

/// A join token's default lifetime.
const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// The longest join token.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// What a token review answers: (namespace, service account), or why not.
pub type Review<'a> = Pin<Box<dyn Future<Output = Result<(String, String), String>> + Send + 'a>>;

/// Checks Kubernetes ServiceAccount tokens (TokenReview); the Kubernetes registry plugs in
/// here.
pub trait ServiceAccountTokens: Send + Sync {
    fn review<'a>(&'a self, token: &'a str) -> Review<'a>;
}

pub struct IdentityService {
    ca: Arc<Ca>,
    metrics: Arc<Metrics>,
    kubernetes: Option<Arc<dyn ServiceAccountTokens>>,
}

impl IdentityService {
    pub fn new(ca: Arc<Ca>, metrics: Arc<Metrics>) -> Self {
        IdentityService {
            ca,
            metrics,
            kubernetes: None,
        }
    }

    /// Accepts Kubernetes ServiceAccount tokens, checked by `tokens`.
    pub fn with_kubernetes(mut self, tokens: Arc<dyn ServiceAccountTokens>) -> Self {
        self.kubernetes = Some(tokens);
        self
    }

    fn refuse(&self, reason: &'static str, peer: &str, message: String) -> Status {
        warn!(reason, %peer, "certificate refused: {message}");
        self.metrics.certificate("refused", reason);
        Status::unauthenticated(message)
    }

    /// The identity the caller proved.
    async fn proven(&self, req: &Request<v1::CertifyRequest>) -> Result<SpiffeId, Status> {
        use v1::certify_request::Credential;
        let peer = Peer::of(req);
        match &req.get_ref().credential {
            Some(Credential::JoinToken(t)) => self
                .ca
                .check_token(t)
                .map_err(|e| self.refuse(e.reason(), &peer.addr, e.to_string())),
            Some(Credential::KubernetesToken(t)) => {
                let Some(k) = &self.kubernetes else {
                    return Err(self.refuse(
                        "kubernetes-unavailable",
                        &peer.addr,
                        "this control plane does not check Kubernetes tokens (it runs outside Kubernetes): use a join token".into(),
                    ));
                };
                let (ns, sa) = k
                    .review(t)
                    .await
                    .map_err(|e| self.refuse("kubernetes-token", &peer.addr, e))?;
                SpiffeId::new(self.ca.trust_domain(), &ns, &sa)
                    .map_err(|e| self.refuse("kubernetes-token", &peer.addr, e))
            }
            None => match peer.caller {
                Caller::Workload(id) => Ok(id),
                _ => Err(self.refuse(
                    "no-credential",
                    &peer.addr,
                    "a credential is required: a join token (muonctl token create), or, to renew, the mesh certificate on the connection".into(),
                )),
            },
        }
    }
}

#[tonic::async_trait]
impl v1::identity_server::Identity for IdentityService {
    async fn certify(
        &self,
        req: Request<v1::CertifyRequest>,
    ) -> Result<Response<v1::CertifyResponse>, Status> {
        let id = self.proven(&req).await?;
        let r = req.into_inner();
        let ttl = (r.ttl_seconds > 0).then(|| Duration::from_secs(r.ttl_seconds.into()));
        let certified = self.ca.certify(&r.csr_pem, &id, ttl).map_err(|e| match e {
            CaError::Invalid(m) => {
                warn!(identity = %id, "certificate refused: {m}");
                self.metrics.certificate("refused", "bad-csr");
                Status::invalid_argument(m)
            }
            CaError::Mismatch(m) => {
                warn!(identity = %id, "certificate refused: {m}");
                self.metrics.certificate("refused", "identity-mismatch");
                Status::permission_denied(m)
            }
            e => Status::internal(e.to_string()),
        })?;
        let not_after = certified
            .not_after
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        info!(identity = %id, not_after, "certificate issued");
        self.metrics.certificate("issued", "");
        Ok(Response::new(v1::CertifyResponse {
            cert_chain_pem: certified.chain,
            trust_bundle_pem: certified.bundle,
            identity: id.to_string(),
            not_after_unix: not_after as i64,
        }))
    }

    async fn create_join_token(
        &self,
        req: Request<v1::CreateJoinTokenRequest>,
    ) -> Result<Response<v1::CreateJoinTokenResponse>, Status> {
        crate::auth::require_admin(&req)?;
        let r = req.into_inner();
        let id = SpiffeId::new(self.ca.trust_domain(), &r.namespace, &r.service_account)
            .map_err(Status::invalid_argument)?;
        let ttl = match r.ttl_seconds {
            0 => TOKEN_TTL,
            s => Duration::from_secs(s.into()),
        };
        if ttl > MAX_TOKEN_TTL {
            return Err(Status::invalid_argument(format!(
                "a join token lives at most {} days",
                MAX_TOKEN_TTL.as_secs() / 86_400
            )));
        }
        let (token, expires) = self.ca.create_token(&id, ttl);
        info!(identity = %id, ttl_s = ttl.as_secs(), "join token created");
        Ok(Response::new(v1::CreateJoinTokenResponse {
            token,
            identity: id.to_string(),
            expires_unix: expires
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs() as i64,
        }))
    }
}
