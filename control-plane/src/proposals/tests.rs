//! Proposals, end to end through the store: the seed's examples, every validation
//! rule, the pending limit, who sees and decides what, all-or-nothing approval,
//! expiry, sealed agent values, approval links and rotation.

use super::*;
use crate::access::VaultRole;
use crate::clock::ManualClock;
use crate::testing::{owner, secrets, temp_store, MEMBER, T0_MS};
use agent_vault_rules::{Grant, Role};
use serde_json::{json, Value};
use std::sync::Arc;

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    clock: Arc<ManualClock>,
}

fn fixture() -> Fixture {
    let clock = ManualClock::new(T0_MS);
    let (dir, store) = temp_store(clock.clone(), false);
    // A member (not admin) and an admin (not the owner) of `default`.
    let vault_id = store.vault("default").unwrap().unwrap().id;
    store
        .write(|tx| crate::access::put_member(tx, &vault_id, MEMBER, VaultRole::Member))
        .unwrap();
    store
        .write(|tx| crate::access::put_member(tx, &vault_id, ADMIN, VaultRole::Admin))
        .unwrap();
    Fixture {
        _dir: dir,
        store,
        clock,
    }
}

const ADMIN: &str = "admin@example.com";

fn member() -> Principal {
    crate::testing::member(MEMBER)
}

/// An approval that acknowledges every warning of the proposal's diff, as a human who
/// read them does.
fn all_acknowledged(
    f: &Fixture,
    id: u64,
    values: BTreeMap<String, Secret>,
    accept_agent_values: bool,
) -> Approval {
    let diff = f.store.proposal_diff(&owner(), "default", id).unwrap();
    Approval {
        values,
        accept_agent_values,
        acknowledged: diff.warnings.into_iter().map(|w| w.id).collect(),
    }
}

fn admin() -> Principal {
    crate::testing::member(ADMIN)
}

fn stranger() -> Principal {
    crate::testing::member("stranger@example.com")
}

fn agent(name: &str) -> Principal {
    Principal::Agent {
        name: name.into(),
        grants: vec![Grant {
            vault: "default".into(),
            role: Role::Proxy,
        }],
    }
}

fn input(value: Value) -> ProposalInput {
    serde_json::from_value(value).unwrap_or_else(|e| panic!("{e}"))
}

fn propose(f: &Fixture, value: Value) -> Result<(ProposalView, String)> {
    f.store
        .create_proposal(&agent("bot"), "default", input(value))
}

fn set_credential(f: &Fixture, key: &str, value: &str) {
    f.store
        .set_credentials(&owner(), "default", &secrets(&[(key, value)]))
        .unwrap();
}

fn credential(f: &Fixture, key: &str) -> Option<String> {
    f.store
        .get_credential(&owner(), "default", key)
        .ok()
        .map(|s| s.expose().to_string())
}

fn service_names(f: &Fixture) -> Vec<String> {
    f.store
        .list_services(&owner(), "default")
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect()
}

fn stripe() -> Value {
    json!({
        "services": [{"action": "set", "name": "stripe", "host": "api.stripe.com",
                      "auth": {"type": "bearer", "token": "STRIPE_KEY"}}],
        "credentials": [{"action": "set", "key": "STRIPE_KEY", "description": "Stripe API key",
                         "obtain": "https://dashboard.stripe.com/apikeys",
                         "obtain_instructions": "Developers > API Keys > Reveal test key"}],
        "message": "Stripe access",
    })
}

fn raw_record(f: &Fixture, id: u64) -> ProposalRecord {
    let vault_id = f.store.vault("default").unwrap().unwrap().id;
    f.store.read_proposal(&vault_id, id).unwrap().unwrap()
}

/// Every byte stored in every tree, keys and values.
fn all_stored_bytes(f: &Fixture) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for tree in f.store.trees.all_for_tests() {
        for entry in tree.iter() {
            let (k, v) = entry.unwrap();
            out.push(k.to_vec());
            out.push(v.to_vec());
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn the_seeds_three_examples_are_accepted() {
    let f = fixture();
    let examples = [
        json!({"credentials": [{"action": "set", "key": "STRIPE_KEY", "description": "Stripe API key",
                "obtain": "https://dashboard.stripe.com/apikeys",
                "obtain_instructions": "Developers > API Keys > Reveal test key"}]}),
        json!({"credentials": [{"action": "set", "key": "GENERATED_TOKEN",
                "description": "Token generated during setup", "value": "tok_abc123"}]}),
        json!({"credentials": [{"action": "delete", "key": "OLD_API_KEY"}],
               "message": "Remove unused API key"}),
    ];
    for (i, example) in examples.into_iter().enumerate() {
        let (view, token) = propose(&f, example).unwrap();
        assert_eq!(view.id, i as u64 + 1, "ids are sequential per vault");
        assert_eq!(view.status, ProposalStatus::Pending);
        assert_eq!(view.agent.as_deref(), Some("bot"));
        assert_eq!(view.expires_at, view.created_at + PROPOSAL_TTL_SECS);
        assert!(token.starts_with(APPROVAL_PREFIX) && token.len() == 8 + 64);
    }
    let second = f.store.get_proposal(&agent("bot"), "default", 2).unwrap();
    assert!(second.credentials[0].has_value);
    let json = serde_json::to_string(&second).unwrap();
    assert!(!json.contains("tok_abc123"), "{json}");
    assert!(json.contains("\"has_value\":true"), "{json}");
    let third = f.store.get_proposal(&owner(), "default", 3).unwrap();
    assert_eq!(third.message.as_deref(), Some("Remove unused API key"));
    assert_eq!(third.credentials[0].action, ProposalAction::Delete);
}

#[test]
fn action_defaults_to_set_and_set_services_get_their_defaults() {
    let f = fixture();
    let (view, _) = propose(
        &f,
        json!({"services": [{"name": "gh", "host": "api.github.com", "auth": {"type": "passthrough"}}]}),
    )
    .unwrap();
    assert_eq!(view.services[0].action, ProposalAction::Set);
    assert_eq!(view.services[0].enabled, Some(true));
    assert_eq!(view.services[0].upstream_tls, Some(true));
}

#[test]
fn unknown_fields_are_refused_by_the_body_type() {
    for bad in [
        json!({"services": [], "extra": 1}),
        json!({"credentials": [{"key": "A", "colour": "red"}]}),
        json!({"services": [{"name": "s", "host": "a.com", "auth": {"type": "passthrough"}, "tls": true}]}),
        json!({"credentials": [{"action": "replace", "key": "A"}]}),
    ] {
        assert!(
            serde_json::from_value::<ProposalInput>(bad.clone()).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn every_validation_rule_is_a_400_naming_the_rule_and_stores_nothing() {
    let f = fixture();
    set_credential(&f, "EXISTING", "x");
    let long = |n: usize| "x".repeat(n);
    let svc = |name: &str| {
        json!({"action": "set", "name": name, "host": format!("{name}.example.com"),
               "auth": {"type": "passthrough"}})
    };
    let slot = |key: &str| json!({"action": "set", "key": key});
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "empty proposal",
            json!({}),
            "at least one service or credential slot",
        ),
        (
            "empty lists",
            json!({"services": [], "credentials": []}),
            "at least one",
        ),
        (
            "11 services",
            json!({"services": (0..11).map(|i| svc(&format!("s{i}"))).collect::<Vec<_>>()}),
            "at most 10 services",
        ),
        (
            "11 slots",
            json!({"credentials": (0..11).map(|i| slot(&format!("K{i}"))).collect::<Vec<_>>()}),
            "at most 10 credential slots",
        ),
        (
            "description over 500",
            json!({"credentials": [{"key": "A", "description": long(501)}]}),
            "description of A is longer than 500",
        ),
        (
            "obtain not http(s)",
            json!({"credentials": [{"key": "A", "obtain": "javascript:alert(1)"}]}),
            "http:// or https:// URL",
        ),
        (
            "obtain without host",
            json!({"credentials": [{"key": "A", "obtain": "https:///x"}]}),
            "http:// or https:// URL",
        ),
        (
            "obtain with a space",
            json!({"credentials": [{"key": "A", "obtain": "https://a.com/x y"}]}),
            "http:// or https:// URL",
        ),
        (
            "obtain over 500",
            json!({"credentials": [{"key": "A", "obtain": format!("https://a.com/{}", long(490))}]}),
            "obtain URL of A is longer than 500",
        ),
        (
            "instructions over 1000",
            json!({"credentials": [{"key": "A", "obtain_instructions": long(1001)}]}),
            "obtain_instructions of A is longer than 1000",
        ),
        (
            "message over 2000",
            json!({"credentials": [slot("A")], "message": long(2001)}),
            "message is longer than 2000",
        ),
        (
            "user_message over 5000",
            json!({"credentials": [slot("A")], "user_message": long(5001)}),
            "user_message is longer than 5000",
        ),
        (
            "lowercase key",
            json!({"credentials": [slot("stripe_key")]}),
            "invalid credential key",
        ),
        (
            "key starting with a digit",
            json!({"credentials": [slot("1KEY")]}),
            "invalid credential key",
        ),
        (
            "delete slot with a bad key",
            json!({"credentials": [{"action": "delete", "key": "old-key"}]}),
            "invalid credential key",
        ),
        (
            "duplicate keys",
            json!({"credentials": [slot("A"), {"action": "delete", "key": "A"}]}),
            "credential A appears twice",
        ),
        (
            "duplicate service names",
            json!({"services": [svc("s"), {"action": "delete", "name": "s"}]}),
            "service \"s\" appears twice",
        ),
        (
            "reference to a missing key",
            json!({"services": [{"name": "s", "host": "s.example.com",
                                 "auth": {"type": "bearer", "token": "MISSING"}}]}),
            "references credential MISSING, which is neither in vault",
        ),
        (
            "reference to a key the proposal deletes",
            json!({"services": [{"name": "s", "host": "s.example.com",
                                 "auth": {"type": "bearer", "token": "EXISTING"}}],
                   "credentials": [{"action": "delete", "key": "EXISTING"}]}),
            "which this proposal deletes",
        ),
        (
            "reference only in a delete slot is not a set slot",
            json!({"services": [{"name": "s", "host": "s.example.com",
                                 "auth": {"type": "basic", "username": "EXISTING", "password": "NEW"}}],
                   "credentials": [{"action": "delete", "key": "NEW"}]}),
            "which this proposal deletes",
        ),
        (
            "delete slot with a description",
            json!({"credentials": [{"action": "delete", "key": "A", "description": "d"}]}),
            "a delete slot carries only its key",
        ),
        (
            "delete slot with a value",
            json!({"credentials": [{"action": "delete", "key": "A", "value": "v"}]}),
            "a delete slot carries only its key",
        ),
        (
            "delete slot with obtain",
            json!({"credentials": [{"action": "delete", "key": "A", "obtain": "https://a.com"}]}),
            "a delete slot carries only its key",
        ),
        (
            "delete service with a host",
            json!({"services": [{"action": "delete", "name": "s", "host": "s.example.com"}]}),
            "a delete service carries only its name",
        ),
        (
            "delete service with auth",
            json!({"services": [{"action": "delete", "name": "s", "auth": {"type": "passthrough"}}]}),
            "a delete service carries only its name",
        ),
        (
            "set service without auth",
            json!({"services": [{"name": "s", "host": "s.example.com"}]}),
            "a set service needs host and auth",
        ),
        (
            "set service without host",
            json!({"services": [{"name": "s", "auth": {"type": "passthrough"}}]}),
            "a set service needs host and auth",
        ),
        (
            "invalid host",
            json!({"services": [{"name": "s", "host": "https://s.example.com", "auth": {"type": "passthrough"}}]}),
            "invalid host",
        ),
        (
            "private host",
            json!({"services": [{"name": "s", "host": "localhost:8080", "auth": {"type": "passthrough"}}]}),
            "allow-private-upstreams",
        ),
        (
            "invalid service name",
            json!({"services": [{"name": "Stripe", "host": "s.example.com", "auth": {"type": "passthrough"}}]}),
            "invalid service name",
        ),
        (
            "invalid auth",
            json!({"services": [{"name": "s", "host": "s.example.com", "auth": {"type": "bearer", "token": "lower"}}]}),
            "invalid credential key",
        ),
        (
            "empty agent value",
            json!({"credentials": [{"key": "A", "value": ""}]}),
            "value of A is empty",
        ),
        (
            "agent value over 64 KiB",
            json!({"credentials": [{"key": "A", "value": long(64 * 1024 + 1)}]}),
            "larger than",
        ),
    ];
    for (behaviour, body, expected) in cases {
        let err = propose(&f, body).unwrap_err();
        assert_eq!(err.code(), "invalid_proposal", "{behaviour}: {err}");
        assert_eq!(
            err.status(),
            axum::http::StatusCode::BAD_REQUEST,
            "{behaviour}"
        );
        assert!(
            err.to_string().contains(expected),
            "{behaviour}: {err:?} should mention {expected:?}"
        );
    }
    assert!(f
        .store
        .list_proposals(&owner(), "default", None)
        .unwrap()
        .is_empty());
    assert!(f.store.trees.proposals.is_empty().unwrap());
    assert!(f.store.trees.proposal_links.is_empty().unwrap());
    // The next valid proposal still gets id 1.
    assert_eq!(propose(&f, stripe()).unwrap().0.id, 1);
}

#[test]
fn limits_are_inclusive() {
    let f = fixture();
    let long = |n: usize| "é".repeat(n);
    let services: Vec<Value> = (0..10)
        .map(|i| json!({"name": format!("s{i}"), "host": format!("s{i}.example.com"), "auth": {"type": "passthrough"}}))
        .collect();
    let mut slots: Vec<Value> = (0..9).map(|i| json!({"key": format!("K{i}")})).collect();
    slots.push(json!({"key": "LAST", "description": long(500),
        "obtain": format!("https://a.com/{}", "x".repeat(486)),
        "obtain_instructions": long(1000), "value": "v"}));
    let (view, _) = propose(
        &f,
        json!({"services": services, "credentials": slots,
               "message": long(2000), "user_message": long(5000)}),
    )
    .unwrap();
    assert_eq!(view.services.len(), 10);
    assert_eq!(view.credentials.len(), 10);
    // A set service may reference an existing key or a set slot of the proposal.
    set_credential(&f, "EXISTING", "x");
    propose(
        &f,
        json!({"services": [{"name": "b", "host": "b.example.com",
                             "auth": {"type": "basic", "username": "EXISTING", "password": "NEW"}}],
               "credentials": [{"key": "NEW"}]}),
    )
    .unwrap();
}

#[test]
fn more_than_20_pending_is_429_and_decided_or_expired_ones_do_not_count() {
    let f = fixture();
    for _ in 0..MAX_PENDING {
        propose(&f, stripe()).unwrap();
    }
    let err = propose(&f, stripe()).unwrap_err();
    assert_eq!(err.code(), "too_many_proposals");
    assert_eq!(err.status(), axum::http::StatusCode::TOO_MANY_REQUESTS);
    // Users count against the same limit.
    assert_eq!(
        f.store
            .create_proposal(&member(), "default", input(stripe()))
            .unwrap_err()
            .code(),
        "too_many_proposals"
    );
    f.store
        .reject_proposal(&member(), "default", 1, None)
        .unwrap();
    assert_eq!(propose(&f, stripe()).unwrap().0.id, 21);
    assert!(propose(&f, stripe()).is_err());
    f.clock.advance_secs(PROPOSAL_TTL_SECS);
    // All 20 pending ones expired: a new one is welcome, and they read as expired.
    assert_eq!(propose(&f, stripe()).unwrap().0.id, 22);
    assert_eq!(
        f.store
            .list_proposals(&owner(), "default", Some(ProposalStatus::Expired))
            .unwrap()
            .len(),
        20
    );
    // Another vault has its own limit and its own ids.
    f.store.create_vault(&owner(), "other").unwrap();
    let (view, _) = f
        .store
        .create_proposal(&owner(), "other", input(stripe()))
        .unwrap();
    assert_eq!(view.id, 1);
}

#[test]
fn agents_see_only_their_own_proposals_and_users_see_all() {
    let f = fixture();
    propose(&f, stripe()).unwrap();
    f.store
        .create_proposal(&agent("other-bot"), "default", input(stripe()))
        .unwrap();
    let (by_user, _) = f
        .store
        .create_proposal(&member(), "default", input(stripe()))
        .unwrap();
    assert_eq!(by_user.agent, None);
    assert_eq!(
        by_user.created_by,
        Proposer::User {
            email: MEMBER.into()
        }
    );
    let mine = f
        .store
        .list_proposals(&agent("bot"), "default", None)
        .unwrap();
    assert_eq!(mine.iter().map(|p| p.id).collect::<Vec<_>>(), vec![1]);
    let err = f
        .store
        .get_proposal(&agent("bot"), "default", 2)
        .unwrap_err();
    assert_eq!(err.code(), "proposal_not_found");
    assert_eq!(
        f.store
            .get_proposal(&agent("bot"), "default", 3)
            .unwrap_err()
            .code(),
        "proposal_not_found"
    );
    assert_eq!(
        f.store
            .list_proposals(&member(), "default", None)
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        f.store
            .get_proposal(&owner(), "default", 9)
            .unwrap_err()
            .code(),
        "proposal_not_found"
    );
    // A user who is not a member sees no vault at all.
    assert_eq!(
        f.store
            .list_proposals(&stranger(), "default", None)
            .unwrap_err()
            .code(),
        "vault_not_found"
    );
    assert_eq!(
        f.store
            .create_proposal(&stranger(), "default", input(stripe()))
            .unwrap_err()
            .code(),
        "vault_not_found"
    );
}

#[test]
fn agents_can_never_approve_or_reject_not_even_their_own() {
    let f = fixture();
    propose(&f, stripe()).unwrap();
    for who in [agent("bot"), agent("other")] {
        let err = f
            .store
            .approve_proposal(
                &who,
                "default",
                1,
                Approval::new(secrets(&[("STRIPE_KEY", "sk")]), true),
            )
            .unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::FORBIDDEN, "{err}");
        let err = f
            .store
            .reject_proposal(&who, "default", 1, None)
            .unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::FORBIDDEN, "{err}");
    }
    // An agent of another vault is refused the same way (not 404).
    let elsewhere = Principal::Agent {
        name: "x".into(),
        grants: vec![],
    };
    assert_eq!(
        f.store
            .reject_proposal(&elsewhere, "default", 1, None)
            .unwrap_err()
            .status(),
        axum::http::StatusCode::FORBIDDEN
    );
    assert_eq!(
        f.store.get_proposal(&owner(), "default", 1).unwrap().status,
        ProposalStatus::Pending
    );
    // A non-member user cannot see the vault.
    assert_eq!(
        f.store
            .reject_proposal(&stranger(), "default", 1, None)
            .unwrap_err()
            .code(),
        "vault_not_found"
    );
}

#[test]
fn an_admin_approves_and_everything_is_applied() {
    let f = fixture();
    set_credential(&f, "OLD_API_KEY", "old");
    f.store
        .add_service(
            &owner(),
            "default",
            serde_json::from_value(json!({"name": "old-service", "host": "old.example.com",
                "auth": {"type": "bearer", "token": "OLD_API_KEY"}}))
            .unwrap(),
        )
        .unwrap();
    f.store
        .add_service(
            &owner(),
            "default",
            serde_json::from_value(json!({"name": "stripe", "host": "old.stripe.com",
                "auth": {"type": "passthrough"}}))
            .unwrap(),
        )
        .unwrap();
    let (view, _) = propose(
        &f,
        json!({
            "services": [
                {"action": "set", "name": "stripe", "host": "api.stripe.com",
                 "auth": {"type": "bearer", "token": "STRIPE_KEY"}},
                {"action": "set", "name": "gen", "host": "gen.example.com",
                 "auth": {"type": "api-key", "key": "GENERATED_TOKEN"}},
                {"action": "delete", "name": "old-service"}
            ],
            "credentials": [
                {"action": "set", "key": "STRIPE_KEY", "description": "Stripe API key"},
                {"action": "set", "key": "GENERATED_TOKEN", "value": "tok_abc123"},
                {"action": "delete", "key": "OLD_API_KEY"}
            ]
        }),
    )
    .unwrap();
    let version = f.store.snapshot_version().unwrap();
    // Values must cover every set slot.
    let err = f
        .store
        .approve_proposal(
            &admin(),
            "default",
            view.id,
            all_acknowledged(&f, view.id, secrets(&[("STRIPE_KEY", "sk")]), false),
        )
        .unwrap_err();
    assert_eq!(err.code(), "value_required");
    assert!(err.to_string().contains("GENERATED_TOKEN"), "{err}");
    assert!(err.to_string().contains("accept_agent_values"), "{err}");
    let err = f
        .store
        .approve_proposal(
            &admin(),
            "default",
            view.id,
            all_acknowledged(&f, view.id, BTreeMap::new(), true),
        )
        .unwrap_err();
    assert_eq!(err.code(), "value_required");
    assert!(err.to_string().contains("STRIPE_KEY"), "{err}");
    // A value for a key the proposal does not set is refused.
    let err = f
        .store
        .approve_proposal(
            &admin(),
            "default",
            view.id,
            all_acknowledged(
                &f,
                view.id,
                secrets(&[("STRIPE_KEY", "sk"), ("OTHER", "x")]),
                true,
            ),
        )
        .unwrap_err();
    assert_eq!(err.code(), "invalid_request");
    let err = f
        .store
        .approve_proposal(
            &admin(),
            "default",
            view.id,
            all_acknowledged(&f, view.id, secrets(&[("STRIPE_KEY", "")]), true),
        )
        .unwrap_err();
    assert_eq!(err.code(), "invalid_value");
    assert_eq!(f.store.snapshot_version().unwrap(), version);

    let applied = f
        .store
        .approve_proposal(
            &admin(),
            "default",
            view.id,
            all_acknowledged(
                &f,
                view.id,
                secrets(&[("STRIPE_KEY", "sk_test_abc123")]),
                true,
            ),
        )
        .unwrap();
    assert_eq!(applied.status, ProposalStatus::Applied);
    let review = applied.review.clone().unwrap();
    assert_eq!(review.by, ADMIN);
    assert_eq!(review.reason, None);
    assert_eq!(
        credential(&f, "STRIPE_KEY").as_deref(),
        Some("sk_test_abc123")
    );
    assert_eq!(
        credential(&f, "GENERATED_TOKEN").as_deref(),
        Some("tok_abc123")
    );
    assert_eq!(credential(&f, "OLD_API_KEY"), None);
    // Replaced in place, appended, removed.
    assert_eq!(service_names(&f), vec!["stripe", "gen"]);
    let services = f.store.list_services(&owner(), "default").unwrap();
    assert_eq!(services[0].host, "api.stripe.com");
    assert!(f.store.snapshot_version().unwrap() > version);
    // Decided: the sealed agent value is gone from the record, has_value stays.
    let record = raw_record(&f, view.id);
    assert!(record.credentials.iter().all(|s| s.sealed.is_none()));
    assert!(applied.credentials[1].has_value);
    // Once only.
    let err = f
        .store
        .approve_proposal(
            &admin(),
            "default",
            view.id,
            all_acknowledged(&f, view.id, secrets(&[("STRIPE_KEY", "x")]), true),
        )
        .unwrap_err();
    assert_eq!(err.code(), "not_pending");
    assert!(err.to_string().contains("applied"), "{err}");
    let err = f
        .store
        .reject_proposal(&owner(), "default", view.id, None)
        .unwrap_err();
    assert_eq!(err.code(), "not_pending");
    assert_eq!(err.status(), axum::http::StatusCode::CONFLICT);
}

#[test]
fn agent_values_are_used_only_when_accepted_and_can_be_overridden() {
    let f = fixture();
    let body = json!({"credentials": [{"key": "GENERATED_TOKEN", "value": "tok_abc123"}]});
    propose(&f, body.clone()).unwrap();
    propose(&f, body).unwrap();
    f.store
        .approve_proposal(&owner(), "default", 1, Approval::new(BTreeMap::new(), true))
        .unwrap();
    assert_eq!(
        credential(&f, "GENERATED_TOKEN").as_deref(),
        Some("tok_abc123")
    );
    f.store
        .approve_proposal(
            &owner(),
            "default",
            2,
            Approval::new(secrets(&[("GENERATED_TOKEN", "tok_human")]), true),
        )
        .unwrap();
    assert_eq!(
        credential(&f, "GENERATED_TOKEN").as_deref(),
        Some("tok_human")
    );
}

#[test]
fn a_failing_apply_changes_nothing_and_the_proposal_stays_pending() {
    let f = fixture();
    set_credential(&f, "KEEP", "keep-value");
    set_credential(&f, "GONE_LATER", "x");
    f.store
        .add_service(
            &owner(),
            "default",
            serde_json::from_value(json!({"name": "keep", "host": "keep.example.com",
                "auth": {"type": "bearer", "token": "KEEP"}}))
            .unwrap(),
        )
        .unwrap();
    let (view, _) = propose(
        &f,
        json!({
            "services": [{"name": "new", "host": "new.example.com",
                          "auth": {"type": "bearer", "token": "NEW_KEY"}},
                         {"name": "keep", "host": "changed.example.com",
                          "auth": {"type": "passthrough"}}],
            "credentials": [
                {"key": "NEW_KEY"},
                {"action": "set", "key": "KEEP"},
                {"action": "delete", "key": "GONE_LATER"}
            ]
        }),
    )
    .unwrap();
    // The key to delete disappears before approval: the delete must fail.
    f.store
        .delete_credentials(&owner(), "default", &["GONE_LATER".into()])
        .unwrap();
    let services_before = f.store.list_services(&owner(), "default").unwrap();
    let version = f.store.snapshot_version().unwrap();
    let err = f
        .store
        .approve_proposal(
            &admin(),
            "default",
            view.id,
            all_acknowledged(
                &f,
                view.id,
                secrets(&[("NEW_KEY", "new-value"), ("KEEP", "overwritten")]),
                false,
            ),
        )
        .unwrap_err();
    assert_eq!(err.code(), "apply_failed", "{err}");
    assert_eq!(err.status(), axum::http::StatusCode::CONFLICT);
    assert!(err.to_string().contains("GONE_LATER"), "{err}");
    assert_eq!(
        f.store.list_services(&owner(), "default").unwrap(),
        services_before
    );
    assert_eq!(credential(&f, "NEW_KEY"), None);
    assert_eq!(credential(&f, "KEEP").as_deref(), Some("keep-value"));
    assert_eq!(f.store.snapshot_version().unwrap(), version);
    let still = f.store.get_proposal(&owner(), "default", view.id).unwrap();
    assert_eq!(still.status, ProposalStatus::Pending);
    assert_eq!(still.review, None);

    // A delete of a service that is not there fails the same way.
    let (view, _) = propose(
        &f,
        json!({"services": [{"action": "delete", "name": "absent"}],
               "credentials": [{"key": "OTHER_KEY"}]}),
    )
    .unwrap();
    let err = f
        .store
        .approve_proposal(
            &admin(),
            "default",
            view.id,
            all_acknowledged(&f, view.id, secrets(&[("OTHER_KEY", "v")]), false),
        )
        .unwrap_err();
    assert_eq!(err.code(), "apply_failed");
    assert!(err.to_string().contains("absent"), "{err}");
    assert_eq!(credential(&f, "OTHER_KEY"), None);

    // A referenced key deleted after creation fails at apply time.
    let (view, _) = propose(
        &f,
        json!({"services": [{"name": "late", "host": "late.example.com",
                             "auth": {"type": "bearer", "token": "KEEP"}}]}),
    )
    .unwrap();
    f.store
        .delete_credentials(&owner(), "default", &["KEEP".into()])
        .unwrap();
    let err = f
        .store
        .approve_proposal(
            &admin(),
            "default",
            view.id,
            all_acknowledged(&f, view.id, BTreeMap::new(), false),
        )
        .unwrap_err();
    assert_eq!(err.code(), "apply_failed");
    assert!(err.to_string().contains("KEEP"), "{err}");
    assert!(!service_names(&f).contains(&"late".to_string()));
}

#[test]
fn expiry_is_enforced_on_read_approve_and_reject() {
    let f = fixture();
    propose(&f, stripe()).unwrap();
    propose(&f, stripe()).unwrap();
    propose(&f, stripe()).unwrap();
    f.clock.advance_secs(PROPOSAL_TTL_SECS - 1);
    assert_eq!(
        f.store.get_proposal(&owner(), "default", 1).unwrap().status,
        ProposalStatus::Pending
    );
    f.clock.advance_secs(1);
    // Read: expired, and stored so.
    assert_eq!(raw_record(&f, 1).status, ProposalStatus::Pending);
    let view = f.store.get_proposal(&agent("bot"), "default", 1).unwrap();
    assert_eq!(view.status, ProposalStatus::Expired);
    assert_eq!(raw_record(&f, 1).status, ProposalStatus::Expired);
    // Approve.
    let err = f
        .store
        .approve_proposal(
            &member(),
            "default",
            2,
            Approval::new(secrets(&[("STRIPE_KEY", "sk")]), false),
        )
        .unwrap_err();
    assert_eq!(err.code(), "not_pending");
    assert!(err.to_string().contains("expired"), "{err}");
    assert_eq!(credential(&f, "STRIPE_KEY"), None);
    assert!(service_names(&f).is_empty());
    assert_eq!(raw_record(&f, 2).status, ProposalStatus::Expired);
    // Reject.
    let err = f
        .store
        .reject_proposal(&member(), "default", 3, Some("late".into()))
        .unwrap_err();
    assert_eq!(err.code(), "not_pending");
    assert!(err.to_string().contains("expired"), "{err}");
    let third = f.store.get_proposal(&owner(), "default", 3).unwrap();
    assert_eq!(third.status, ProposalStatus::Expired);
    assert_eq!(third.review, None);
    assert_eq!(
        f.store
            .list_proposals(&owner(), "default", Some(ProposalStatus::Pending))
            .unwrap(),
        vec![]
    );
}

#[test]
fn expiry_inside_the_approval_transaction_is_committed() {
    // Rejection checks expiry inside its transaction only: the expiry is
    // committed even though the rejection is refused.
    let f = fixture();
    propose(&f, stripe()).unwrap();
    f.clock.advance_secs(PROPOSAL_TTL_SECS + 5);
    let err = f
        .store
        .reject_proposal(&owner(), "default", 1, None)
        .unwrap_err();
    assert_eq!(err.code(), "not_pending");
    let vault_id = f.store.vault("default").unwrap().unwrap().id;
    assert_eq!(raw_record(&f, 1).status, ProposalStatus::Expired);
    let pending: Vec<u64> = read_json(&f.store.trees.meta, meta_key(META_PENDING, &vault_id))
        .unwrap()
        .unwrap();
    assert!(pending.is_empty());
}

#[test]
fn rejection_records_who_when_and_why() {
    let f = fixture();
    propose(
        &f,
        json!({"credentials": [{"key": "A", "value": "agent-secret"}]}),
    )
    .unwrap();
    let err = f
        .store
        .reject_proposal(&member(), "default", 1, Some("x".repeat(MAX_REASON + 1)))
        .unwrap_err();
    assert_eq!(err.code(), "invalid_request");
    f.clock.advance_secs(60);
    let rejected = f
        .store
        .reject_proposal(&member(), "default", 1, Some("  not needed  ".into()))
        .unwrap();
    assert_eq!(rejected.status, ProposalStatus::Rejected);
    let expected = Review {
        by: MEMBER.into(),
        at: T0_MS / 1000 + 60,
        reason: Some("not needed".into()),
    };
    assert_eq!(rejected.review.as_ref(), Some(&expected));
    let seen = f.store.get_proposal(&agent("bot"), "default", 1).unwrap();
    assert_eq!(seen.review, Some(expected));
    assert!(raw_record(&f, 1).credentials[0].sealed.is_none());
    assert_eq!(credential(&f, "A"), None);
    assert_eq!(
        f.store
            .list_proposals(&agent("bot"), "default", Some(ProposalStatus::Rejected))
            .unwrap()
            .len(),
        1
    );
    // An empty reason is no reason.
    propose(&f, stripe()).unwrap();
    let rejected = f
        .store
        .reject_proposal(&owner(), "default", 2, Some("   ".into()))
        .unwrap();
    assert_eq!(rejected.review.unwrap().reason, None);
}

#[test]
fn agent_values_are_sealed_and_never_stored_or_returned_in_clear() {
    let f = fixture();
    let secret = "tok_abc123_very_recognisable";
    propose(
        &f,
        json!({"credentials": [{"key": "GENERATED_TOKEN", "value": secret}]}),
    )
    .unwrap();
    for bytes in all_stored_bytes(&f) {
        assert!(!contains(&bytes, secret.as_bytes()), "plaintext stored");
    }
    let record = raw_record(&f, 1);
    let sealed = record.credentials[0].sealed.clone().unwrap();
    let vault_id = record.vault_id.clone();
    // Bound to its proposal and slot.
    let key = f.store.data_key();
    assert_eq!(
        open_value(&key, &vault_id, 1, "GENERATED_TOKEN", &sealed)
            .unwrap()
            .expose(),
        secret
    );
    assert!(open_value(&key, &vault_id, 2, "GENERATED_TOKEN", &sealed).is_err());
    assert!(open_value(&key, &vault_id, 1, "OTHER", &sealed).is_err());
    drop(key);
    for view in [
        f.store.get_proposal(&owner(), "default", 1).unwrap(),
        f.store
            .list_proposals(&agent("bot"), "default", None)
            .unwrap()[0]
            .clone(),
    ] {
        let json = serde_json::to_string(&view).unwrap();
        assert!(!json.contains(secret), "{json}");
        assert!(!json.contains(&sealed), "{json}");
    }
}

#[test]
fn the_approval_link_shows_its_proposal_for_24_hours_and_nothing_else() {
    let f = fixture();
    let (first, token) = propose(&f, stripe()).unwrap();
    let (_, other_token) = propose(&f, stripe()).unwrap();
    let (vault, view) = f.store.proposal_by_link(first.id, &token).unwrap();
    assert_eq!(vault, "default");
    assert_eq!(view, first);
    let wrong: Vec<(u64, String)> = vec![
        (first.id, other_token.clone()),
        (2, token.clone()),
        (99, token.clone()),
        (first.id, format!("{token}x")),
        (first.id, token[..token.len() - 1].to_string()),
        (first.id, new_token(APPROVAL_PREFIX)),
        (first.id, String::new()),
        (
            first.id,
            token.trim_start_matches(APPROVAL_PREFIX).to_string(),
        ),
    ];
    for (id, bad) in &wrong {
        let err = f.store.proposal_by_link(*id, bad).unwrap_err();
        assert_eq!(err.code(), "invalid_link", "{id} {bad}");
        assert_eq!(err.status(), axum::http::StatusCode::NOT_FOUND);
    }
    // The token is stored hashed only.
    for bytes in all_stored_bytes(&f) {
        assert!(!contains(&bytes, token.as_bytes()), "token stored in clear");
    }
    // Still valid after a decision (the page shows the outcome), until 24 h.
    f.store
        .reject_proposal(&owner(), "default", 2, Some("no".into()))
        .unwrap();
    let (_, decided) = f.store.proposal_by_link(2, &other_token).unwrap();
    assert_eq!(decided.status, ProposalStatus::Rejected);
    f.clock.advance_secs(LINK_TTL_SECS - 1);
    assert!(f.store.proposal_by_link(first.id, &token).is_ok());
    f.clock.advance_secs(1);
    let err = f.store.proposal_by_link(first.id, &token).unwrap_err();
    assert_eq!(err.code(), "invalid_link");
    let expired_message = err.to_string();
    let wrong_message = f
        .store
        .proposal_by_link(first.id, &other_token)
        .unwrap_err()
        .to_string();
    assert_eq!(
        expired_message, wrong_message,
        "no hint which part is wrong"
    );
    // The proposal itself is still pending and readable in the vault.
    assert_eq!(
        f.store.get_proposal(&owner(), "default", 1).unwrap().status,
        ProposalStatus::Pending
    );
}

#[test]
fn rotation_keeps_agent_values_readable() {
    let f = fixture();
    set_credential(&f, "EXISTING", "e");
    propose(
        &f,
        json!({"credentials": [{"key": "GENERATED_TOKEN", "value": "tok_abc123"}]}),
    )
    .unwrap();
    let before = raw_record(&f, 1).credentials[0].sealed.clone();
    assert_eq!(
        f.store.rotate_data_key().unwrap(),
        2,
        "one credential, one proposal value"
    );
    let after = raw_record(&f, 1).credentials[0].sealed.clone();
    assert_ne!(before, after, "resealed under the new key");
    f.store
        .approve_proposal(&owner(), "default", 1, Approval::new(BTreeMap::new(), true))
        .unwrap();
    assert_eq!(
        credential(&f, "GENERATED_TOKEN").as_deref(),
        Some("tok_abc123")
    );
    assert_eq!(credential(&f, "EXISTING").as_deref(), Some("e"));
}

#[test]
fn deleting_a_vault_removes_its_proposals_and_links() {
    let f = fixture();
    f.store.create_vault(&owner(), "doomed").unwrap();
    let (view, token) = f
        .store
        .create_proposal(&owner(), "doomed", input(stripe()))
        .unwrap();
    assert!(f.store.proposal_by_link(view.id, &token).is_ok());
    f.store.delete_vault(&owner(), "doomed").unwrap();
    assert!(f.store.trees.proposals.is_empty().unwrap());
    assert!(f.store.trees.proposal_links.is_empty().unwrap());
    assert_eq!(
        f.store
            .proposal_by_link(view.id, &token)
            .unwrap_err()
            .code(),
        "invalid_link"
    );
    // Created again: nothing of the old one, ids start over.
    f.store.create_vault(&owner(), "doomed").unwrap();
    assert!(f
        .store
        .list_proposals(&owner(), "doomed", None)
        .unwrap()
        .is_empty());
    let (again, _) = f
        .store
        .create_proposal(&owner(), "doomed", input(stripe()))
        .unwrap();
    assert_eq!(again.id, 1);
}

#[test]
fn status_names_round_trip() {
    for status in [
        ProposalStatus::Pending,
        ProposalStatus::Applied,
        ProposalStatus::Rejected,
        ProposalStatus::Expired,
    ] {
        assert_eq!(status.as_str().parse::<ProposalStatus>().unwrap(), status);
        assert_eq!(
            serde_json::to_value(status).unwrap(),
            Value::String(status.as_str().into())
        );
    }
    assert!("done".parse::<ProposalStatus>().is_err());
}

#[test]
fn approval_urls() {
    assert_eq!(
        approval_url("http://127.0.0.1:14321/", 3, "av_appr_x"),
        "http://127.0.0.1:14321/approve/3?token=av_appr_x"
    );
}

#[test]
fn only_an_admin_approves_a_proposal_that_changes_services() {
    let f = fixture();
    let (services, _) = propose(&f, stripe()).unwrap();
    let err = f
        .store
        .approve_proposal(
            &member(),
            "default",
            services.id,
            Approval::new(secrets(&[("STRIPE_KEY", "sk")]), false),
        )
        .unwrap_err();
    assert_eq!(err.status(), axum::http::StatusCode::FORBIDDEN, "{err}");
    assert!(err.to_string().contains("admin"), "{err}");
    assert_eq!(service_names(&f), Vec::<String>::new());
    assert_eq!(credential(&f, "STRIPE_KEY"), None);
    // A proposal that only sets credentials is a member's to approve.
    let (slots, _) = propose(
        &f,
        json!({"credentials": [{"action": "set", "key": "OTHER_KEY", "description": "d"}]}),
    )
    .unwrap();
    let applied = f
        .store
        .approve_proposal(
            &member(),
            "default",
            slots.id,
            Approval::new(secrets(&[("OTHER_KEY", "v")]), false),
        )
        .unwrap();
    assert_eq!(applied.status, ProposalStatus::Applied);
    // And the admin approves the service change.
    let applied = f
        .store
        .approve_proposal(
            &admin(),
            "default",
            services.id,
            Approval::new(secrets(&[("STRIPE_KEY", "sk")]), false),
        )
        .unwrap();
    assert_eq!(applied.status, ProposalStatus::Applied);
}

#[test]
fn a_warning_must_be_acknowledged_and_is_checked_against_the_vault_at_approval() {
    let f = fixture();
    set_credential(&f, "STRIPE_KEY", "sk_live_human");
    crate::testing::add_stripe_service(&f.store);
    // No secret asked for: only an existing key bound to the agent's host.
    let (view, _) = propose(
        &f,
        json!({"services": [{"name": "metrics", "host": "collector.attacker.example",
                             "auth": {"type": "bearer", "token": "STRIPE_KEY"}}]}),
    )
    .unwrap();
    let diff = f.store.proposal_diff(&admin(), "default", view.id).unwrap();
    let ids: Vec<&str> = diff.warnings.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(
        ids,
        ["existing_credential_to_new_host:STRIPE_KEY@collector.attacker.example"]
    );
    assert!(
        diff.warnings[0].message.contains("api.stripe.com"),
        "{:?}",
        diff.warnings
    );
    let version = f.store.snapshot_version().unwrap();
    for acknowledged in [
        vec![],
        vec!["existing_credential_to_new_host:OTHER@x".to_string()],
    ] {
        let approval = Approval {
            acknowledged: acknowledged.into_iter().collect(),
            ..Approval::default()
        };
        let err = f
            .store
            .approve_proposal(&admin(), "default", view.id, approval)
            .unwrap_err();
        assert_eq!(err.code(), "warnings_not_acknowledged", "{err}");
        assert_eq!(err.status(), axum::http::StatusCode::CONFLICT);
        assert!(
            err.to_string().contains("collector.attacker.example"),
            "{err}"
        );
    }
    assert_eq!(
        f.store.snapshot_version().unwrap(),
        version,
        "nothing applied"
    );
    assert_eq!(service_names(&f), ["stripe"]);
    let approval = Approval {
        acknowledged: diff.warnings.iter().map(|w| w.id.clone()).collect(),
        ..Approval::default()
    };
    let applied = f
        .store
        .approve_proposal(&admin(), "default", view.id, approval)
        .unwrap();
    assert_eq!(applied.status, ProposalStatus::Applied);
    assert_eq!(service_names(&f), ["stripe", "metrics"]);
    // Agents never get the diff.
    assert!(f
        .store
        .proposal_diff(&agent("bot"), "default", view.id)
        .is_err());
}

#[test]
fn accepting_the_agents_value_for_an_existing_key_needs_its_acknowledgement() {
    let f = fixture();
    set_credential(&f, "STRIPE_KEY", "sk_live_human");
    let (view, _) = propose(
        &f,
        json!({"credentials": [{"key": "STRIPE_KEY", "value": "sk_live_agents_account"}]}),
    )
    .unwrap();
    let accept = || Approval::new(BTreeMap::new(), true);
    let err = f
        .store
        .approve_proposal(&member(), "default", view.id, accept())
        .unwrap_err();
    assert_eq!(err.code(), "warnings_not_acknowledged", "{err}");
    assert_eq!(
        credential(&f, "STRIPE_KEY").as_deref(),
        Some("sk_live_human")
    );
    // Typing one's own value instead needs no acknowledgement.
    let typed = Approval::new(secrets(&[("STRIPE_KEY", "sk_live_typed")]), true);
    f.store
        .approve_proposal(&member(), "default", view.id, typed)
        .unwrap();
    assert_eq!(
        credential(&f, "STRIPE_KEY").as_deref(),
        Some("sk_live_typed")
    );
}

#[test]
fn members_and_admins_reveal_the_agents_values_while_pending_and_no_agent_ever_does() {
    let f = fixture();
    propose(
        &f,
        json!({"credentials": [
            {"key": "GENERATED_TOKEN", "value": "tok_confirm_me"},
            {"key": "TYPED_BY_HUMAN"}]}),
    )
    .unwrap();
    let opened = |who: &Principal| {
        f.store
            .reveal_proposal_values(who, "default", 1)
            .map(|values| {
                values
                    .into_iter()
                    .map(|(k, v)| (k, v.expose().to_string()))
                    .collect::<Vec<_>>()
            })
    };
    let expected = vec![("GENERATED_TOKEN".to_string(), "tok_confirm_me".to_string())];
    for who in [owner(), admin(), member()] {
        assert_eq!(opened(&who).unwrap(), expected);
    }
    // The agent that supplied it, and anyone outside the vault, are refused.
    assert_eq!(opened(&agent("bot")).unwrap_err().code(), "forbidden");
    assert!(opened(&stranger()).is_err());
    assert_eq!(
        f.store
            .reveal_proposal_values(&owner(), "default", 9)
            .unwrap_err()
            .code(),
        "proposal_not_found"
    );
    // Once decided, the sealed copy is gone: nothing to reveal.
    f.store
        .approve_proposal(
            &owner(),
            "default",
            1,
            Approval::new(secrets(&[("TYPED_BY_HUMAN", "typed")]), true),
        )
        .unwrap();
    assert_eq!(opened(&owner()).unwrap(), vec![]);
}

#[test]
fn a_proposal_carries_substitutions_and_redaction_and_a_catalog_template_brings_its_own() {
    let f = fixture();
    // The Telegram template: passthrough auth, the bot token in the path; its slot
    // (with BotFather's link) is added since the vault does not hold the key.
    let (view, _) = propose(
        &f,
        json!({"services": [{"name": "telegram", "catalog": "telegram"}]}),
    )
    .unwrap();
    let change = &view.services[0];
    assert_eq!(change.host.as_deref(), Some("api.telegram.org"));
    assert_eq!(
        serde_json::to_value(&change.substitutions).unwrap(),
        json!([{"key": "TELEGRAM_BOT_TOKEN", "placeholder": "__TELEGRAM_BOT_TOKEN__", "in": ["path"]}])
    );
    assert_eq!(view.credentials[0].key, "TELEGRAM_BOT_TOKEN");
    assert_eq!(
        view.credentials[0].obtain.as_deref(),
        Some("https://t.me/BotFather")
    );
    f.store
        .approve_proposal(
            &admin(),
            "default",
            view.id,
            all_acknowledged(
                &f,
                view.id,
                secrets(&[("TELEGRAM_BOT_TOKEN", "123:abc")]),
                false,
            ),
        )
        .unwrap();
    let applied = f
        .store
        .list_services(&owner(), "default")
        .unwrap()
        .into_iter()
        .find(|s| s.name == "telegram")
        .unwrap_or_else(|| panic!("telegram not applied"));
    assert_eq!(applied.substitutions.len(), 1);
    assert_eq!(applied.credential_keys(), vec!["TELEGRAM_BOT_TOKEN"]);
    assert!(applied.redacts_responses());

    // Declared by the agent, with redaction off.
    set_credential(&f, "ECHO_KEY", "k");
    let (view, _) = propose(
        &f,
        json!({"services": [{"name": "echo", "host": "echo.example.com",
            "auth": {"type": "passthrough"}, "redact_responses": false,
            "substitutions": [{"key": "ECHO_KEY", "placeholder": "__ECHO_KEY__", "in": ["query", "body"]}]}]}),
    )
    .unwrap();
    assert_eq!(view.services[0].redact_responses, Some(false));
    let diff = f.store.proposal_diff(&owner(), "default", view.id).unwrap();
    let json = serde_json::to_value(&diff).unwrap();
    assert_eq!(json["services"][0]["after"]["redact_responses"], false);
    assert_eq!(
        json["services"][0]["after"]["substitutions"][0]["placeholder"],
        "__ECHO_KEY__"
    );
    assert_eq!(json["services"][0]["after"]["keys"], json!(["ECHO_KEY"]));
}

#[test]
fn a_proposals_bad_substitution_is_refused_naming_it() {
    let f = fixture();
    #[rustfmt::skip]
    let cases: Vec<(&str, Value, &str)> = vec![
        ("a bad placeholder", json!({"services": [{"name": "s", "host": "s.example.com", "auth": {"type": "passthrough"},
            "substitutions": [{"key": "K", "placeholder": "K", "in": ["path"]}]}],
            "credentials": [{"key": "K"}]}), "invalid substitution"),
        ("a key neither held nor proposed", json!({"services": [{"name": "s", "host": "s.example.com", "auth": {"type": "passthrough"},
            "substitutions": [{"key": "MISSING", "placeholder": "__MISSING__", "in": ["path"]}]}]}), "MISSING"),
        ("a delete carrying substitutions", json!({"services": [{"action": "delete", "name": "s",
            "substitutions": [{"key": "K", "placeholder": "__KKKKKK__", "in": ["path"]}]}]}), "carries only its name"),
        ("a delete carrying redact_responses", json!({"services": [{"action": "delete", "name": "s",
            "redact_responses": false}]}), "carries only its name"),
        ("a delete carrying upstream_h2c", json!({"services": [{"action": "delete", "name": "s",
            "upstream_h2c": true}]}), "carries only its name"),
    ];
    for (behaviour, proposal, reason) in cases {
        let error = propose(&f, proposal).unwrap_err();
        assert_eq!(error.code(), "invalid_proposal", "{behaviour}: {error}");
        assert!(error.to_string().contains(reason), "{behaviour}: {error}");
    }
}

#[test]
fn a_proposal_carries_an_h2c_upstream_and_refuses_it_over_tls() {
    let f = fixture();
    let refused =
        "invalid upstream: upstream_h2c is for plain-HTTP upstreams (upstream_tls: false)";
    #[rustfmt::skip]
    let cases: Vec<(&str, Value)> = vec![
        ("h2c on a TLS upstream", json!({"services": [{"name": "g", "host": "grpc.example.com",
            "upstream_tls": true, "upstream_h2c": true, "auth": {"type": "passthrough"}}]})),
        ("h2c with upstream_tls left out (true)", json!({"services": [{"name": "g",
            "host": "grpc.example.com", "upstream_h2c": true, "auth": {"type": "passthrough"}}]})),
        ("h2c on a catalog template's TLS upstream", json!({"services": [{"name": "g",
            "catalog": "telegram", "upstream_h2c": true}]})),
    ];
    for (behaviour, proposal) in cases {
        let error = propose(&f, proposal).unwrap_err();
        assert_eq!(error.code(), "invalid_proposal", "{behaviour}: {error}");
        assert_eq!(
            error.to_string(),
            format!(
                "service \"g\": {refused}; a TLS upstream gets HTTP/2 by ALPN when it offers it"
            ),
            "{behaviour}"
        );
    }
    assert!(f
        .store
        .list_proposals(&owner(), "default", None)
        .unwrap()
        .is_empty());

    // Left out, it stays left out: the stored proposal's JSON is as before.
    let (view, _) = propose(
        &f,
        json!({"services": [{"name": "gh", "host": "api.github.com", "auth": {"type": "passthrough"}}]}),
    )
    .unwrap();
    assert_eq!(view.services[0].upstream_h2c, None);
    let json = serde_json::to_value(&view).unwrap();
    assert!(json["services"][0].get("upstream_h2c").is_none(), "{json}");

    let (view, _) = propose(
        &f,
        json!({"services": [{"name": "grpc", "host": "grpc.example.com:50051",
            "upstream_tls": false, "upstream_h2c": true, "auth": {"type": "passthrough"}}]}),
    )
    .unwrap();
    assert_eq!(view.services[0].upstream_h2c, Some(true));
    let diff = f.store.proposal_diff(&owner(), "default", view.id).unwrap();
    let json = serde_json::to_value(&diff).unwrap();
    assert_eq!(json["services"][0]["after"]["upstream_h2c"], true, "{json}");
    assert_eq!(
        json["services"][0]["after"]["upstream_tls"], false,
        "{json}"
    );
    f.store
        .approve_proposal(
            &admin(),
            "default",
            view.id,
            all_acknowledged(&f, view.id, BTreeMap::new(), false),
        )
        .unwrap();
    let applied = f
        .store
        .list_services(&owner(), "default")
        .unwrap()
        .into_iter()
        .find(|s| s.name == "grpc")
        .unwrap_or_else(|| panic!("grpc not applied"));
    assert!(applied.upstream_h2c && !applied.upstream_tls);
}
