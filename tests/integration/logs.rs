//! `--log-format json`: one JSON object per line, with the credential's kind, namespace and
//! name on its lines, and no secret.

use serde_json::{Value, json};

use crate::support::*;

#[tokio::test]
async fn json_logs_carry_the_object_and_no_secret() {
    let cp = env().cp;
    let client = client().await;
    let name = format!("jsonlogs-{}", &unique()[..6]);
    let _controller = spawn_labelled(&name, &["--log-format", "json"], &[]);
    let ns = namespace(&client, "jsonlogs").await;
    let password = secret_value("u", "jsonlogs");
    create_secret(&client, &ns, "src", &[("password", password.as_bytes())]).await;
    let basic = |secret: &str| json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": secret}}}});
    create_credential_for(&client, &ns, "good", Some(&name), basic("src")).await;
    create_credential_for(&client, &ns, "bad", Some(&name), basic("missing")).await;
    wait_ready(&client, &ns, "good", "True", None).await;
    wait_ready(&client, &ns, "bad", "False", Some("SourceSecretNotFound")).await;

    // The failure warning names the object in its own fields. It is logged when the reconcile
    // has returned, after it wrote the status: wait for it.
    let is_warning = |l: &Value| l["level"] == "WARN" && l["namespace"] == ns.as_str() && l["name"] == "bad";
    let (log, lines) = regcred_testenv::wait_for(&format!("a WARN line for {ns}/bad"), TIMEOUT, || {
        let log = std::fs::read_to_string(controller_log_path(cp, &name)).ok()?;
        // A line being written may be incomplete: parse complete lines only.
        let complete = &log[..log.rfind('\n').map_or(0, |i| i + 1)];
        let lines: Vec<Value> = complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        lines.iter().any(is_warning).then(|| (log.clone(), lines))
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    let warning = lines.iter().find(|l| is_warning(l)).expect("found above");
    assert_eq!(warning["kind"], "RegistryCredential");
    assert_eq!(warning["reason"], "SourceSecretNotFound");
    // Lines logged inside a reconcile carry the object through the reconcile span.
    let in_reconcile = |l: &Value| {
        l["spans"].as_array().is_some_and(|spans| {
            spans
                .iter()
                .any(|s| s["kind"] == "RegistryCredential" && s["namespace"] == ns.as_str() && s["object"] == "good")
        })
    };
    assert!(lines.iter().any(in_reconcile), "no line inside the reconcile of {ns}/good");
    assert!(!log.contains(&password));
}
