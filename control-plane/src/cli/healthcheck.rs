//! `agent-vault healthcheck`: the container probe. `GET <address>/health`, exit 0 when
//! the server answers `200 {"status":"ok"}`, else one line on stderr and exit 1.
//!
//! It is the binary itself so the runtime image needs no shell, curl or wget. It reads
//! no session and sends no token: `/health` is public.

use std::time::Duration;

use anyhow::{bail, Context as _};

use super::DEFAULT_ADDRESS;

/// `agent-vault healthcheck` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct HealthcheckArgs {
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub timeout: u64,
}

/// Probes `<address>/health` (`--address` / `AGENT_VAULT_ADDR`, else the default).
pub fn run(address: Option<&str>, args: &HealthcheckArgs) -> anyhow::Result<()> {
    let base = address.unwrap_or(DEFAULT_ADDRESS).trim_end_matches('/');
    let url = format!("{base}/health");
    let client = reqwest::blocking::Client::builder()
        // A probe must reach the server itself, never a proxy from the environment.
        .no_proxy()
        .timeout(Duration::from_secs(args.timeout))
        .build()
        .context("cannot create an HTTP client")?;
    let response = client
        .get(&url)
        .send()
        .with_context(|| format!("unhealthy: no answer from {url}"))?;
    let status = response.status();
    let body: serde_json::Value = response.json().unwrap_or_default();
    if !status.is_success() || body["status"] != "ok" {
        bail!("unhealthy: {url} answered {status} {body}");
    }
    println!("healthy: {url}");
    Ok(())
}
