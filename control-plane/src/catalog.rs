//! The service catalog: built-in templates for common APIs, so that a human adds
//! "Stripe" (`vault service add --from-catalog stripe`) and an agent proposes it
//! (`{"name": "stripe", "catalog": "stripe"}` in a proposal) without looking up hosts
//! and header formats. Public (`GET /v1/service-catalog`, no login): it holds no
//! secret, only which credential keys each template expects and where to get them.
//!
//! Each entry is an ordinary [`Service`], validated by `agent-vault-rules` like any
//! other (a unit test checks every entry), plus the credential slots a proposal for it
//! needs. What a template says about an API (host, header) was checked against the
//! API's public documentation; `docs` names the page.

use std::sync::OnceLock;

use agent_vault_rules::Service;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One credential a template reads, and where a human gets it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogCredential {
    pub key: String,
    pub description: String,
    pub obtain: String,
}

/// A template: the service (its `name` is the entry's name) and its credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    /// What the API is, for the listing.
    pub title: String,
    pub service: Service,
    pub credentials: Vec<CatalogCredential>,
    /// The API documentation the template follows.
    pub docs: String,
}

/// The templates, as JSON: the same shapes the API returns.
const CATALOG_JSON: &str = r#"[
  {"title": "OpenAI API", "docs": "https://platform.openai.com/docs/api-reference/authentication",
   "service": {"name": "openai", "host": "api.openai.com",
               "auth": {"type": "bearer", "token": "OPENAI_API_KEY"}},
   "credentials": [{"key": "OPENAI_API_KEY", "description": "OpenAI API key",
                    "obtain": "https://platform.openai.com/api-keys"}]},
  {"title": "Anthropic API", "docs": "https://docs.anthropic.com/en/api/overview",
   "service": {"name": "anthropic", "host": "api.anthropic.com",
               "auth": {"type": "api-key", "key": "ANTHROPIC_API_KEY", "header": "x-api-key"}},
   "credentials": [{"key": "ANTHROPIC_API_KEY", "description": "Anthropic API key",
                    "obtain": "https://console.anthropic.com/settings/keys"}]},
  {"title": "GitHub REST API", "docs": "https://docs.github.com/en/rest/authentication/authenticating-to-the-rest-api",
   "service": {"name": "github", "host": "api.github.com",
               "auth": {"type": "bearer", "token": "GITHUB_TOKEN"}},
   "credentials": [{"key": "GITHUB_TOKEN", "description": "GitHub fine-grained personal access token",
                    "obtain": "https://github.com/settings/personal-access-tokens"}]},
  {"title": "Stripe API", "docs": "https://docs.stripe.com/api/authentication",
   "service": {"name": "stripe", "host": "api.stripe.com",
               "auth": {"type": "bearer", "token": "STRIPE_KEY"}},
   "credentials": [{"key": "STRIPE_KEY", "description": "Stripe secret or restricted key",
                    "obtain": "https://dashboard.stripe.com/apikeys"}]},
  {"title": "Slack Web API", "docs": "https://api.slack.com/web#authentication",
   "service": {"name": "slack", "host": "slack.com/api/*",
               "auth": {"type": "bearer", "token": "SLACK_BOT_TOKEN"}},
   "credentials": [{"key": "SLACK_BOT_TOKEN", "description": "Slack bot token (xoxb-…)",
                    "obtain": "https://api.slack.com/apps"}]},
  {"title": "Jira / Atlassian Cloud REST API", "docs": "https://developer.atlassian.com/cloud/jira/platform/basic-auth-for-rest-apis/",
   "service": {"name": "atlassian", "host": "*.atlassian.net",
               "auth": {"type": "basic", "username": "ATLASSIAN_EMAIL", "password": "ATLASSIAN_API_TOKEN"}},
   "credentials": [{"key": "ATLASSIAN_EMAIL", "description": "The Atlassian account's email address",
                    "obtain": "https://id.atlassian.com/manage-profile/email"},
                   {"key": "ATLASSIAN_API_TOKEN", "description": "Atlassian API token",
                    "obtain": "https://id.atlassian.com/manage-profile/security/api-tokens"}]},
  {"title": "Telegram Bot API", "docs": "https://core.telegram.org/bots/api#making-requests",
   "service": {"name": "telegram", "host": "api.telegram.org",
               "auth": {"type": "passthrough"},
               "substitutions": [{"key": "TELEGRAM_BOT_TOKEN", "placeholder": "__TELEGRAM_BOT_TOKEN__",
                                  "in": ["path"]}]},
   "credentials": [{"key": "TELEGRAM_BOT_TOKEN", "description": "Telegram bot token (123456:ABC-…), from @BotFather's /newbot",
                    "obtain": "https://t.me/BotFather"}]}
]"#;

/// Every template, in the order listed.
pub fn entries() -> &'static [CatalogEntry] {
    static ENTRIES: OnceLock<Vec<CatalogEntry>> = OnceLock::new();
    ENTRIES.get_or_init(|| {
        serde_json::from_str(CATALOG_JSON).expect("the built-in catalog is valid JSON (tested)")
    })
}

/// The template called `name`; 400 `unknown_catalog_entry` naming the others.
pub fn find(name: &str) -> Result<&'static CatalogEntry> {
    entries()
        .iter()
        .find(|entry| entry.service.name == name)
        .ok_or_else(|| {
            let known: Vec<&str> = entries().iter().map(|e| e.service.name.as_str()).collect();
            Error::bad_request(
                "unknown_catalog_entry",
                format!(
                    "no service catalog entry \"{name}\" (known: {}; see GET /v1/service-catalog)",
                    known.join(", ")
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_is_a_valid_service_whose_keys_are_its_credentials() {
        let entries = entries();
        assert!(entries.len() >= 7);
        let mut names = std::collections::BTreeSet::new();
        for entry in entries {
            let service = &entry.service;
            assert!(names.insert(service.name.clone()), "{} twice", service.name);
            service
                .validate(&agent_vault_rules::ValidationOptions::default())
                .unwrap_or_else(|e| panic!("{}: {e}", service.name));
            let referenced: std::collections::BTreeSet<String> =
                service.credential_keys().into_iter().collect();
            let listed: std::collections::BTreeSet<String> =
                entry.credentials.iter().map(|c| c.key.clone()).collect();
            assert_eq!(referenced, listed, "{}", service.name);
            for credential in &entry.credentials {
                assert!(credential.obtain.starts_with("https://"), "{credential:?}");
            }
            assert!(entry.docs.starts_with("https://"), "{}", service.name);
            assert!(service.enabled && service.upstream_tls, "{}", service.name);
        }
        for required in [
            "openai",
            "anthropic",
            "github",
            "stripe",
            "slack",
            "atlassian",
            "telegram",
        ] {
            assert!(names.contains(required), "{required}");
        }
    }

    #[test]
    fn telegram_puts_the_bot_token_in_the_path_and_injects_no_header() {
        let service = &find("telegram").unwrap().service;
        assert_eq!(service.host, "api.telegram.org");
        assert_eq!(service.auth, agent_vault_rules::Auth::Passthrough {});
        assert_eq!(
            serde_json::to_value(&service.substitutions).unwrap(),
            serde_json::json!([{"key": "TELEGRAM_BOT_TOKEN",
                                "placeholder": "__TELEGRAM_BOT_TOKEN__", "in": ["path"]}])
        );
        // The key comes from the substitution: a request is forwarded only when it is set.
        assert_eq!(service.credential_keys(), vec!["TELEGRAM_BOT_TOKEN"]);
        assert!(service.redacts_responses());
    }

    #[test]
    fn an_unknown_entry_names_the_known_ones() {
        assert_eq!(find("stripe").unwrap().service.host, "api.stripe.com");
        let error = find("strype").unwrap_err();
        assert_eq!(error.code(), "unknown_catalog_entry");
        assert!(error.to_string().contains("stripe"), "{error}");
    }
}
