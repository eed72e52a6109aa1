//! End-to-end tests of proposals (DESIGN.md §5, §8) through the real binary: the
//! seed's JSON posted by an agent token, every validation rule, the pending limit, who
//! may approve and reject, atomic application, agent-supplied values, and the CLI
//! (`vault proposal create|list|show|approve|reject|review`, `vault discover`).

use serde_json::{json, Value};

use agent_vault_testkit::control_plane::{
    bytes_on_disk, Api, Cli, CliOutput, Server, ServerOptions,
};

const OWNER: &str = "owner@example.com";
const OWNER_PASSWORD: &str = "owner-password";
const BOB: &str = "bob@example.com";
const BOB_PASSWORD: &str = "bob-password-1";

// ---------------------------------------------------------------- helpers

/// A server, the owner's CLI, Bob (an admin of `default`, not the owner) and an agent
/// `bot` on `default`.
struct Setup {
    server: Server,
    owner: Cli,
    bob: Cli,
    agent_token: String,
}

fn setup() -> Setup {
    setup_with(ServerOptions::default())
}

fn setup_with(options: ServerOptions) -> Setup {
    let server = Server::start_with(options);
    let owner = server.cli();
    owner.register_and_login(OWNER, OWNER_PASSWORD);
    // An admin of `default` who is not the owner: proposals that change services are
    // an admin's to approve (DESIGN.md §5).
    let bob = server.user_joins_by_invite(&owner, (BOB, BOB_PASSWORD), "admin", "default");
    let agent_token = owner
        .run(&["agent", "create", "bot", "--vault", "default"])
        .ok()
        .stdout
        .trim()
        .to_string();
    assert!(agent_token.starts_with("av_agt_"), "{agent_token}");
    Setup {
        server,
        owner,
        bob,
        agent_token,
    }
}

/// The session token a CLI saved under its HOME.
fn session_token(cli: &Cli) -> String {
    let path = cli.home.join(".agent-vault").join("session.json");
    let text = std::fs::read_to_string(&path).expect("session.json");
    let value: Value = serde_json::from_str(&text).expect("session JSON");
    value["token"].as_str().expect("token").to_string()
}

fn http_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// Raw HTTP as a user (session token).
fn user_api(s: &Setup, cli: &Cli) -> Api {
    Api {
        client: http_client(),
        ..s.server.api(Some(&session_token(cli)))
    }
}

/// Raw HTTP as an agent: `Authorization: Bearer av_agt_…` and `X-Vault`.
struct AgentApi {
    base: String,
    token: String,
    vault: String,
    client: reqwest::blocking::Client,
}

impl AgentApi {
    fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
    ) -> (u16, Value, String) {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("X-Vault", &self.vault);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let response = request.send().expect("request");
        let status = response.status().as_u16();
        let text = response.text().unwrap_or_default();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
        (status, value, text)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, value, _) = self.send(reqwest::Method::POST, path, Some(body.to_string()));
        (status, value)
    }

    fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let (status, value, _) = self.send(reqwest::Method::POST, path, Some(body.to_string()));
        (status, value)
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let (status, value, _) = self.send(reqwest::Method::GET, path, None);
        (status, value)
    }

    /// The raw body text too, to search it for values.
    fn get_text(&self, path: &str) -> (u16, String) {
        let (status, _, text) = self.send(reqwest::Method::GET, path, None);
        (status, text)
    }
}

fn agent_api(s: &Setup) -> AgentApi {
    AgentApi {
        base: s.server.url(),
        token: s.agent_token.clone(),
        vault: "default".into(),
        client: http_client(),
    }
}

/// Asserts an API answer is the JSON error `status`/`code` with a one-line message.
#[track_caller]
pub(crate) fn api_error(got: (u16, Value), status: u16, code: &str) -> String {
    let (got_status, body) = got;
    assert_eq!(got_status, status, "status; body: {body}");
    assert_eq!(body["error"], code, "error code; body: {body}");
    let message = body["message"].as_str().expect("message").to_string();
    assert!(
        !message.trim().is_empty() && !message.contains('\n'),
        "{message:?}"
    );
    message
}

/// Posts a proposal as the agent and returns its id.
#[track_caller]
fn propose(agent: &AgentApi, body: &Value) -> u64 {
    let (status, created) = agent.post("/v1/proposals", body);
    assert_eq!(status, 201, "{created}");
    created["id"].as_u64().expect("id")
}

fn value_of(api: &Api, key: &str) -> Option<String> {
    let (status, body) = api.get(&format!("/v1/vaults/default/credentials/{key}"));
    match status {
        200 => Some(body["value"].as_str().expect("value").to_string()),
        404 => None,
        other => panic!("get {key}: {other} {body}"),
    }
}

fn keys_of(api: &Api) -> Vec<String> {
    let (status, body) = api.get("/v1/vaults/default/credentials");
    assert_eq!(status, 200, "{body}");
    body.as_array()
        .expect("array")
        .iter()
        .map(|c| c["key"].as_str().expect("key").to_string())
        .collect()
}

fn service_names(api: &Api) -> Vec<String> {
    let (status, body) = api.get("/v1/vaults/default/services");
    assert_eq!(status, 200, "{body}");
    body.as_array()
        .expect("array")
        .iter()
        .map(|s| s["name"].as_str().expect("name").to_string())
        .collect()
}

fn stripe_proposal() -> Value {
    json!({
        "services": [{"action": "set", "name": "stripe", "host": "api.stripe.com",
                      "auth": {"type": "bearer", "token": "STRIPE_KEY"}}],
        "credentials": [{"action": "set", "key": "STRIPE_KEY", "description": "Stripe API key",
                         "obtain": "https://dashboard.stripe.com/apikeys",
                         "obtain_instructions": "Developers > API Keys > Reveal test key"}],
        "message": "Stripe access for billing",
        "user_message": "I need to create test charges."
    })
}

/// The seed's three examples, verbatim.
fn seed_examples() -> [Value; 3] {
    [
        json!({
          "credentials": [{
            "action": "set",
            "key": "STRIPE_KEY",
            "description": "Stripe API key",
            "obtain": "https://dashboard.stripe.com/apikeys",
            "obtain_instructions": "Developers > API Keys > Reveal test key"
          }]
        }),
        json!({
          "credentials": [{
            "action": "set",
            "key": "GENERATED_TOKEN",
            "description": "Token generated during setup",
            "value": "tok_abc123"
          }]
        }),
        json!({
          "credentials": [{ "action": "delete", "key": "OLD_API_KEY" }],
          "message": "Remove unused API key"
        }),
    ]
}

fn run(cli: &Cli, args: &[&str]) -> CliOutput {
    cli.run(args)
}

// ---------------------------------------------------------------- the API

#[test]
fn the_seeds_json_is_accepted_and_no_get_ever_returns_a_value() {
    let s = setup_with(ServerOptions {
        password: None,
        extra_args: vec![
            "--allow-private-upstreams".into(),
            "--public-url".into(),
            "https://vault.example.com/".into(),
        ],
        ..ServerOptions::default()
    });
    let agent = agent_api(&s);
    let mut tokens = Vec::new();
    for (i, example) in seed_examples().iter().enumerate() {
        let (status, created) = agent.post("/v1/proposals", example);
        assert_eq!(status, 201, "example {}: {created}", i + 1);
        let id = i as u64 + 1;
        assert_eq!(created["id"], id, "{created}");
        assert_eq!(created["status"], "pending");
        assert_eq!(created["vault"], "default");
        let url = created["approval_url"].as_str().expect("approval_url");
        let prefix = format!("https://vault.example.com/approve/{id}?token=av_appr_");
        let hex = url
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{url} does not start with {prefix}"));
        assert!(
            hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()),
            "{url}"
        );
        let message = created["message"].as_str().expect("message");
        assert!(
            message.contains(url) && message.contains("human"),
            "{message}"
        );
        tokens.push(url.split("token=").nth(1).expect("token").to_string());
    }

    // The agent polls: has_value, never the value, on every read route.
    let (status, proposal) = agent.get("/v1/proposals/2");
    assert_eq!(status, 200, "{proposal}");
    assert_eq!(proposal["status"], "pending");
    assert_eq!(proposal["agent"], "bot");
    assert_eq!(proposal["credentials"][0]["key"], "GENERATED_TOKEN");
    assert_eq!(proposal["credentials"][0]["has_value"], true);
    assert!(
        proposal["credentials"][0].get("value").is_none(),
        "{proposal}"
    );
    assert!(proposal["review"].is_null());
    let first = agent.get("/v1/proposals/1").1;
    assert_eq!(
        first["credentials"][0]["obtain"],
        "https://dashboard.stripe.com/apikeys"
    );
    assert_eq!(first["credentials"][0]["has_value"], false);
    let third = agent.get("/v1/proposals/3").1;
    assert_eq!(third["message"], "Remove unused API key");
    assert_eq!(third["credentials"][0]["action"], "delete");
    let bob = user_api(&s, &s.bob);
    for (status, text) in [
        agent.get_text("/v1/proposals"),
        agent.get_text("/v1/proposals/2"),
        agent.get_text("/v1/proposals?status=pending"),
    ] {
        assert_eq!(status, 200, "{text}");
        assert!(!text.contains("tok_abc123"), "{text}");
    }
    for path in [
        "/v1/vaults/default/proposals",
        "/v1/vaults/default/proposals/2",
    ] {
        let (status, body) = bob.get(path);
        assert_eq!(status, 200, "{body}");
        assert!(!body.to_string().contains("tok_abc123"), "{body}");
    }
    let (status, list) = agent.get("/v1/proposals");
    assert_eq!(status, 200);
    assert_eq!(list.as_array().expect("array").len(), 3);
    // Neither the agent's value nor an approval token is on disk in clear.
    let data = s.server.data_dir();
    assert!(bytes_on_disk(&data, b"tok_abc123").is_empty());
    for token in &tokens {
        assert!(bytes_on_disk(&data, token.as_bytes()).is_empty());
    }
    // Unknown ids and statuses.
    api_error(agent.get("/v1/proposals/99"), 404, "proposal_not_found");
    api_error(agent.get("/v1/proposals/abc"), 404, "proposal_not_found");
    api_error(
        agent.get("/v1/proposals?status=done"),
        400,
        "invalid_request",
    );
    // Without X-Vault, an agent with one vault uses it.
    let (status, _, _) = {
        let plain = http_client();
        let response = plain
            .get(format!("{}/v1/proposals/1", s.server.url()))
            .bearer_auth(&s.agent_token)
            .send()
            .expect("request");
        (response.status().as_u16(), (), ())
    };
    assert_eq!(status, 200);
}

#[test]
fn every_validation_rule_is_a_400_and_nothing_is_stored() {
    let s = setup();
    let owner = user_api(&s, &s.owner);
    let (status, body) = owner.post(
        "/v1/vaults/default/credentials",
        &json!({"credentials": {"EXISTING": "x"}}),
    );
    assert_eq!(status, 200, "{body}");
    let agent = agent_api(&s);
    let long = |n: usize| "x".repeat(n);
    let svc = |name: String| json!({"action": "set", "name": name, "host": "svc.example.com", "auth": {"type": "passthrough"}});
    let cases: Vec<(&str, Value, &str)> = vec![
        ("nothing proposed", json!({}), "at least one"),
        (
            "only messages",
            json!({"message": "hi", "user_message": "there"}),
            "at least one",
        ),
        (
            "11 services",
            json!({"services": (0..11).map(|i| svc(format!("s{i}"))).collect::<Vec<_>>()}),
            "at most 10 services",
        ),
        (
            "11 slots",
            json!({"credentials": (0..11).map(|i| json!({"action": "set", "key": format!("K{i}")})).collect::<Vec<_>>()}),
            "at most 10 credential slots",
        ),
        (
            "description over 500",
            json!({"credentials": [{"action": "set", "key": "A", "description": long(501)}]}),
            "description",
        ),
        (
            "obtain not a URL",
            json!({"credentials": [{"action": "set", "key": "A", "obtain": "dashboard.stripe.com"}]}),
            "http:// or https://",
        ),
        (
            "obtain javascript:",
            json!({"credentials": [{"action": "set", "key": "A", "obtain": "javascript:alert(1)"}]}),
            "http:// or https://",
        ),
        (
            "obtain over 500",
            json!({"credentials": [{"action": "set", "key": "A", "obtain": format!("https://a.example.com/{}", long(490))}]}),
            "longer than 500",
        ),
        (
            "obtain_instructions over 1000",
            json!({"credentials": [{"action": "set", "key": "A", "obtain_instructions": long(1001)}]}),
            "obtain_instructions",
        ),
        (
            "message over 2000",
            json!({"credentials": [{"action": "set", "key": "A"}], "message": long(2001)}),
            "message is longer than 2000",
        ),
        (
            "user_message over 5000",
            json!({"credentials": [{"action": "set", "key": "A"}], "user_message": long(5001)}),
            "user_message is longer than 5000",
        ),
        (
            "key format",
            json!({"credentials": [{"action": "set", "key": "stripe-key"}]}),
            "invalid credential key",
        ),
        (
            "duplicate keys",
            json!({"credentials": [{"action": "set", "key": "A"}, {"action": "set", "key": "A"}]}),
            "appears twice",
        ),
        (
            "duplicate service names",
            json!({"services": [svc("s".into()), svc("s".into())]}),
            "appears twice",
        ),
        (
            "reference to a missing key",
            json!({"services": [{"action": "set", "name": "s", "host": "s.example.com",
                                 "auth": {"type": "bearer", "token": "NOPE"}}]}),
            "NOPE",
        ),
        (
            "reference to a deleted key",
            json!({"services": [{"action": "set", "name": "s", "host": "s.example.com",
                                 "auth": {"type": "bearer", "token": "EXISTING"}}],
                   "credentials": [{"action": "delete", "key": "EXISTING"}]}),
            "deletes",
        ),
        (
            "delete slot with more than its key",
            json!({"credentials": [{"action": "delete", "key": "OLD_API_KEY", "description": "x"}]}),
            "only its key",
        ),
        (
            "delete slot with a value",
            json!({"credentials": [{"action": "delete", "key": "OLD_API_KEY", "value": "v"}]}),
            "only its key",
        ),
        (
            "delete service with more than its name",
            json!({"services": [{"action": "delete", "name": "old", "host": "old.example.com"}]}),
            "only its name",
        ),
        (
            "set service without auth",
            json!({"services": [{"action": "set", "name": "s", "host": "s.example.com"}]}),
            "needs host and auth",
        ),
        (
            "bad host",
            json!({"services": [{"action": "set", "name": "s", "host": "https://s.example.com/",
                                 "auth": {"type": "passthrough"}}]}),
            "invalid host",
        ),
        (
            "empty agent value",
            json!({"credentials": [{"action": "set", "key": "A", "value": ""}]}),
            "empty",
        ),
    ];
    for (behaviour, body, expected) in &cases {
        let message = api_error(agent.post("/v1/proposals", body), 400, "invalid_proposal");
        assert!(
            message.contains(expected),
            "{behaviour}: {message:?} lacks {expected:?}"
        );
    }
    // Bad JSON shapes are 400 too (the body type refuses them).
    api_error(
        agent.post(
            "/v1/proposals",
            &json!({"credentials": [{"key": "A"}], "colour": "red"}),
        ),
        400,
        "invalid_request",
    );
    api_error(
        agent.post(
            "/v1/proposals",
            &json!({"credentials": [{"action": "add", "key": "A"}]}),
        ),
        400,
        "invalid_request",
    );
    api_error(
        agent.post_raw("/v1/proposals", "{\"credentials\": ["),
        400,
        "invalid_json",
    );
    // Nothing stored: no proposal, and the next one is number 1.
    let (status, list) = agent.get("/v1/proposals");
    assert_eq!(status, 200);
    assert_eq!(list, json!([]));
    assert_eq!(owner.get("/v1/vaults/default/proposals").1, json!([]));
    assert_eq!(propose(&agent, &stripe_proposal()), 1);
}

#[test]
fn the_21st_pending_proposal_is_429() {
    let s = setup();
    let agent = agent_api(&s);
    for i in 1..=20 {
        assert_eq!(propose(&agent, &stripe_proposal()), i);
    }
    api_error(
        agent.post("/v1/proposals", &stripe_proposal()),
        429,
        "too_many_proposals",
    );
    // A decision makes room.
    let bob = user_api(&s, &s.bob);
    let (status, body) = bob.post("/v1/vaults/default/proposals/1/reject", &json!({}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(propose(&agent, &stripe_proposal()), 21);
}

#[test]
fn no_agent_token_can_approve_or_reject() {
    let s = setup();
    let agent = agent_api(&s);
    let id = propose(
        &agent,
        &json!({"credentials": [{"key": "GENERATED_TOKEN", "value": "tok_abc123"}]}),
    );
    let approve = format!("/v1/vaults/default/proposals/{id}/approve");
    let reject = format!("/v1/vaults/default/proposals/{id}/reject");
    api_error(
        agent.post(
            &approve,
            &json!({"values": {"GENERATED_TOKEN": "x"}, "accept_agent_values": true}),
        ),
        403,
        "forbidden",
    );
    api_error(agent.post(&approve, &json!({})), 403, "forbidden");
    api_error(
        agent.post(&reject, &json!({"reason": "self"})),
        403,
        "forbidden",
    );
    api_error(
        agent.post("/v1/vaults/other-vault/proposals/1/approve", &json!({})),
        403,
        "forbidden",
    );
    // Another agent's token: also 403, and it cannot even read the proposal.
    let other = s
        .owner
        .run(&["agent", "create", "other-bot", "--vault", "default"])
        .ok()
        .stdout
        .trim()
        .to_string();
    let other = AgentApi {
        token: other,
        ..agent_api(&s)
    };
    api_error(other.post(&reject, &json!({})), 403, "forbidden");
    api_error(
        other.get(&format!("/v1/proposals/{id}")),
        404,
        "proposal_not_found",
    );
    assert_eq!(other.get("/v1/proposals").1, json!([]));
    // The CLI with an agent token is refused the same way.
    let agent_cli = s.owner.with_token(&s.agent_token);
    let out = run(&agent_cli, &["vault", "proposal", "reject", "1"]).fails();
    assert!(
        out.stderr.contains("agents cannot approve or reject"),
        "{}",
        out.stderr
    );
    // Untouched.
    let (_, proposal) = agent.get(&format!("/v1/proposals/{id}"));
    assert_eq!(proposal["status"], "pending");
    let bob = user_api(&s, &s.bob);
    assert_eq!(value_of(&bob, "GENERATED_TOKEN"), None);
}

#[test]
fn a_vault_admin_approves_with_values_and_the_change_is_live() {
    let s = setup();
    let agent = agent_api(&s);
    let bob = user_api(&s, &s.bob);
    let id = propose(&agent, &stripe_proposal());
    let approve = format!("/v1/vaults/default/proposals/{id}/approve");
    // Every set slot needs a value.
    let message = api_error(bob.post(&approve, &json!({})), 400, "value_required");
    assert!(message.contains("STRIPE_KEY"), "{message}");
    api_error(
        bob.post(
            &approve,
            &json!({"values": {"STRIPE_KEY": "x", "OTHER": "y"}}),
        ),
        400,
        "invalid_request",
    );
    api_error(
        bob.post(&approve, &json!({"values": {}, "extra": 1})),
        400,
        "invalid_request",
    );
    assert!(service_names(&bob).is_empty());

    let (status, applied) = bob.post(
        &approve,
        &json!({"values": {"STRIPE_KEY": "sk_test_abc123"}}),
    );
    assert_eq!(status, 200, "{applied}");
    assert_eq!(applied["status"], "applied");
    assert_eq!(applied["review"]["by"], BOB);
    assert!(!applied.to_string().contains("sk_test_abc123"), "{applied}");
    assert_eq!(
        value_of(&bob, "STRIPE_KEY").as_deref(),
        Some("sk_test_abc123")
    );
    assert_eq!(service_names(&bob), vec!["stripe"]);
    let (_, services) = bob.get("/v1/vaults/default/services");
    assert_eq!(
        services[0],
        json!({"name": "stripe", "host": "api.stripe.com", "enabled": true,
               "auth": {"type": "bearer", "token": "STRIPE_KEY"}, "upstream_tls": true})
    );
    // The agent sees the outcome, and can discover the new service and key.
    let (_, polled) = agent.get(&format!("/v1/proposals/{id}"));
    assert_eq!(polled["status"], "applied");
    let (status, discovered) = agent.get("/discover");
    assert_eq!(status, 200, "{discovered}");
    assert_eq!(discovered["services"][0]["name"], "stripe");
    assert_eq!(discovered["credentials"], json!(["STRIPE_KEY"]));
    // Once only.
    let message = api_error(
        bob.post(&approve, &json!({"values": {"STRIPE_KEY": "again"}})),
        409,
        "not_pending",
    );
    assert!(message.contains("applied"), "{message}");
    api_error(
        bob.post(
            &format!("/v1/vaults/default/proposals/{id}/reject"),
            &json!({}),
        ),
        409,
        "not_pending",
    );
    assert_eq!(
        value_of(&bob, "STRIPE_KEY").as_deref(),
        Some("sk_test_abc123")
    );
    // A user may propose too (through the agent route, naming the vault).
    let mut by_bob = stripe_proposal();
    by_bob["services"][0]["name"] = json!("stripe-2");
    let (status, created) = {
        let api = AgentApi {
            token: session_token(&s.bob),
            ..agent_api(&s)
        };
        api.post("/v1/proposals", &by_bob)
    };
    assert_eq!(status, 201, "{created}");
    let (_, shown) = bob.get(&format!("/v1/vaults/default/proposals/{}", created["id"]));
    assert_eq!(shown["created_by"], json!({"kind": "user", "email": BOB}));
    assert!(shown["agent"].is_null());
}

#[test]
fn an_agent_supplied_value_is_accepted_or_overridden() {
    let s = setup();
    let agent = agent_api(&s);
    let bob = user_api(&s, &s.bob);
    let body = seed_examples()[1].clone();
    let first = propose(&agent, &body);
    let second = propose(&agent, &body);
    let third = propose(&agent, &body);
    // Not accepted and no value of one's own: refused, with a hint.
    let message = api_error(
        bob.post(
            &format!("/v1/vaults/default/proposals/{first}/approve"),
            &json!({}),
        ),
        400,
        "value_required",
    );
    assert!(
        message.contains("GENERATED_TOKEN") && message.contains("accept_agent_values"),
        "{message}"
    );
    let (status, body) = bob.post(
        &format!("/v1/vaults/default/proposals/{first}/approve"),
        &json!({"accept_agent_values": true}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        value_of(&bob, "GENERATED_TOKEN").as_deref(),
        Some("tok_abc123")
    );
    let (status, body) = bob.post(
        &format!("/v1/vaults/default/proposals/{second}/approve"),
        &json!({"values": {"GENERATED_TOKEN": "tok_from_the_human"}, "accept_agent_values": true}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        value_of(&bob, "GENERATED_TOKEN").as_deref(),
        Some("tok_from_the_human")
    );
    // After master-key rotation the agent's value of a pending proposal still opens.
    let owner = user_api(&s, &s.owner);
    let (status, body) = owner.post("/v1/master-key/rotate", &json!({}));
    assert_eq!(status, 200, "{body}");
    // GENERATED_TOKEN is in the vault now: taking the agent's value replaces it, which
    // the reviewer acknowledges.
    let (status, body) = bob.post(
        &format!("/v1/vaults/default/proposals/{third}/approve"),
        &json!({"accept_agent_values": true,
                "acknowledge": ["agent_value_replaces_credential:GENERATED_TOKEN"]}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        value_of(&bob, "GENERATED_TOKEN").as_deref(),
        Some("tok_abc123")
    );
}

#[test]
fn a_rejection_and_its_reason_reach_the_agent() {
    let s = setup();
    let agent = agent_api(&s);
    let bob = user_api(&s, &s.bob);
    let id = propose(&agent, &stripe_proposal());
    let reject = format!("/v1/vaults/default/proposals/{id}/reject");
    api_error(
        bob.post(&reject, &json!({"reason": "x".repeat(1001)})),
        400,
        "invalid_request",
    );
    let (status, rejected) = bob.post(&reject, &json!({"reason": "Use the team account instead"}));
    assert_eq!(status, 200, "{rejected}");
    assert_eq!(rejected["status"], "rejected");
    let (_, polled) = agent.get(&format!("/v1/proposals/{id}"));
    assert_eq!(polled["status"], "rejected");
    assert_eq!(polled["review"]["by"], BOB);
    assert_eq!(polled["review"]["reason"], "Use the team account instead");
    assert!(polled["review"]["at"].as_i64().is_some());
    let (_, rejected_list) = agent.get("/v1/proposals?status=rejected");
    assert_eq!(rejected_list.as_array().expect("array").len(), 1);
    assert_eq!(agent.get("/v1/proposals?status=pending").1, json!([]));
    api_error(
        bob.post(
            &format!("/v1/vaults/default/proposals/{id}/approve"),
            &json!({"values": {"STRIPE_KEY": "x"}}),
        ),
        409,
        "not_pending",
    );
    assert!(service_names(&bob).is_empty());
    assert!(keys_of(&bob).is_empty());
    // An empty body rejects without a reason.
    let id = propose(&agent, &stripe_proposal());
    let (status, body) = bob.post_raw(&format!("/v1/vaults/default/proposals/{id}/reject"), b"");
    assert_eq!(status, 200, "{body}");
    assert!(body["review"]["reason"].is_null());
}

#[test]
fn a_failing_approval_applies_nothing() {
    let s = setup();
    let agent = agent_api(&s);
    let owner = user_api(&s, &s.owner);
    let bob = user_api(&s, &s.bob);
    let (status, body) = owner.post(
        "/v1/vaults/default/credentials",
        &json!({"credentials": {"KEEP": "keep-value", "DOOMED": "d"}}),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = owner.post(
        "/v1/vaults/default/services",
        &json!({"name": "keep", "host": "keep.example.com", "auth": {"type": "bearer", "token": "KEEP"}}),
    );
    assert_eq!(status, 201, "{body}");
    let id = propose(
        &agent,
        &json!({
            "services": [
                {"action": "set", "name": "new", "host": "new.example.com",
                 "auth": {"type": "bearer", "token": "NEW_KEY"}},
                {"action": "set", "name": "keep", "host": "moved.example.com",
                 "auth": {"type": "passthrough"}}
            ],
            "credentials": [
                {"action": "set", "key": "NEW_KEY"},
                {"action": "set", "key": "KEEP"},
                {"action": "delete", "key": "DOOMED"}
            ]
        }),
    );
    // The key to delete goes away before the approval: the delete fails halfway.
    let (status, body) = owner.post(
        "/v1/vaults/default/credentials/delete",
        &json!({"keys": ["DOOMED"]}),
    );
    assert_eq!(status, 200, "{body}");
    let (_, services_before) = owner.get("/v1/vaults/default/services");
    let message = api_error(
        bob.post(
            &format!("/v1/vaults/default/proposals/{id}/approve"),
            &json!({"values": {"NEW_KEY": "new-value", "KEEP": "overwritten"},
                    "acknowledge": ["host_changed:keep"]}),
        ),
        409,
        "apply_failed",
    );
    assert!(message.contains("DOOMED"), "{message}");
    assert_eq!(owner.get("/v1/vaults/default/services").1, services_before);
    assert_eq!(keys_of(&owner), vec!["KEEP"]);
    assert_eq!(value_of(&owner, "KEEP").as_deref(), Some("keep-value"));
    let (_, proposal) = agent.get(&format!("/v1/proposals/{id}"));
    assert_eq!(proposal["status"], "pending");
    assert!(proposal["review"].is_null());
}

// ---------------------------------------------------------------- the CLI

#[test]
fn cli_create_list_show_approve_reject_and_discover() {
    let s = setup();
    let agent_cli = s.owner.with_token(&s.agent_token);
    // Flags: one service and its slot.
    let out = run(
        &agent_cli,
        &[
            "vault",
            "proposal",
            "create",
            "--service-name",
            "stripe",
            "--host",
            "api.stripe.com",
            "--auth-type",
            "bearer",
            "--token-key",
            "STRIPE_KEY",
            "--credential",
            "STRIPE_KEY:Stripe API key",
            "--message",
            "Stripe access",
        ],
    )
    .ok();
    assert!(
        out.stdout
            .contains("Proposal 1 is pending in vault default"),
        "{}",
        out.stdout
    );
    let url = format!("{}/approve/1?token=av_appr_", s.server.url());
    assert!(out.stdout.contains(&url), "{}", out.stdout);
    // -f - with the seed's JSON (an agent-supplied value).
    let out = agent_cli
        .run_stdin(
            &["vault", "proposal", "create", "-f", "-", "--json"],
            &seed_examples()[1].to_string(),
        )
        .ok();
    assert_eq!(out.json()["id"], 2);
    assert_eq!(out.json()["status"], "pending");
    // -f with a file: the third example.
    let file = s.server.dir.path().join("delete.json");
    std::fs::write(&file, seed_examples()[2].to_string()).expect("write");
    run(
        &agent_cli,
        &[
            "vault",
            "proposal",
            "create",
            "-f",
            file.to_str().expect("path"),
        ],
    )
    .ok();
    let out = run(
        &agent_cli,
        &[
            "vault",
            "proposal",
            "create",
            "--host",
            "a.example.com",
            "--credential",
            "A",
        ],
    )
    .fails();
    assert!(out.stderr.contains("--service-name"), "{}", out.stderr);
    let out = run(
        &agent_cli,
        &["vault", "proposal", "create", "--credential", "bad-key"],
    )
    .fails();
    assert!(
        out.stderr.contains("invalid credential key"),
        "{}",
        out.stderr
    );

    // list / show as the owner and as the agent; never a value.
    let out = run(&s.owner, &["vault", "proposal", "list"]).ok();
    for expected in [
        "STATUS",
        "pending",
        "agent bot",
        "stripe",
        "STRIPE_KEY",
        "GENERATED_TOKEN*",
        "-OLD_API_KEY",
    ] {
        assert!(
            out.stdout.contains(expected),
            "{expected} in {}",
            out.stdout
        );
    }
    let out = run(&s.owner, &["vault", "proposal", "list", "--json"]).ok();
    assert_eq!(out.json().as_array().expect("array").len(), 3);
    assert!(!out.stdout.contains("tok_abc123"));
    let out = run(&agent_cli, &["vault", "proposal", "show", "2"]).ok();
    assert!(
        out.stdout.contains("value provided by the agent"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("tok_abc123"), "{}", out.stdout);
    let out = run(&s.owner, &["vault", "proposal", "show", "2", "--json"]).ok();
    assert_eq!(out.json()["credentials"][0]["has_value"], true);
    assert!(!out.stdout.contains("tok_abc123"));
    // --reveal: the owner confirms the agent's value; the agent never reads it back.
    let out = run(&s.owner, &["vault", "proposal", "show", "2", "--reveal"]).ok();
    assert!(out.stdout.contains("value:  tok_abc123"), "{}", out.stdout);
    let out = run(
        &s.owner,
        &["vault", "proposal", "show", "2", "--reveal", "--json"],
    )
    .ok();
    assert_eq!(out.json()["values"]["GENERATED_TOKEN"], "tok_abc123");
    let out = run(&agent_cli, &["vault", "proposal", "show", "2", "--reveal"]).fails();
    assert!(
        out.stderr.contains("an agent cannot reveal"),
        "{}",
        out.stderr
    );
    assert!(!out.stdout.contains("tok_abc123"));
    let out = run(&s.owner, &["vault", "proposal", "show", "1"]).ok();
    for expected in [
        "Proposal 1 in vault default: pending",
        "api.stripe.com",
        "bearer (STRIPE_KEY)",
        "Stripe API key",
    ] {
        assert!(
            out.stdout.contains(expected),
            "{expected} in {}",
            out.stdout
        );
    }

    // approve without a terminal: a missing value is an error naming the key.
    let out = run(&s.bob, &["vault", "proposal", "approve", "1"]).fails();
    assert!(out.stderr.contains("STRIPE_KEY"), "{}", out.stderr);
    let out = run(&s.bob, &["vault", "proposal", "approve", "1", "OTHER=1"]).fails();
    assert!(
        out.stderr.contains("no credential slot OTHER"),
        "{}",
        out.stderr
    );
    let out = run(
        &s.bob,
        &[
            "vault",
            "proposal",
            "approve",
            "1",
            "STRIPE_KEY=sk_test_abc123",
        ],
    )
    .ok();
    assert!(out.stdout.contains("Applied proposal 1"), "{}", out.stdout);
    assert!(!out.stdout.contains("sk_test_abc123"));
    let out = run(&s.bob, &["vault", "credential", "get", "STRIPE_KEY"]).ok();
    assert_eq!(out.stdout, "sk_test_abc123\n");
    let out = run(
        &s.bob,
        &["vault", "proposal", "approve", "1", "STRIPE_KEY=x"],
    )
    .fails();
    assert!(out.stderr.contains("applied"), "{}", out.stderr);
    // An agent-supplied value needs --yes (or a terminal to ask on).
    let out = run(&s.bob, &["vault", "proposal", "approve", "2"]).fails();
    assert!(
        out.stderr.contains("GENERATED_TOKEN") && out.stderr.contains("--yes"),
        "{}",
        out.stderr
    );
    run(&s.bob, &["vault", "proposal", "approve", "2", "--yes"]).ok();
    let out = run(&s.bob, &["vault", "credential", "get", "GENERATED_TOKEN"]).ok();
    assert_eq!(out.stdout, "tok_abc123\n");
    // reject with a reason; the agent reads it.
    let out = run(
        &s.bob,
        &[
            "vault",
            "proposal",
            "reject",
            "3",
            "--reason",
            "Still in use",
        ],
    )
    .ok();
    assert!(out.stdout.contains("Rejected proposal 3"), "{}", out.stdout);
    let out = run(&agent_cli, &["vault", "proposal", "show", "3", "--json"]).ok();
    assert_eq!(out.json()["status"], "rejected");
    assert_eq!(out.json()["review"]["reason"], "Still in use");
    let out = run(
        &agent_cli,
        &["vault", "proposal", "list", "--status", "applied", "--json"],
    )
    .ok();
    let ids: Vec<u64> = out
        .json()
        .as_array()
        .expect("array")
        .iter()
        .map(|p| p["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(ids, vec![1, 2]);
    let out = run(
        &s.owner,
        &["vault", "proposal", "list", "--status", "pending"],
    )
    .ok();
    assert!(
        out.stdout.contains("No pending proposals"),
        "{}",
        out.stdout
    );

    // vault discover, as the agent: the approved service and keys, no values.
    let out = run(&agent_cli, &["vault", "discover", "--json"]).ok();
    let found = out.json();
    assert_eq!(found["vault"], "default");
    assert_eq!(found["services"][0]["name"], "stripe");
    assert_eq!(found["services"][0]["auth_type"], "bearer");
    assert_eq!(
        found["credentials"],
        json!(["GENERATED_TOKEN", "STRIPE_KEY"])
    );
    assert!(!out.stdout.contains("sk_test_abc123") && !out.stdout.contains("tok_abc123"));
    let out = run(&agent_cli, &["vault", "discover"]).ok();
    assert!(out.stdout.contains("api.stripe.com"), "{}", out.stdout);
}

#[test]
fn cli_review_reads_its_answers_from_stdin() {
    let s = setup();
    let agent = agent_api(&s);
    let slot = |key: &str| json!({"credentials": [{"action": "set", "key": key}]});
    propose(&agent, &stripe_proposal()); // 1: approve with a value
    propose(&agent, &seed_examples()[1]); // 2: approve, accepting the agent's value
    propose(&agent, &slot("REJECT_ME")); // 3: reject with a reason
    propose(&agent, &slot("SKIP_ME")); // 4: skip
    propose(
        &agent,
        &json!({"credentials": [{"action": "delete", "key": "ABSENT"}]}),
    ); // 5: approve fails
    propose(&agent, &slot("LATER")); // 6: not reviewed (quit)
    let answers = "a\nsk_review_value\na\n\nr\nnot needed\nwhat\ns\na\nq\n";
    let out = s
        .bob
        .run_stdin(&["vault", "proposal", "review"], answers)
        .ok();
    assert!(out.stdout.contains("[1/6] Proposal 1"), "{}", out.stdout);
    assert!(out.stdout.contains("Applied proposal 1"), "{}", out.stdout);
    assert!(out.stdout.contains("Rejected proposal 3"), "{}", out.stdout);
    assert!(out.stdout.contains("Skipped proposal 4"), "{}", out.stdout);
    assert!(
        out.stderr.contains("proposal 5 not applied"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("ABSENT"), "{}", out.stderr);
    assert!(
        out.stdout.contains(
            "Review of vault default: 2 approved (#1, #2), 1 rejected (#3), 1 skipped (#4), 1 failed (#5), 1 not reviewed (#6)"
        ),
        "{}",
        out.stdout
    );
    for secret in ["sk_review_value", "tok_abc123"] {
        assert!(
            !out.stdout.contains(secret) && !out.stderr.contains(secret),
            "{secret} printed"
        );
    }
    let bob = user_api(&s, &s.bob);
    assert_eq!(
        value_of(&bob, "STRIPE_KEY").as_deref(),
        Some("sk_review_value")
    );
    assert_eq!(
        value_of(&bob, "GENERATED_TOKEN").as_deref(),
        Some("tok_abc123")
    );
    assert_eq!(service_names(&bob), vec!["stripe"]);
    let status = |id: u64| agent.get(&format!("/v1/proposals/{id}")).1["status"].clone();
    assert_eq!(
        (1..=6).map(status).collect::<Vec<_>>(),
        vec![
            json!("applied"),
            json!("applied"),
            json!("rejected"),
            json!("pending"),
            json!("pending"),
            json!("pending"),
        ]
    );
    assert_eq!(
        agent.get("/v1/proposals/3").1["review"]["reason"],
        "not needed"
    );
    // End of input quits; with nothing pending there is nothing to ask.
    let out = s.bob.run_stdin(&["vault", "proposal", "review"], "").ok();
    assert!(
        out.stdout.contains("3 not reviewed (#4, #5, #6)"),
        "{}",
        out.stdout
    );
    let bob_api = user_api(&s, &s.bob);
    for id in 4..=6 {
        let (status, body) = bob_api.post(
            &format!("/v1/vaults/default/proposals/{id}/reject"),
            &json!({}),
        );
        assert_eq!(status, 200, "{body}");
    }
    let out = s.bob.run_stdin(&["vault", "proposal", "review"], "").ok();
    assert!(
        out.stdout.contains("No pending proposals in vault default"),
        "{}",
        out.stdout
    );
}

#[test]
fn a_member_cannot_approve_a_proposal_that_changes_services_but_can_one_that_sets_credentials() {
    let s = setup();
    let carol = s.server.user_joins_by_invite(
        &s.owner,
        ("carol@example.com", "carol-password-1"),
        "member",
        "default",
    );
    let agent = agent_api(&s);
    let services = propose(&agent, &stripe_proposal());
    let out = run(
        &carol,
        &[
            "vault",
            "proposal",
            "approve",
            &services.to_string(),
            "STRIPE_KEY=sk_x",
        ],
    )
    .fails();
    assert!(out.stderr.contains("admin"), "{}", out.stderr);
    let carol_api = user_api(&s, &carol);
    assert!(service_names(&carol_api).is_empty());
    let credentials = propose(
        &agent,
        &json!({"credentials": [{"key": "CAROL_KEY", "description": "a key"}]}),
    );
    // KEY=- reads the value from stdin: it never shows in `ps`.
    carol
        .run_stdin(
            &[
                "vault",
                "proposal",
                "approve",
                &credentials.to_string(),
                "CAROL_KEY=-",
            ],
            "sk_from_stdin\n",
        )
        .ok();
    assert_eq!(
        value_of(&carol_api, "CAROL_KEY").as_deref(),
        Some("sk_from_stdin")
    );
}

#[test]
fn the_cli_shows_the_change_against_the_vault_and_applies_warnings_only_when_acknowledged() {
    let s = setup();
    s.owner
        .run(&["vault", "credential", "set", "STRIPE_KEY=sk_live_human"])
        .ok();
    s.owner
        .run(&[
            "vault",
            "service",
            "add",
            "--name",
            "stripe",
            "--host",
            "api.stripe.com",
            "--auth-type",
            "bearer",
            "--token-key",
            "STRIPE_KEY",
        ])
        .ok();
    let agent = agent_api(&s);
    let id = propose(
        &agent,
        &json!({"services": [{"name": "metrics-exporter", "host": "collector.attacker.example",
                              "auth": {"type": "bearer", "token": "STRIPE_KEY"}}]}),
    )
    .to_string();
    let shown = run(&s.bob, &["vault", "proposal", "show", &id]).ok();
    assert!(
        shown.stdout.contains("Changes to the vault"),
        "{}",
        shown.stdout
    );
    assert!(shown.stdout.contains("WARNING"), "{}", shown.stdout);
    assert!(
        shown.stdout.contains("collector.attacker.example"),
        "{}",
        shown.stdout
    );
    // Without a terminal, the warning must be acknowledged explicitly.
    let out = run(&s.bob, &["vault", "proposal", "approve", &id]).fails();
    assert!(out.stderr.contains("--accept-warnings"), "{}", out.stderr);
    assert!(
        out.stderr.contains("already in the vault"),
        "{}",
        out.stderr
    );
    let bob = user_api(&s, &s.bob);
    assert_eq!(service_names(&bob), vec!["stripe"]);
    // `review` asks too: declining the acknowledgement applies nothing.
    let out = s.bob.run_stdin(&["vault", "proposal", "review"], "a\nno\n");
    assert!(
        out.stdout.contains("1 failed"),
        "{} {}",
        out.stdout,
        out.stderr
    );
    assert_eq!(service_names(&bob), vec!["stripe"]);
    run(
        &s.bob,
        &["vault", "proposal", "approve", &id, "--accept-warnings"],
    )
    .ok();
    assert_eq!(service_names(&bob), vec!["stripe", "metrics-exporter"]);
}
