//! `muonctl token create`: a join token, with which a sidecar outside Kubernetes gets its
//! first mesh certificate (`muon-proxy --join-token` / `--join-token-file`).

use crate::control::{self, Target};
use anyhow::Result;
use muon_api::v1;
use std::time::Duration;

#[derive(clap::Subcommand)]
pub enum TokenCmd {
    /// A join token for one namespace and service account (needs an administrator).
    Create(CreateArgs),
}

#[derive(clap::Args)]
pub struct CreateArgs {
    #[arg(short, long, default_value = "default")]
    namespace: String,
    /// The service account the sidecar's certificate will name.
    #[arg(long)]
    service_account: String,
    /// How long the token can be used (the certificate lives --cert-ttl of the control plane).
    #[arg(long, default_value = "1h", value_parser = muon_core::duration::parse_flag_positive)]
    ttl: Duration,
}

pub fn run(target: &Target, cmd: TokenCmd) -> Result<i32> {
    let TokenCmd::Create(args) = cmd;
    control::block_on(async {
        let conn = control::connect(target).await?;
        let mut client = v1::identity_client::IdentityClient::new(conn.channel.clone());
        let req = v1::CreateJoinTokenRequest {
            namespace: args.namespace.clone(),
            service_account: args.service_account.clone(),
            ttl_seconds: u32::try_from(args.ttl.as_secs()).unwrap_or(u32::MAX),
        };
        let answer = conn
            .try_call(|_| async move { client.create_join_token(req).await })
            .await
            .map_err(|f| conn.explain("token create", f))?;
        println!("{}", answer.token);
        eprintln!(
            "a join token for {} (valid for {})",
            answer.identity,
            muon_core::duration::format(args.ttl)
        );
        Ok(0)
    })?
}
