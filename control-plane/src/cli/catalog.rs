//! `agent-vault catalog`: the server's built-in service templates
//! (`GET /v1/service-catalog`, no login), which `vault service add --from-catalog NAME`
//! and proposals (`"catalog": NAME`) use.

use anyhow::Context as _;
use serde_json::Value;

use super::client::api_path;
use super::context::Context;
use super::output;

/// The server's catalog (a JSON array of entries).
pub fn fetch(ctx: &Context) -> anyhow::Result<Value> {
    ctx.anonymous_client()?
        .get(&api_path(&["v1", "service-catalog"]))
        .context("cannot fetch the service catalog")
}

/// The entry called `name`, or an error listing the names there are.
pub fn entry(ctx: &Context, name: &str) -> anyhow::Result<Value> {
    let catalog = fetch(ctx)?;
    let entries = output::items(&catalog);
    if let Some(found) = entries.iter().find(|e| e["service"]["name"] == name) {
        return Ok(found.clone());
    }
    let known: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["service"]["name"].as_str())
        .collect();
    anyhow::bail!(
        "no service catalog entry \"{name}\" (known: {}; `agent-vault catalog` lists them)",
        known.join(", ")
    )
}

pub fn run(ctx: &Context) -> anyhow::Result<()> {
    let catalog = fetch(ctx)?;
    if ctx.json {
        return output::json(&catalog);
    }
    let rows: Vec<Vec<String>> = output::items(&catalog)
        .iter()
        .map(|e| {
            let keys: Vec<&str> = output::items(&e["credentials"])
                .iter()
                .filter_map(|c| c["key"].as_str())
                .collect();
            vec![
                output::cell(e["service"]["name"].as_str().unwrap_or_default()),
                output::cell(e["title"].as_str().unwrap_or_default()),
                output::cell(e["service"]["host"].as_str().unwrap_or_default()),
                output::cell(e["service"]["auth"]["type"].as_str().unwrap_or_default()),
                output::cell(&keys.join(", ")),
            ]
        })
        .collect();
    output::text(&output::table(
        &["NAME", "API", "HOST", "AUTH", "CREDENTIALS"],
        &rows,
    ))
}
