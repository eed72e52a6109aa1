//! `agent-vault ca cert | rotate`: the proxy CA agents trust for HTTPS interception.
//!
//! `cert` needs no login (the certificate is public) and prints the PEM alone on
//! stdout, so `agent-vault ca cert > ca.pem` works; its fingerprint goes to stderr.
//! `rotate` is the owner's: every certificate Envoy holds is re-minted from the new
//! CA, so agents must trust the new one (`agent env` writes it again).

use anyhow::{bail, Context as _};
use clap::Subcommand;
use serde_json::{json, Value};

use super::client::api_path;
use super::context::Context;
use super::output;
use crate::ca::{fingerprint, pem_to_der};

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the proxy CA certificate (PEM) agents trust for HTTPS through the proxy
    Cert,
    /// Replace the proxy CA (owner only); Envoy gets certificates from the new one at
    /// once, so every agent must trust the new CA
    Rotate,
}

/// The proxy CA of the server at `ctx`'s address, checked to be a PEM certificate.
pub fn fetch_pem(ctx: &Context) -> anyhow::Result<String> {
    let pem = ctx
        .anonymous_client()?
        .get_text(&api_path(&["v1", "ca"]))
        .context("cannot fetch the proxy CA")?;
    if pem_to_der(&pem).is_none() {
        bail!(
            "{} answered /v1/ca with something that is not a PEM certificate: is it an \
             agent-vault server with HTTPS interception?",
            ctx.address
        );
    }
    Ok(pem)
}

pub fn run(cmd: CaCommand, ctx: &Context) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Cert => {
            let pem = fetch_pem(ctx)?;
            let sha256 = pem_to_der(&pem).map(|der| fingerprint(&der));
            if ctx.json {
                return output::json(&json!({"pem": pem, "fingerprint_sha256": sha256}));
            }
            output::note(&format!(
                "Proxy CA of {} (SHA-256 {})",
                ctx.address,
                sha256.unwrap_or_default()
            ));
            output::text(&pem)
        }
        CaCommand::Rotate => {
            let rotated = ctx
                .client()?
                .post(&api_path(&["v1", "ca", "rotate"]), &json!({}))?;
            if ctx.json {
                return output::json(&rotated);
            }
            let number = |name: &str| rotated.get(name).and_then(Value::as_u64).unwrap_or(0);
            output::line(&format!(
                "Rotated the proxy CA: generation {}, SHA-256 {}; re-minted {} for Envoy",
                number("generation"),
                output::str_field(&rotated, "fingerprint_sha256"),
                output::count(
                    usize::try_from(number("reminted")).unwrap_or(usize::MAX),
                    "certificate",
                    "certificates"
                ),
            ))?;
            output::note(
                "Agents must trust the new CA now: run `agent-vault agent env NAME` again (it \
                 rewrites the CA bundle), or `agent-vault ca cert`, and restart them.",
            );
            Ok(())
        }
    }
}
