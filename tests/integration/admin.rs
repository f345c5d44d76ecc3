//! The admin endpoint: health, readiness after the caches synced, and metrics after a sync
//! and after a failure, and a deleted credential's series gone with it.

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn health_readiness_and_metrics_after_sync_and_failure() {
    // A controller of its own: its counters count this test's credentials only, so no other
    // test's failure or ECR call can satisfy the assertions below.
    let label = format!("metrics-{}", &unique()[..6]);
    let controller = spawn_labelled(&label, &[], &[]);
    let port = controller.admin_port;
    let get = admin_get;
    let client = client().await;
    let ns = namespace(&client, "metrics").await;
    let password = secret_value("u", "metrics");
    create_secret(&client, &ns, "src", &[("password", password.as_bytes())]).await;
    let basic = |secret: &str| json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": secret}}}});
    create_credential_for(&client, &ns, "good", Some(&label), basic("src")).await;
    create_credential_for(&client, &ns, "bad", Some(&label), basic("missing")).await;
    let aws_key = format!("AKIA{}", &unique()[..16].to_uppercase());
    let aws_secret = secret_value("aws", "metrics");
    env().aws.add_access_key(&aws_key, &aws_key, &aws_secret).unwrap();
    create_secret(
        &client,
        &ns,
        "aws-keys",
        &[("accessKeyId", aws_key.as_bytes()), ("secretAccessKey", aws_secret.as_bytes())],
    )
    .await;
    create_credential_for(&client, &ns, "ecr", Some(&label), json!({"source": {"ecr": {"registry": "123456789012.dkr.ecr.eu-west-1.amazonaws.com", "auth": {"secretRef": {"name": "aws-keys"}}}}})).await;
    wait_ready(&client, &ns, "good", "True", None).await;
    wait_ready(&client, &ns, "bad", "False", Some("SourceSecretNotFound")).await;
    let ecr = wait_ready(&client, &ns, "ecr", "True", None).await;

    assert_eq!(get(port, "/healthz").0, 200);
    assert_eq!(get(port, "/readyz").0, 200);
    let (code, metrics) = get(port, "/metrics");
    assert_eq!(code, 200);
    let object = |name: &str| format!("{{kind=\"RegistryCredential\",namespace=\"{ns}\",name=\"{name}\"}}");
    assert_eq!(sample(&metrics, &format!("regcred_credential_ready{}", object("good"))), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, &format!("regcred_credential_ready{}", object("bad"))), Some(0.0));
    let expiry =
        sample(&metrics, &format!("regcred_token_expiry_timestamp_seconds{}", object("ecr"))).expect("expiry gauge");
    let expected = ecr.status.unwrap().expires_at.unwrap().0.as_second() as f64;
    assert!((expiry - expected).abs() < 1.0, "{expiry} vs {expected}");
    let failures = "regcred_reconcile_failures_total{kind=\"RegistryCredential\",reason=\"SourceSecretNotFound\"}";
    assert!(sample(&metrics, failures).is_some_and(|v| v >= 1.0), "{metrics}");
    assert!(
        sample(&metrics, "regcred_reconciles_total{kind=\"RegistryCredential\"}").is_some_and(|v| v >= 3.0),
        "fewer reconciles counted than the three credentials:\n{metrics}"
    );
    assert!(
        sample(&metrics, "regcred_reconcile_duration_seconds_count{kind=\"RegistryCredential\"}")
            .is_some_and(|v| v >= 3.0),
        "fewer reconcile durations than the three credentials:\n{metrics}"
    );
    // One ECR credential with 12-hour tokens: one call.
    assert_eq!(
        sample(&metrics, "regcred_provider_calls_total{provider=\"ecr\",operation=\"GetAuthorizationToken\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "regcred_leader "), Some(1.0));
    for value in [&password, &aws_secret, &aws_key] {
        assert!(!metrics.contains(value.as_str()), "a secret in /metrics");
    }

    // Each condition with its reason, the token's next refresh, no Verified series unchecked.
    let condition = |name: &str, condition: &str, status: &str, reason: &str| {
        format!(
            "regcred_credential_condition{{kind=\"RegistryCredential\",namespace=\"{ns}\",name=\"{name}\",\
             condition=\"{condition}\",status=\"{status}\",reason=\"{reason}\"}} "
        )
    };
    assert_eq!(sample(&metrics, &condition("bad", "Ready", "False", "SourceSecretNotFound")), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, &condition("good", "Ready", "True", "Synced")), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, &condition("ecr", "Degraded", "False", "Refreshed")), Some(1.0), "{metrics}");
    let refresh =
        sample(&metrics, &format!("regcred_token_refresh_timestamp_seconds{}", object("ecr"))).expect("refresh gauge");
    assert!(refresh < expiry, "the refresh {refresh} comes before the expiry {expiry}");
    assert!(!metrics.contains("regcred_credential_verified{"), "no credential here is checked:\n{metrics}");
    // A deleted credential's series go with it; the others' stay.
    let api = kube::Api::<regcred::crd::RegistryCredential>::namespaced(client.clone(), &ns);
    api.delete("bad", &Default::default()).await.unwrap();
    let bad = "name=\"bad\"";
    regcred_testenv::eventually("the deleted credential's series gone", TIMEOUT, || async {
        let metrics = controller.metrics();
        (!metrics.is_empty() && !metrics.contains(bad)).then_some(())
    })
    .await;
    assert_eq!(sample(&controller.metrics(), &format!("regcred_credential_ready{}", object("good"))), Some(1.0));
}
