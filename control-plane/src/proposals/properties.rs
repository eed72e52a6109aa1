//! Property tests of the JSON agents and admins send: proposal bodies
//! ([`ProposalInput`], [`validate_proposal`], the reference check) and service lists
//! ([`Service`], [`validate_services`]).
//!
//! Inputs are generated JSON trees (keys mostly from the real field names, so that
//! the deserializers get past the first field), structured proposals and services
//! drawn from small sets of names, keys and hosts (so that duplicates, missing keys and
//! deleted keys are common), and the valid examples of `tests.rs` with random
//! mutations. Each property runs `PROPTEST_CASES` cases (256 by default, in
//! `./dev test`); README "Fuzzing" has the long run. Failures are saved in
//! `control-plane/proptest-regressions/proposals/properties.txt` (proptest's default
//! place), which is committed so that every later run replays them first.

use std::collections::BTreeSet;

use agent_vault_rules::{validate_services, CompiledAuth, Service, ValidationOptions};
use proptest::prelude::*;
use proptest::sample::{select, Index};
use serde_json::{json, Map, Value};

use super::{check_references, validate_proposal, ProposalAction, ProposalInput, ServiceChange};

const STRICT: ValidationOptions = ValidationOptions {
    allow_private_upstreams: false,
};
const ALLOW_PRIVATE: ValidationOptions = ValidationOptions {
    allow_private_upstreams: true,
};

/// Every field name of a proposal, a service change, a slot, a service and an auth
/// block, and names that may be added later: an inserted key outside this list is an
/// unknown field.
const FIELDS: &[&str] = &[
    "services",
    "credentials",
    "message",
    "user_message",
    "action",
    "name",
    "host",
    "auth",
    "enabled",
    "upstream_tls",
    "upstream_h2c",
    "key",
    "description",
    "obtain",
    "obtain_instructions",
    "value",
    "type",
    "token",
    "username",
    "password",
    "header",
    "prefix",
    "headers",
    "methods",
    "rate_limit",
    "substitutions",
    "redact_responses",
];

// Each vocabulary has valid entries first, then invalid ones; generators draw the
// valid ones more often so that whole proposals validate often enough.
const KEYS: &[&str] = &["A", "B", "STRIPE_KEY", "GH_TOKEN", "lower", ""];
const VALID_KEYS: usize = 4;
const NAMES: &[&str] = &["stripe", "gh", "a.b", "Bad", ""];
const VALID_NAMES: usize = 3;
const HOSTS: &[&str] = &[
    "api.stripe.com",
    "*.github.com",
    "api.example.com:8443/v1/*",
    "api.example.com/v1/charges",
    "localhost:8080",
    "127.0.0.1:9000",
    "[::1]:9000",
    "https://api.stripe.com",
    "*.com",
    "user@api.stripe.com",
    "",
];
const VALID_HOSTS: usize = 7;

/// Mostly one of the first `valid` entries of `vocabulary`, sometimes any.
fn pick(vocabulary: &'static [&'static str], valid: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(&vocabulary[..valid]),
        1 => select(vocabulary),
    ]
    .prop_map(str::to_owned)
}
const HEADERS: &[&str] = &[
    "x-api-key",
    "X-Token",
    "authorization",
    "Host",
    "proxy-authorization",
    ":path",
    "bad header",
    "",
];
const VALID_HEADERS: usize = 3;
const TEXTS: &[&str] = &[
    "",
    "set",
    "delete",
    "replace",
    "bearer",
    "basic",
    "api-key",
    "custom",
    "passthrough",
    "https://dashboard.stripe.com/apikeys",
    "javascript:alert(1)",
    "tok {{ A }}",
    "{{",
    "}}",
    "tok_abc123",
];

fn any_text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..max).prop_map(String::from_iter)
}

/// Strings from every vocabulary above, arbitrary text, and lengths around the limits.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select([TEXTS, KEYS, NAMES, HOSTS, HEADERS, FIELDS].concat()).prop_map(str::to_owned),
        2 => any_text(24),
        1 => select(&[499usize, 500, 501, 999, 1000, 1001, 2001, 5001][..])
            .prop_map(|n| "x".repeat(n)),
    ]
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(FIELDS).prop_map(str::to_owned),
        1 => any_text(12),
    ]
}

/// Any JSON value, up to four levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((field_name(), inner), 0..6)
                .prop_map(|entries| Value::Object(entries.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn key() -> impl Strategy<Value = String> {
    pick(KEYS, VALID_KEYS)
}

const TEMPLATE_PIECES: &[&str] = &[
    "tok ",
    "{{ A }}",
    "{{B}}",
    "{{\tSTRIPE_KEY }}",
    "}}",
    "{",
    "}",
    " ",
    "A",
    "{{ lower }}",
    "{{  }}",
    "{{",
    "\r\n",
];
const VALID_TEMPLATE_PIECES: usize = 9;

/// A custom header template: literal text, placeholders (well-formed or not) and keys.
fn template() -> impl Strategy<Value = String> {
    prop::collection::vec(pick(TEMPLATE_PIECES, VALID_TEMPLATE_PIECES), 0..5)
        .prop_map(|pieces| pieces.concat())
}

/// An auth block of any type, its fields present or not, from the small sets.
fn auth() -> impl Strategy<Value = Value> {
    prop_oneof![
        key().prop_map(|token| json!({"type": "bearer", "token": token})),
        (key(), key()).prop_map(|(username, password)| {
            json!({"type": "basic", "username": username, "password": password})
        }),
        (
            key(),
            prop::option::of(pick(HEADERS, VALID_HEADERS)),
            prop::option::of(select(&["", "Bearer ", "tok\n"][..])),
        )
            .prop_map(|(key, header, prefix)| {
                let mut auth = json!({"type": "api-key", "key": key});
                if let Some(header) = header {
                    auth["header"] = json!(header);
                }
                if let Some(prefix) = prefix {
                    auth["prefix"] = json!(prefix);
                }
                auth
            }),
        prop::collection::btree_map(pick(HEADERS, VALID_HEADERS), template(), 0..3)
            .prop_map(|headers| json!({"type": "custom", "headers": headers})),
        Just(json!({"type": "passthrough"})),
    ]
}

/// Inserts `value` under `field` when it is `Some`.
fn put(object: &mut Value, field: &str, value: Option<Value>) {
    if let (Some(value), Some(map)) = (value, object.as_object_mut()) {
        map.insert(field.to_owned(), value);
    }
}

fn action() -> impl Strategy<Value = Option<Value>> {
    prop::option::of(select(&["set", "delete"][..]).prop_map(|a| json!(a)))
}

/// A service (as in a service list: no `action`).
fn service() -> impl Strategy<Value = Value> {
    (
        pick(NAMES, VALID_NAMES),
        pick(HOSTS, VALID_HOSTS),
        auth(),
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        prop::option::weighted(0.2, any::<bool>()),
    )
        .prop_map(|(name, host, auth, enabled, tls, h2c)| {
            let mut service = json!({"name": name, "host": host, "auth": auth});
            put(&mut service, "enabled", enabled.map(Value::Bool));
            put(&mut service, "upstream_tls", tls.map(Value::Bool));
            put(&mut service, "upstream_h2c", h2c.map(Value::Bool));
            service
        })
}

/// A proposal's service entry: set (usually whole) or delete (usually just the name).
fn service_change() -> impl Strategy<Value = Value> {
    (
        action(),
        pick(NAMES, VALID_NAMES),
        prop::option::weighted(0.8, pick(HOSTS, VALID_HOSTS)),
        prop::option::weighted(0.8, auth()),
        prop::option::weighted(0.2, any::<bool>()),
        prop::option::weighted(0.2, any::<bool>()),
        prop::option::weighted(0.1, any::<bool>()),
    )
        .prop_map(|(action, name, host, auth, enabled, tls, h2c)| {
            let deleting = action.as_ref().and_then(Value::as_str) == Some("delete");
            let mut change = json!({"name": name});
            put(&mut change, "action", action);
            // Deletes mostly carry only the name, so that many of them validate.
            if !deleting || enabled == Some(true) {
                put(&mut change, "host", host.map(|h| json!(h)));
                put(&mut change, "auth", auth);
            }
            put(&mut change, "enabled", enabled.map(Value::Bool));
            put(&mut change, "upstream_tls", tls.map(Value::Bool));
            put(&mut change, "upstream_h2c", h2c.map(Value::Bool));
            change
        })
}

/// A proposal's credential slot.
fn slot() -> impl Strategy<Value = Value> {
    const URLS: &[&str] = &[
        "https://dashboard.stripe.com/apikeys",
        "http://x.example.com",
        "https:///x",
        "ftp://x",
    ];
    let url = pick(URLS, 2);
    (
        action(),
        key(),
        prop::option::weighted(0.3, text()),
        prop::option::weighted(0.3, url),
        prop::option::weighted(0.3, text()),
        prop::option::weighted(0.3, select(&["tok_abc123", ""][..])),
    )
        .prop_map(|(action, key, description, obtain, instructions, value)| {
            let deleting = action.as_ref().and_then(Value::as_str) == Some("delete");
            let mut slot = json!({"key": key});
            put(&mut slot, "action", action);
            if !deleting {
                put(&mut slot, "description", description.map(Value::String));
                put(&mut slot, "obtain", obtain.map(Value::String));
                put(
                    &mut slot,
                    "obtain_instructions",
                    instructions.map(Value::String),
                );
                put(&mut slot, "value", value.map(|v| json!(v)));
            }
            slot
        })
}

/// A proposal body from the small sets: often valid, often one rule short of it.
fn proposal() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(service_change(), 0..4),
        prop::collection::vec(slot(), 0..4),
        prop::option::weighted(0.3, text()),
        prop::option::weighted(0.3, text()),
    )
        .prop_map(|(services, credentials, message, user_message)| {
            let mut proposal = json!({"services": services, "credentials": credentials});
            put(&mut proposal, "message", message.map(Value::String));
            put(
                &mut proposal,
                "user_message",
                user_message.map(Value::String),
            );
            proposal
        })
}

/// The valid proposals of `tests.rs` (the seed's three examples among them) and one
/// with every auth type.
fn proposal_examples() -> Vec<Value> {
    vec![
        json!({"credentials": [{"action": "set", "key": "STRIPE_KEY", "description": "Stripe API key",
               "obtain": "https://dashboard.stripe.com/apikeys",
               "obtain_instructions": "Developers > API Keys > Reveal test key"}]}),
        json!({"credentials": [{"action": "set", "key": "GENERATED_TOKEN",
               "description": "Token generated during setup", "value": "tok_abc123"}]}),
        json!({"credentials": [{"action": "delete", "key": "OLD_API_KEY"}],
               "message": "Remove unused API key"}),
        json!({
            "services": [{"action": "set", "name": "stripe", "host": "api.stripe.com",
                          "auth": {"type": "bearer", "token": "STRIPE_KEY"}}],
            "credentials": [{"action": "set", "key": "STRIPE_KEY", "description": "Stripe API key",
                             "obtain": "https://dashboard.stripe.com/apikeys",
                             "obtain_instructions": "Developers > API Keys > Reveal test key"}],
            "message": "Stripe access",
        }),
        json!({"services": [{"name": "gh", "host": "api.github.com", "auth": {"type": "passthrough"}}]}),
        json!({
            "services": [
                {"name": "basic", "host": "*.example.com:8443/v1/*", "enabled": false,
                 "auth": {"type": "basic", "username": "USER", "password": "PASS"}},
                {"name": "key", "host": "api.example.org/v1/charges", "upstream_tls": false, "upstream_h2c": true,
                 "auth": {"type": "api-key", "key": "API_KEY", "header": "x-api-key", "prefix": "k "}},
                {"name": "custom", "host": "api.example.net",
                 "auth": {"type": "custom", "headers": {"X-Token": "tok {{ API_KEY }}"}}},
                {"action": "delete", "name": "old"},
            ],
            "credentials": [
                {"key": "USER", "value": "me"},
                {"key": "PASS"},
                {"key": "API_KEY", "obtain": "https://example.org/keys"},
                {"action": "delete", "key": "UNUSED"},
            ],
            "message": "All the auth types",
            "user_message": "Please add the keys",
        }),
    ]
}

/// Valid service lists, one service of every auth type.
fn service_list_examples() -> Vec<Value> {
    vec![
        json!([{"name": "stripe", "host": "api.stripe.com",
                "auth": {"type": "bearer", "token": "STRIPE_KEY"}}]),
        json!([
            {"name": "basic", "host": "*.example.com:8443/v1/*", "enabled": false,
             "auth": {"type": "basic", "username": "USER", "password": "PASS"}},
            {"name": "key", "host": "api.example.org/v1/charges", "upstream_tls": false, "upstream_h2c": true,
             "auth": {"type": "api-key", "key": "API_KEY"}},
            {"name": "custom", "host": "api.example.net",
             "auth": {"type": "custom", "headers": {"X-Token": "tok {{ API_KEY }}", "X-B": "{{B}}"}}},
            {"name": "open", "host": "open.example.com", "auth": {"type": "passthrough"}},
        ]),
    ]
}

/// One step from the root of a JSON tree to a node.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    Item(usize),
}

/// Paths to every node of `value`, the root (empty path) first.
fn node_paths(value: &Value) -> Vec<Vec<Step>> {
    let mut paths = vec![Vec::new()];
    let mut next = 0;
    while next < paths.len() {
        let path = paths[next].clone();
        next += 1;
        let Some(node) = node(value, &path) else {
            continue;
        };
        let children: Vec<Step> = match node {
            Value::Object(map) => map.keys().cloned().map(Step::Field).collect(),
            Value::Array(items) => (0..items.len()).map(Step::Item).collect(),
            _ => Vec::new(),
        };
        for child in children {
            let mut path = path.clone();
            path.push(child);
            paths.push(path);
        }
    }
    paths
}

fn node<'a>(value: &'a Value, path: &[Step]) -> Option<&'a Value> {
    path.iter().try_fold(value, |node, step| match step {
        Step::Field(field) => node.get(field),
        Step::Item(item) => node.get(item),
    })
}

fn node_mut<'a>(value: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    path.iter().try_fold(value, |node, step| match step {
        Step::Field(field) => node.get_mut(field),
        Step::Item(item) => node.get_mut(item),
    })
}

/// What a mutation does to the node it lands on.
#[derive(Debug, Clone)]
enum Mutation {
    /// Take the node out of its object or array.
    Remove,
    /// Put another value in its place.
    Replace(Value),
    /// Add a field (to an object) or an item (to an array); replace anything else.
    Insert(String, Value),
    /// Append a copy of an array's first item (duplicate names and keys).
    Duplicate,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        Just(Mutation::Remove),
        json_value().prop_map(Mutation::Replace),
        (field_name(), json_value()).prop_map(|(field, value)| Mutation::Insert(field, value)),
        Just(Mutation::Duplicate),
    ]
}

fn mutate(value: &mut Value, at: &Index, mutation: Mutation) {
    let paths = node_paths(value);
    let path = at.get(&paths).clone();
    match mutation {
        Mutation::Remove => {
            let Some((last, parent)) = path.split_last() else {
                *value = Value::Null;
                return;
            };
            match (node_mut(value, parent), last) {
                (Some(Value::Object(map)), Step::Field(field)) => {
                    map.remove(field);
                }
                (Some(Value::Array(items)), Step::Item(item)) if *item < items.len() => {
                    items.remove(*item);
                }
                _ => {}
            }
        }
        Mutation::Replace(new) => {
            if let Some(node) = node_mut(value, &path) {
                *node = new;
            }
        }
        Mutation::Insert(field, new) => match node_mut(value, &path) {
            Some(Value::Object(map)) => {
                map.insert(field, new);
            }
            Some(Value::Array(items)) => items.push(new),
            Some(node) => *node = new,
            None => {}
        },
        Mutation::Duplicate => {
            if let Some(Value::Array(items)) = node_mut(value, &path) {
                if let Some(first) = items.first().cloned() {
                    items.push(first);
                }
            }
        }
    }
}

/// One of `examples` after one to four random mutations.
fn mutated(examples: Vec<Value>) -> impl Strategy<Value = Value> {
    (
        select(examples),
        prop::collection::vec((any::<Index>(), mutation()), 1..5),
    )
        .prop_map(|(mut value, mutations)| {
            for (at, mutation) in mutations {
                mutate(&mut value, &at, mutation);
            }
            value
        })
}

/// A field name no proposal, service or auth block has.
fn unknown_field() -> impl Strategy<Value = String> {
    let known: BTreeSet<&str> = FIELDS.iter().copied().collect();
    prop_oneof![
        "x_[a-z_]{0,8}",
        // Known names in another case or with a typo are unknown too.
        (select(FIELDS), any::<u64>()).prop_map(|(field, mask)| {
            let upper: String = field
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    if i == 0 || mask >> (i % 64) & 1 == 1 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect();
            upper
        }),
        select(FIELDS).prop_map(|field| format!("{field}_")),
        any_text(12),
    ]
    // Only arbitrary text can hit a known name, and almost never does: the filter's
    // rejections (capped per run) stay rare even in long runs.
    .prop_filter("not a known field", move |field| {
        !known.contains(field.as_str())
    })
}

/// Paths to the objects of `value` that are records (not the free-form `headers` map
/// of a custom auth, whose keys are header names).
fn record_paths(value: &Value) -> Vec<Vec<Step>> {
    node_paths(value)
        .into_iter()
        .filter(|path| {
            node(value, path).is_some_and(Value::is_object)
                && path.last() != Some(&Step::Field("headers".to_owned()))
        })
        .collect()
}

/// Parses as the API does: from the bytes of the body.
fn from_body<T: serde::de::DeserializeOwned>(value: &Value) -> serde_json::Result<T> {
    serde_json::from_slice(value.to_string().as_bytes())
}

/// Validation must return for every input; its verdict is not the point here.
fn validate_everything(value: &Value, existing: &BTreeSet<String>) {
    if let Ok(input) = from_body::<ProposalInput>(value) {
        for options in [STRICT, ALLOW_PRIVATE] {
            let _ = validate_proposal(&input, &options);
        }
        let _ = check_references(&input, existing, "default");
    }
    for options in [STRICT, ALLOW_PRIVATE] {
        if let Ok(services) = from_body::<Vec<Service>>(value) {
            let _ = validate_services(&services, &options);
        }
        if let Ok(service) = from_body::<Service>(value) {
            let _ = service.validate(&options);
        }
    }
}

fn existing_keys() -> impl Strategy<Value = BTreeSet<String>> {
    prop::collection::btree_set(key(), 0..4)
}

proptest! {
    /// Arbitrary JSON, as a proposal, a service list or a service: deserializing and
    /// validating always return.
    #[test]
    fn arbitrary_json_never_panics_deserialization_or_validation(
        value in json_value(),
        existing in existing_keys(),
    ) {
        validate_everything(&value, &existing);
    }

    /// The same for the valid examples after random removals, replacements,
    /// insertions and duplications.
    #[test]
    fn mutated_examples_never_panic_deserialization_or_validation(
        value in mutated([proposal_examples(), service_list_examples()].concat()),
        existing in existing_keys(),
    ) {
        validate_everything(&value, &existing);
    }

    /// A proposal that validates passes the reference check exactly when every key its
    /// set services reference is a set slot of the proposal or already in the vault,
    /// and is not deleted by it; the keys the filter will render are those keys.
    #[test]
    fn a_valid_proposal_references_only_keys_it_sets_or_the_vault_has(
        value in prop_oneof![3 => proposal(), 1 => mutated(proposal_examples())],
        existing in existing_keys(),
    ) {
        let Ok(input) = from_body::<ProposalInput>(&value) else {
            return Ok(());
        };
        if validate_proposal(&input, &ALLOW_PRIVATE).is_err() {
            return Ok(());
        }
        let slots = |action| -> BTreeSet<&str> {
            input.credentials.iter().filter(|s| s.action == action).map(|s| s.key.as_str()).collect()
        };
        let (set, deleted) = (slots(ProposalAction::Set), slots(ProposalAction::Delete));
        let mut covered = true;
        for service in input.services.iter().filter_map(ServiceChange::service) {
            let referenced = service.auth.referenced_keys();
            let compiled = CompiledAuth::compile(&service.auth)
                .map_err(|e| TestCaseError::fail(format!("a validated auth does not compile: {e}")))?;
            prop_assert_eq!(compiled.keys(), referenced.as_slice());
            // Rendering asks for no key beyond the referenced ones.
            let asked = std::cell::RefCell::new(BTreeSet::new());
            let _ = compiled.render(|key| {
                asked.borrow_mut().insert(key.to_owned());
                Some("v")
            });
            prop_assert!(asked.borrow().iter().all(|key| referenced.contains(key)));
            covered &= referenced.iter().all(|key| {
                !deleted.contains(key.as_str())
                    && (set.contains(key.as_str()) || existing.contains(key))
            });
        }
        let checked = check_references(&input, &existing, "default");
        prop_assert_eq!(checked.is_ok(), covered, "{:?}", checked.err().map(|e| e.to_string()));
    }

    /// Inside a validated proposal, every set service is a valid service, and service
    /// names and credential keys are each named once and valid.
    #[test]
    fn a_valid_proposal_holds_only_valid_unique_services_and_keys(value in proposal()) {
        let Ok(input) = from_body::<ProposalInput>(&value) else {
            return Ok(());
        };
        for options in [STRICT, ALLOW_PRIVATE] {
            if validate_proposal(&input, &options).is_err() {
                continue;
            }
            let mut names = BTreeSet::new();
            for change in &input.services {
                prop_assert!(names.insert(change.name.as_str()), "{} twice", change.name);
                if let Some(service) = change.service() {
                    prop_assert!(service.validate(&options).is_ok());
                } else {
                    prop_assert_eq!(change.action, ProposalAction::Delete);
                }
            }
            let mut keys = BTreeSet::new();
            for slot in &input.credentials {
                prop_assert!(keys.insert(slot.key.as_str()), "{} twice", slot.key);
                prop_assert!(agent_vault_rules::validate_credential_key(&slot.key).is_ok());
            }
        }
    }

    /// A service list that deserializes serializes back to JSON that deserializes to
    /// the same list, which validates exactly as the original did.
    #[test]
    fn a_service_list_round_trips_and_revalidates_identically(
        value in prop_oneof![
            prop::collection::vec(service(), 0..4).prop_map(Value::Array),
            mutated(service_list_examples()),
        ],
    ) {
        let Ok(services) = from_body::<Vec<Service>>(&value) else {
            return Ok(());
        };
        let text = serde_json::to_string(&services)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let again: Vec<Service> = serde_json::from_str(&text)
            .map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
        prop_assert_eq!(&again, &services);
        prop_assert_eq!(serde_json::to_string(&again).ok(), Some(text));
        for options in [STRICT, ALLOW_PRIVATE] {
            let first = validate_services(&services, &options);
            prop_assert_eq!(validate_services(&again, &options), first);
        }
    }

    /// Adding a field that does not exist to any record of a valid proposal or service
    /// list (the body, a service, its auth, a slot) gets the body refused.
    #[test]
    fn unknown_fields_are_always_refused(
        proposal in select(proposal_examples()),
        services in select(service_list_examples()),
        at in any::<Index>(),
        field in unknown_field(),
        value in json_value(),
    ) {
        prop_assert!(from_body::<ProposalInput>(&proposal).is_ok());
        let mut tainted = proposal;
        let path = at.get(&record_paths(&tainted)).clone();
        if let Some(Value::Object(map)) = node_mut(&mut tainted, &path) {
            map.insert(field.clone(), value.clone());
        }
        prop_assert!(from_body::<ProposalInput>(&tainted).is_err(), "{}", tainted);

        prop_assert!(from_body::<Vec<Service>>(&services).is_ok());
        let mut tainted = services;
        let path = at.get(&record_paths(&tainted)).clone();
        if let Some(Value::Object(map)) = node_mut(&mut tainted, &path) {
            map.insert(field, value);
        }
        prop_assert!(from_body::<Vec<Service>>(&tainted).is_err(), "{}", tainted);
    }
}
