//! One test per cause: facts as `observe` would gather them → the verdict and its fix.

use super::*;
use crate::doctor::facts::{Account, Condition, Listing, Login, Probe};

const IMAGE: &str = "ghcr.io/org/app:v1";

fn facts(pull_secrets: &[&str], is_pod: bool) -> Facts {
    Facts {
        namespace: "team".into(),
        subject: "pod/web".into(),
        is_pod,
        pull_secrets: pull_secrets.iter().map(|s| s.to_string()).collect(),
        service_account: Account { name: "default".into(), pull_secrets: Some(vec![]), problem: None },
        images: vec![ImageUse { image: IMAGE.into(), role: "container", container: "app".into(), events: vec![] }],
        ..Default::default()
    }
}

fn login(server: &str) -> Login {
    Login { server: server.into(), username: "puller".into(), password: "pw-not-shown".into() }
}

fn pull_secret(servers: &[&str], managed_by: Option<&str>) -> SecretFacts {
    SecretFacts::Found(FoundSecret {
        type_: "kubernetes.io/dockerconfigjson".into(),
        logins: Ok(servers.iter().map(|s| login(s)).collect()),
        managed_by: managed_by.map(|n| ("RegistryCredential".to_string(), n.to_string())),
    })
}

fn credential(name: &str, registries: &[&str], ready: bool) -> CredentialFacts {
    CredentialFacts {
        kind: "RegistryCredential".into(),
        name: name.into(),
        secret_name: Some(format!("{name}-pull")),
        writes: format!("{name}-pull"),
        registries: registries.iter().map(|s| s.to_string()).collect(),
        ready: Some(Condition {
            status: if ready { "True" } else { "False" }.into(),
            reason: if ready { "Synced" } else { "SourceSecretNotFound" }.into(),
            message: if ready { "ok" } else { "Secret team/pass not found" }.into(),
        }),
        ..Default::default()
    }
}

fn verdict_of(facts: &Facts) -> Verdict {
    let report = diagnose(facts);
    let shown = format!("{report:?}{}", crate::doctor::render::json(&report));
    crate::test_support::assert_hidden(&shown, "pw-not-shown");
    report.images[0].verdict.clone()
}

#[test]
fn a_matching_entry_is_fine() {
    let mut f = facts(&["ghcr"], true);
    f.secrets.insert("ghcr".into(), pull_secret(&["ghcr.io"], Some("ghcr")));
    f.credentials = Listing::Read(vec![credential("ghcr", &["ghcr.io"], true)]);
    let report = diagnose(&f);
    assert!(report.ok);
    assert_eq!(report.images[0].matches, [Match { secret: "ghcr".into(), server: "ghcr.io".into() }]);
    assert_eq!(report.images[0].verdict.cause, Cause::Ok);
}

#[test]
fn no_pull_secrets_names_the_credential_that_covers_the_registry() {
    let mut f = facts(&[], true);
    f.credentials = Listing::Read(vec![credential("ghcr", &["ghcr.io"], true)]);
    let v = verdict_of(&f);
    assert_eq!(v.cause, Cause::NoPullSecrets);
    assert!(v.fixes[0].contains("imagePullSecrets: [{name: ghcr-pull}]"), "{:?}", v.fixes);
    assert!(v.fixes[1].contains("ServiceAccount default"), "{:?}", v.fixes);
}

#[test]
fn a_pod_created_before_its_service_account_got_the_secret_must_be_recreated() {
    let mut f = facts(&[], true);
    f.service_account.pull_secrets = Some(vec!["ghcr".into()]);
    let v = verdict_of(&f);
    assert_eq!(v.cause, Cause::NoPullSecrets);
    assert!(v.summary.contains("only when a Pod is created"), "{}", v.summary);
    assert!(v.fixes[0].starts_with("delete the Pod"), "{:?}", v.fixes);
}

#[test]
fn a_template_gets_its_service_accounts_secrets() {
    let mut f = facts(&[], false);
    f.service_account.pull_secrets = Some(vec!["ghcr".into()]);
    f.secrets.insert("ghcr".into(), pull_secret(&["ghcr.io"], None));
    let report = diagnose(&f);
    assert!(report.ok, "{report:?}");
    assert_eq!(report.images[0].secrets[0].from, "serviceAccount");
}

#[test]
fn a_missing_secret_is_named_with_the_secret_to_use_instead() {
    let mut f = facts(&["ghcr-secret"], true);
    f.secrets.insert("ghcr-secret".into(), SecretFacts::Missing);
    f.credentials = Listing::Read(vec![credential("ghcr", &["ghcr.io"], true)]);
    let v = verdict_of(&f);
    assert_eq!(v.cause, Cause::SecretMissing);
    assert!(v.fixes[0].contains("{name: ghcr-pull}"), "{:?}", v.fixes);
    assert!(v.fixes[1].contains("spec.secret.name: ghcr-secret"), "{:?}", v.fixes);
}

#[test]
fn a_port_in_the_entry_is_the_wrong_spelling() {
    let mut f = facts(&["ghcr"], true);
    f.secrets.insert("ghcr".into(), pull_secret(&["ghcr.io:443"], Some("ghcr")));
    f.credentials = Listing::Read(vec![credential("ghcr", &["ghcr.io:443"], true)]);
    let v = verdict_of(&f);
    assert_eq!(v.cause, Cause::WrongSpelling);
    assert!(v.fixes[0].contains("spec.registry: ghcr.io on RegistryCredential ghcr"), "{:?}", v.fixes);
}

#[test]
fn another_registrys_entry_is_no_entry_for_the_image() {
    let mut f = facts(&["quay"], true);
    f.secrets.insert("quay".into(), pull_secret(&["quay.io"], None));
    let v = verdict_of(&f);
    assert_eq!(v.cause, Cause::NoEntryForRegistry);
    assert!(v.fixes[0].contains("spec.registry: ghcr.io"), "{:?}", v.fixes);
}

#[test]
fn a_credential_not_ready_is_the_cause_with_its_message() {
    let mut f = facts(&["ghcr-pull"], true);
    f.secrets.insert("ghcr-pull".into(), pull_secret(&["ghcr.io"], Some("ghcr")));
    f.credentials = Listing::Read(vec![credential("ghcr", &["ghcr.io"], false)]);
    let v = verdict_of(&f);
    assert_eq!(v.cause, Cause::CredentialNotReady);
    assert!(v.fixes[0].contains("Secret team/pass not found"), "{:?}", v.fixes);
    assert_eq!(v.fixes[1], "kubectl describe registrycredential ghcr -n team");
}

#[test]
fn a_refused_login_is_unauthorized() {
    let mut f = facts(&["ghcr"], true);
    f.secrets.insert("ghcr".into(), pull_secret(&["ghcr.io"], None));
    let probe = Probe { reason: "Unauthorized".into(), message: "GET /v2/: 401".into() };
    f.probes.insert((IMAGE.into(), "ghcr".into(), "ghcr.io".into()), probe);
    let v = verdict_of(&f);
    assert_eq!(v.cause, Cause::Unauthorized);
    assert!(v.summary.contains("401"), "{}", v.summary);
}

#[test]
fn an_accepted_login_can_pull_now() {
    let mut f = facts(&["ghcr"], true);
    f.secrets.insert("ghcr".into(), pull_secret(&["ghcr.io"], None));
    let probe = Probe { reason: "Verified".into(), message: "HEAD: 200".into() };
    f.probes.insert((IMAGE.into(), "ghcr".into(), "ghcr.io".into()), probe);
    let v = verdict_of(&f);
    assert!(v.ok && v.summary.contains("can pull now"), "{v:?}");
}

#[test]
fn an_unreadable_secret_falls_back_to_its_credentials_status() {
    let mut f = facts(&["ghcr-pull"], true);
    f.secrets.insert("ghcr-pull".into(), SecretFacts::Forbidden);
    f.credentials = Listing::Read(vec![credential("ghcr", &["ghcr.io"], true)]);
    let report = diagnose(&f);
    assert!(report.ok, "{report:?}");
    let secret = &report.images[0].secrets[0];
    assert_eq!(secret.state, "forbidden");
    assert_eq!(secret.entries[0].source.as_deref(), Some("credential status"));
}

#[test]
fn an_opaque_secret_is_the_wrong_type() {
    let mut f = facts(&["ghcr"], true);
    let SecretFacts::Found(mut found) = pull_secret(&["ghcr.io"], None) else { unreachable!() };
    found.type_ = "Opaque".into();
    f.secrets.insert("ghcr".into(), SecretFacts::Found(found));
    assert_eq!(verdict_of(&f).cause, Cause::WrongSecretType);
}

#[test]
fn kubelet_messages_are_classified() {
    let unauthorized = r#"Failed to pull image "ghcr.io/org/app:v1": failed to authorize: failed to fetch anonymous token: unexpected status from GET request: 401 Unauthorized"#;
    assert_eq!(event_cause(unauthorized), Some("unauthorized"));
    assert_eq!(event_cause("pull access denied, repository does not exist"), Some("forbidden"));
    assert_eq!(event_cause(r#"rpc error: "ghcr.io/org/app:v9": not found"#), Some("not-found"));
    assert_eq!(event_cause("tls: failed to verify certificate: x509: unknown authority"), Some("tls"));
    assert_eq!(event_cause("Back-off pulling image"), None);
}

#[test]
fn a_credential_whose_check_was_refused_is_unauthorized_without_verify() {
    let mut f = facts(&["ghcr-pull"], true);
    f.secrets.insert("ghcr-pull".into(), pull_secret(&["ghcr.io"], Some("ghcr")));
    let mut c = credential("ghcr", &["ghcr.io"], true);
    c.verified =
        Some(Condition { status: "False".into(), reason: "Unauthorized".into(), message: "GET /v2/: 401".into() });
    f.credentials = Listing::Read(vec![c]);
    let v = verdict_of(&f);
    assert_eq!(v.cause, Cause::Unauthorized);
    assert!(v.summary.contains("Verified condition"), "{}", v.summary);
}

#[test]
fn a_missing_secret_its_credential_has_not_written_is_that_credentials_failure() {
    let mut f = facts(&["ghcr-pull"], true);
    f.secrets.insert("ghcr-pull".into(), SecretFacts::Missing);
    let mut c = credential("ghcr", &[], false);
    c.secret_name = None;
    f.credentials = Listing::Read(vec![c]);
    let v = verdict_of(&f);
    assert_eq!(v.cause, Cause::CredentialNotReady);
    assert!(v.summary.contains("RegistryCredential ghcr, which writes it, has not"), "{}", v.summary);
    assert!(v.fixes[0].contains("Secret team/pass not found"), "{:?}", v.fixes);
}

#[test]
fn the_kubelets_missing_secret_warning_is_classified() {
    let warning = "Unable to retrieve some image pull secrets (ghcr); attempting to pull the image may not succeed.";
    assert_eq!(event_cause(warning), Some("secret-missing"));
}

#[test]
fn a_cluster_credential_is_offered_with_what_to_check() {
    let mut f = facts(&[], false);
    let mut c = credential("company", &["ghcr.io"], true);
    c.kind = "ClusterRegistryCredential".into();
    f.credentials = Listing::Read(vec![c]);
    let v = verdict_of(&f);
    assert_eq!(v.cause, Cause::NoPullSecrets);
    assert!(
        v.fixes[0].contains("{name: company-pull}") && v.fixes[0].contains("kubectl get secret company-pull -n team"),
        "{:?}",
        v.fixes
    );
}

#[test]
fn a_matching_entry_mentions_the_kubelets_last_failed_pull_unless_a_pull_came_after() {
    let failed =
        PullEvent { reason: "Failed".into(), message: "Failed to pull image: 401 Unauthorized".into(), count: 2 };
    let pulled = PullEvent { reason: "Pulled".into(), message: "Successfully pulled image".into(), count: 1 };
    let mut f = facts(&["ghcr"], true);
    f.secrets.insert("ghcr".into(), pull_secret(&["ghcr.io"], None));
    f.images[0].events = vec![failed.clone()];
    let v = verdict_of(&f);
    assert!(v.ok && v.summary.contains("last pull Event says unauthorized"), "{v:?}");
    f.images[0].events = vec![pulled, failed];
    let v = verdict_of(&f);
    assert!(v.ok && !v.summary.contains("last pull Event"), "{v:?}");
}
