//! Names users choose: vaults, credential keys, services and agents.
//!
//! Hand-written checks equivalent to the regular expressions of DESIGN.md §5 (the
//! filter runs in a wasm VM where a regex engine is dead weight):
//!
//! | name            | rule                                   |
//! |-----------------|----------------------------------------|
//! | vault           | `^[a-z0-9]([a-z0-9-]{1,62}[a-z0-9])$`  |
//! | credential key  | `^[A-Z][A-Z0-9_]*$`, at most 128 chars |
//! | service, agent  | `^[a-z0-9][a-z0-9._-]{0,62}$`          |

use crate::error::RuleError;

/// Longest credential key.
pub const MAX_KEY_LEN: usize = 128;

const VAULT_RULE: &str = "vault names are 3-64 characters of a-z, 0-9 and -, \
                          starting and ending with a letter or digit";
const KEY_RULE: &str = "keys are UPPER_SNAKE_CASE (A-Z, 0-9, _), starting with a letter";
const SERVICE_RULE: &str = "service names are 1-63 characters of a-z, 0-9, '.', '_' and -, \
                            starting with a letter or digit";
const AGENT_RULE: &str = "agent names are 1-63 characters of a-z, 0-9, '.', '_' and -, \
                          starting with a letter or digit";

/// Checks a vault name against `^[a-z0-9]([a-z0-9-]{1,62}[a-z0-9])$`.
pub fn validate_vault_name(name: &str) -> Result<(), RuleError> {
    let bytes = name.as_bytes();
    let ends_ok = matches!(
        (bytes.first(), bytes.last()),
        (Some(first), Some(last)) if is_lower_alnum(*first) && is_lower_alnum(*last)
    );
    let ok = (3..=64).contains(&bytes.len())
        && ends_ok
        && bytes.iter().all(|&b| is_lower_alnum(b) || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(RuleError::InvalidVaultName {
            name: name.to_owned(),
            reason: VAULT_RULE.to_owned(),
        })
    }
}

/// Checks a credential key against `^[A-Z][A-Z0-9_]*$` (at most 128 characters).
pub fn validate_credential_key(key: &str) -> Result<(), RuleError> {
    let bytes = key.as_bytes();
    if bytes.len() > MAX_KEY_LEN {
        return Err(RuleError::InvalidKey {
            key: key.to_owned(),
            reason: format!("keys are at most {MAX_KEY_LEN} characters"),
        });
    }
    let ok = bytes.first().is_some_and(u8::is_ascii_uppercase)
        && bytes
            .iter()
            .all(|&b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(RuleError::InvalidKey {
            key: key.to_owned(),
            reason: KEY_RULE.to_owned(),
        })
    }
}

/// Checks a service name against `^[a-z0-9][a-z0-9._-]{0,62}$`.
pub fn validate_service_name(name: &str) -> Result<(), RuleError> {
    if is_simple_name(name) {
        Ok(())
    } else {
        Err(RuleError::InvalidServiceName {
            name: name.to_owned(),
            reason: SERVICE_RULE.to_owned(),
        })
    }
}

/// Checks an agent name against `^[a-z0-9][a-z0-9._-]{0,62}$`.
pub fn validate_agent_name(name: &str) -> Result<(), RuleError> {
    if is_simple_name(name) {
        Ok(())
    } else {
        Err(RuleError::InvalidAgentName {
            name: name.to_owned(),
            reason: AGENT_RULE.to_owned(),
        })
    }
}

/// `^[a-z0-9][a-z0-9._-]{0,62}$`
fn is_simple_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes.first().is_some_and(|&b| is_lower_alnum(b))
        && bytes
            .iter()
            .all(|&b| is_lower_alnum(b) || matches!(b, b'.' | b'_' | b'-'))
}

fn is_lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vault_names() {
        let long_ok = "a".repeat(64);
        let too_long = "a".repeat(65);
        let cases: &[(&str, &str, bool)] = &[
            ("accepts the default vault", "default", true),
            ("accepts digits and hyphens", "my-vault-2", true),
            ("accepts the 3-character minimum", "abc", true),
            ("accepts a leading digit", "1ab", true),
            ("accepts 64 characters", &long_ok, true),
            ("rejects 65 characters", &too_long, false),
            ("rejects 2 characters", "ab", false),
            ("rejects 1 character", "a", false),
            ("rejects empty", "", false),
            ("rejects uppercase", "MyVault", false),
            ("rejects a leading hyphen", "-vault", false),
            ("rejects a trailing hyphen", "vault-", false),
            ("rejects underscores", "my_vault", false),
            ("rejects dots", "my.vault", false),
            ("rejects spaces", "my vault", false),
            ("rejects non-ascii", "vaulté", false),
        ];
        for (behaviour, name, ok) in cases {
            let result = validate_vault_name(name);
            assert_eq!(result.is_ok(), *ok, "{behaviour}: {result:?}");
            if let Err(error) = result {
                assert_eq!(error.code(), "invalid_vault_name", "{behaviour}");
            }
        }
    }

    #[test]
    fn credential_keys() {
        let long_ok = format!("K{}", "A".repeat(127));
        let too_long = format!("K{}", "A".repeat(128));
        let cases: &[(&str, &str, bool)] = &[
            ("accepts upper snake case", "STRIPE_KEY", true),
            ("accepts a single letter", "A", true),
            ("accepts digits after the first letter", "KEY_2", true),
            ("accepts a trailing underscore", "KEY_", true),
            ("accepts 128 characters", &long_ok, true),
            ("rejects 129 characters", &too_long, false),
            ("rejects lowercase", "stripe_key", false),
            ("rejects a leading digit", "2KEY", false),
            ("rejects a leading underscore", "_KEY", false),
            ("rejects hyphens", "STRIPE-KEY", false),
            ("rejects empty", "", false),
            ("rejects spaces", "STRIPE KEY", false),
        ];
        for (behaviour, key, ok) in cases {
            let result = validate_credential_key(key);
            assert_eq!(result.is_ok(), *ok, "{behaviour}: {result:?}");
            if let Err(error) = result {
                assert_eq!(error.code(), "invalid_key", "{behaviour}");
            }
        }
    }

    #[test]
    fn credential_key_message_names_value_and_rule() {
        let error = validate_credential_key("stripe_key").err();
        assert_eq!(
            error.map(|e| e.to_string()).as_deref(),
            Some(
                "invalid credential key \"stripe_key\": keys are UPPER_SNAKE_CASE \
                 (A-Z, 0-9, _), starting with a letter"
            )
        );
    }

    #[test]
    fn service_and_agent_names() {
        let long_ok = "a".repeat(63);
        let too_long = "a".repeat(64);
        let cases: &[(&str, &str, bool)] = &[
            ("accepts a single character", "a", true),
            (
                "accepts dots, underscores and hyphens",
                "stripe.api_v1-x",
                true,
            ),
            ("accepts a leading digit", "1password", true),
            ("accepts 63 characters", &long_ok, true),
            ("rejects 64 characters", &too_long, false),
            ("rejects empty", "", false),
            ("rejects uppercase", "Stripe", false),
            ("rejects a leading dot", ".stripe", false),
            ("rejects a leading hyphen", "-stripe", false),
            ("rejects a leading underscore", "_stripe", false),
            ("rejects slashes", "a/b", false),
            ("rejects spaces", "a b", false),
        ];
        for (behaviour, name, ok) in cases {
            let service = validate_service_name(name);
            assert_eq!(service.is_ok(), *ok, "service {behaviour}: {service:?}");
            if let Err(error) = service {
                assert_eq!(error.code(), "invalid_service_name", "{behaviour}");
            }
            let agent = validate_agent_name(name);
            assert_eq!(agent.is_ok(), *ok, "agent {behaviour}: {agent:?}");
            if let Err(error) = agent {
                assert_eq!(error.code(), "invalid_agent_name", "{behaviour}");
            }
        }
    }
}
