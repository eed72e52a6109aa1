//! The service catalog (issue 13): the public listing, `agent-vault catalog`,
//! `vault service add --from-catalog`, and proposals that name a template.

use std::time::Duration;

use serde_json::json;

use agent_vault_testkit::control_plane::Server;
use agent_vault_testkit::stack::{eventually, Stack};
use agent_vault_testkit::upstream::Echo;

#[test]
fn the_catalog_is_public_and_adds_services_from_the_cli_and_from_proposals() {
    let server = Server::start();
    // Public, without a login, and no value in it.
    let (status, catalog) = server.api(None).get("/v1/service-catalog");
    assert_eq!(status, 200, "{catalog}");
    let names: Vec<&str> = catalog
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["service"]["name"].as_str())
        .collect();
    for expected in [
        "openai",
        "anthropic",
        "github",
        "stripe",
        "slack",
        "atlassian",
        "telegram",
    ] {
        assert!(names.contains(&expected), "{expected}: {names:?}");
    }
    let stripe = catalog
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["service"]["name"] == "stripe")
        .unwrap();
    assert_eq!(stripe["service"]["host"], "api.stripe.com");
    assert_eq!(stripe["credentials"][0]["key"], "STRIPE_KEY");

    let owner = server.cli();
    owner.register_and_login("owner@example.com", "owner-password");
    let listed = owner.run(&["catalog"]).ok();
    for expected in [
        "NAME",
        "stripe",
        "api.stripe.com",
        "*.atlassian.net",
        "ATLASSIAN_API_TOKEN",
        "api.telegram.org",
        "TELEGRAM_BOT_TOKEN",
    ] {
        assert!(
            listed.stdout.contains(expected),
            "{expected}: {}",
            listed.stdout
        );
    }

    // From the CLI: the template, with the name and host adjusted for one site; its
    // keys must be in the vault first, and the error says which.
    let add_jira = [
        "vault",
        "service",
        "add",
        "--from-catalog",
        "atlassian",
        "--name",
        "jira",
        "--host",
        "acme.atlassian.net",
        "--method",
        "GET",
    ];
    let early = owner.run(&add_jira).fails();
    assert!(
        early.stderr.contains(
            "set them first (agent-vault vault credential set ATLASSIAN_EMAIL=… ATLASSIAN_API_TOKEN=…)"
        ),
        "{}",
        early.stderr
    );
    owner
        .run(&[
            "vault",
            "credential",
            "set",
            "ATLASSIAN_EMAIL=me@acme.example",
            "ATLASSIAN_API_TOKEN=atl_token",
        ])
        .ok();
    let added = owner.run(&add_jira).ok();
    assert!(
        added.stdout.contains("from the catalog's atlassian"),
        "{}",
        added.stdout
    );
    let services = owner
        .run(&["vault", "service", "list", "--json"])
        .ok()
        .json();
    let jira = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "jira")
        .unwrap_or_else(|| panic!("{services}"));
    assert_eq!(jira["host"], "acme.atlassian.net");
    assert_eq!(jira["methods"], json!(["GET"]));
    assert_eq!(
        jira["auth"],
        json!({"type": "basic", "username": "ATLASSIAN_EMAIL", "password": "ATLASSIAN_API_TOKEN"})
    );
    // Mistakes: an unknown template names the known ones; auth flags do not mix.
    let unknown = owner
        .run(&["vault", "service", "add", "--from-catalog", "strype"])
        .fails();
    assert!(
        unknown.stderr.contains("known: openai"),
        "{}",
        unknown.stderr
    );
    let mixed = owner
        .run(&[
            "vault",
            "service",
            "add",
            "--from-catalog",
            "stripe",
            "--token-key",
            "OTHER",
        ])
        .fails();
    assert!(
        mixed.stderr.contains("drop the auth flags"),
        "{}",
        mixed.stderr
    );
    let bare = owner
        .run(&["vault", "service", "add", "--name", "x"])
        .fails();
    assert!(bare.stderr.contains("--host"), "{}", bare.stderr);

    // From a proposal: the agent names the template; the slot comes with it.
    let token = owner
        .run(&["agent", "create", "bot", "--vault", "default"])
        .ok()
        .stdout
        .trim()
        .to_string();
    let agent = server.api(Some(&token));
    let (status, created) = agent.post(
        "/v1/proposals",
        &json!({"services": [{"name": "stripe", "catalog": "stripe"}],
                "user_message": "Stripe, as the catalog has it."}),
    );
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_u64().unwrap();
    let (_, proposal) = agent.get(&format!("/v1/proposals/{id}"));
    assert_eq!(proposal["services"][0]["host"], "api.stripe.com");
    assert_eq!(
        proposal["services"][0]["auth"],
        json!({"type": "bearer", "token": "STRIPE_KEY"})
    );
    assert!(
        proposal["services"][0].get("catalog").is_none(),
        "{proposal}"
    );
    assert_eq!(proposal["credentials"][0]["key"], "STRIPE_KEY");
    assert_eq!(
        proposal["credentials"][0]["obtain"],
        "https://dashboard.stripe.com/apikeys"
    );
    let (status, refused) = agent.post(
        "/v1/proposals",
        &json!({"services": [{"name": "x", "catalog": "strype"}]}),
    );
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"], "unknown_catalog_entry");
    // Approved like any other, the service is live.
    owner
        .run(&[
            "vault",
            "proposal",
            "approve",
            &id.to_string(),
            "STRIPE_KEY=sk_test_catalog",
            "--yes",
            "--accept-warnings",
        ])
        .ok();
    let services = owner.run(&["vault", "service", "list"]).ok();
    assert!(
        services.stdout.contains("api.stripe.com"),
        "{}",
        services.stdout
    );
}

#[test]
fn telegram_from_the_catalog_substitutes_the_bot_token_in_the_path() {
    let server = Server::start();
    let (status, catalog) = server.api(None).get("/v1/service-catalog");
    assert_eq!(status, 200, "{catalog}");
    let telegram = catalog
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["service"]["name"] == "telegram")
        .cloned()
        .unwrap_or_else(|| panic!("{catalog}"));
    assert_eq!(telegram["service"]["host"], "api.telegram.org");
    assert_eq!(telegram["service"]["auth"], json!({"type": "passthrough"}));
    let declared = json!([{"key": "TELEGRAM_BOT_TOKEN",
                           "placeholder": "__TELEGRAM_BOT_TOKEN__", "in": ["path"]}]);
    assert_eq!(telegram["service"]["substitutions"], declared);
    assert_eq!(telegram["credentials"][0]["key"], "TELEGRAM_BOT_TOKEN");
    assert_eq!(
        telegram["credentials"][0]["obtain"],
        "https://t.me/BotFather"
    );

    let owner = server.cli();
    owner.register_and_login("owner@example.com", "owner-password");
    // The key comes from the substitution: it must be in the vault first.
    let early = owner
        .run(&["vault", "service", "add", "--from-catalog", "telegram"])
        .fails();
    assert!(
        early
            .stderr
            .contains("the telegram template reads TELEGRAM_BOT_TOKEN, not in vault default yet"),
        "{}",
        early.stderr
    );
    owner
        .run(&[
            "vault",
            "credential",
            "set",
            "TELEGRAM_BOT_TOKEN=123456:tg-secret",
        ])
        .ok();
    let added = owner
        .run(&["vault", "service", "add", "--from-catalog", "telegram"])
        .ok();
    assert!(
        added.stdout.contains(
            "Added service telegram (api.telegram.org, passthrough, substitutes TELEGRAM_BOT_TOKEN:__TELEGRAM_BOT_TOKEN__:path)"
        ),
        "{}",
        added.stdout
    );
    let listed = owner.run(&["vault", "service", "list"]).ok().stdout;
    let line = listed
        .lines()
        .find(|l| l.starts_with("telegram "))
        .unwrap_or_default();
    assert!(
        line.contains(" TELEGRAM_BOT_TOKEN ")
            && line.contains(" TELEGRAM_BOT_TOKEN:__TELEGRAM_BOT_TOKEN__:path "),
        "{listed}"
    );
    let services = owner
        .run(&["vault", "service", "list", "--json"])
        .ok()
        .json();
    assert_eq!(services[0]["substitutions"], declared, "{services}");
    assert!(services[0].get("redact_responses").is_none(), "{services}");
    // --substitute adds to the template's substitutions; --no-redact turns redaction off.
    owner
        .run(&[
            "vault",
            "service",
            "add",
            "--from-catalog",
            "telegram",
            "--name",
            "telegram-files",
            "--host",
            "files.telegram.example.com",
            "--substitute",
            "TELEGRAM_BOT_TOKEN:__TG_TOKEN_IN_QUERY__:query",
            "--no-redact",
        ])
        .ok();
    let services = owner
        .run(&["vault", "service", "list", "--json"])
        .ok()
        .json();
    let files = services
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == "telegram-files").cloned())
        .unwrap_or_default();
    assert_eq!(
        files["substitutions"],
        json!([{"key": "TELEGRAM_BOT_TOKEN", "placeholder": "__TELEGRAM_BOT_TOKEN__", "in": ["path"]},
               {"key": "TELEGRAM_BOT_TOKEN", "placeholder": "__TG_TOKEN_IN_QUERY__", "in": ["query"]}]),
        "{services}"
    );
    assert_eq!(files["redact_responses"], false, "{services}");

    // An agent proposing the template gets its substitution, and discovers what to
    // write once it is live; never the value.
    let token = owner
        .run(&["agent", "create", "bot", "--vault", "default"])
        .ok()
        .stdout
        .trim()
        .to_string();
    let agent = server.api(Some(&token));
    let (status, created) = agent.post(
        "/v1/proposals",
        &json!({"services": [{"name": "telegram2", "catalog": "telegram"}]}),
    );
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_u64().unwrap();
    let (_, proposal) = agent.get(&format!("/v1/proposals/{id}"));
    assert_eq!(proposal["services"][0]["substitutions"], declared);
    let (status, discovered) = agent.get("/discover");
    assert_eq!(status, 200, "{discovered}");
    assert_eq!(discovered["services"][0]["name"], "telegram");
    assert_eq!(discovered["services"][0]["substitutions"], declared);
    assert_eq!(discovered["services"][0]["redact_responses"], true);
    assert!(
        !discovered.to_string().contains("tg-secret"),
        "{discovered}"
    );
}

#[test]
fn a_telegram_bot_call_through_the_proxy_reaches_the_upstream_with_the_token_in_its_path() {
    let stack = Stack::start();
    // The template's host and TLS, pointed at a loopback TLS upstream.
    let upstream = Echo::tls(&stack.ca);
    let token_value = "123456:AAH-tg_Secret_Value";
    stack.set_credential("default", "TELEGRAM_BOT_TOKEN", token_value);
    let cli = stack.server.cli().with_token(&stack.owner);
    let added = cli
        .run(&[
            "vault",
            "service",
            "add",
            "--from-catalog",
            "telegram",
            "--host",
            &upstream.authority(),
            "--vault",
            "default",
        ])
        .ok();
    assert!(
        added.stdout.contains("Added service telegram"),
        "{}",
        added.stdout
    );
    let agent = stack.create_agent("bot-agent", &["default"]);

    let url = upstream.url("/bot__TELEGRAM_BOT_TOKEN__/getMe?chat=__TELEGRAM_BOT_TOKEN__");
    let response = eventually(
        &stack.envoy,
        Duration::from_secs(15),
        || stack.get_as(&agent, "default", &url, &[]),
        |r| r.status == 200,
    );
    assert_eq!(response.status, 200, "{}", response.body);
    let received = upstream.received();
    let seen = received
        .last()
        .unwrap_or_else(|| panic!("nothing reached the upstream"));
    assert_eq!(seen["tls"], true);
    // The path carries the token as written (":" needs no encoding in a path); the
    // query was not declared, so its placeholder passes literally; no auth header.
    assert_eq!(
        seen["path"],
        format!("/bot{token_value}/getMe?chat=__TELEGRAM_BOT_TOKEN__")
    );
    assert!(seen["headers"].get("authorization").is_none(), "{seen}");
    assert!(
        seen["headers"].get("proxy-authorization").is_none(),
        "{seen}"
    );
}
