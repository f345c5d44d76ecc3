//! Least privilege against a compromised controller: the packaged ValidatingAdmissionPolicy
//! lets the controller's identity mint only IRSA tokens (STS audience, short, outside
//! kube-system and its own namespace), which the apiserver itself does not accept; and an
//! install without IRSA has no token permission and says so in status.

use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use serde_json::json;

use crate::support::*;

const STS: &str = "sts.amazonaws.com";

/// The refusal of a request, as (HTTP code, message); panics if it was admitted.
fn refusal(result: Result<String, kube::Error>, what: &str) -> (u16, String) {
    match result {
        Err(kube::Error::Api(status)) => (status.code, status.message),
        Err(other) => panic!("{what}: failed otherwise: {other}"),
        Ok(_) => panic!("{what}: a token was minted"),
    }
}

#[tokio::test]
async fn the_controller_identity_can_mint_only_sts_tokens_the_apiserver_refuses() {
    env();
    let admin = client().await;
    let controller = controller_client().await;
    let ns = namespace(&admin, "vap").await;
    irsa_account(&admin, &env().aws, &ns, "app").await;
    // The policy is installed with the packaged manifests; the apiserver enforces it once its
    // informer has it: wait until the first refusal, then every case must hold.
    regcred_testenv::eventually("the ValidatingAdmissionPolicy in force", TIMEOUT, || async {
        request_token(&controller, &ns, "app", &[], 600).await.is_err().then_some(())
    })
    .await;

    // The apiserver's own audience (the default when none is given), or with STS, or alone.
    let (code, message) = refusal(request_token(&controller, &ns, "app", &[], 600).await, "default audience");
    assert!(code == 403 && message.contains("only for the audiences sts.amazonaws.com"), "{code}: {message}");
    let issuer = regcred_testenv::ISSUER;
    let (code, _) = refusal(request_token(&controller, &ns, "app", &[STS, issuer], 600).await, "issuer audience");
    assert_eq!(code, 403);
    // Longer than an hour.
    let (code, message) = refusal(request_token(&controller, &ns, "app", &[STS], 86400).await, "a day");
    assert!(code == 403 && message.contains("at most 3600 seconds"), "{code}: {message}");
    // kube-system's and the controller's own ServiceAccounts, even with the STS audience.
    for (namespace, account) in [("kube-system", "default"), (CONTROLLER_NAMESPACE, "regcred")] {
        let result = request_token(&controller, namespace, account, &[STS], 600).await;
        let (code, message) = refusal(result, namespace);
        assert!(code == 403 && message.contains("kube-system or regcred-system"), "{namespace}: {code}: {message}");
    }

    // A Workload Identity Federation provider's audience is admitted (what gcr.workloadIdentity
    // needs); one that only looks like it is not.
    let provider =
        "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/pool/providers/kube";
    let token = request_token(&controller, &ns, "app", &[provider], 600).await.expect("a WIF token is admitted");
    record_secret(&token);
    let lookalike = "//iam.googleapis.com.evil.example/projects/1/locations/global/workloadIdentityPools/p/providers/x";
    let (code, _) = refusal(request_token(&controller, &ns, "app", &[lookalike], 600).await, "lookalike");
    assert_eq!(code, 403);
    // Azure workload identity's audience is admitted (the chart's default
    // azure.workloadIdentity.enabled); one that only looks like it is not.
    let token = request_token(&controller, &ns, "app", &["api://AzureADTokenExchange"], 600)
        .await
        .expect("an Azure workload identity token is admitted");
    record_secret(&token);
    let (code, _) =
        refusal(request_token(&controller, &ns, "app", &["api://AzureADTokenExchange.evil"], 600).await, "lookalike");
    assert_eq!(code, 403);

    // What IRSA needs is admitted, and the token it gives is no Kubernetes credential.
    let token = request_token(&controller, &ns, "app", &[STS], 600).await.expect("an IRSA token is admitted");
    record_secret(&token);
    let with_token = client_with_token(&token).await;
    match Api::<Namespace>::all(with_token).list(&Default::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 401, "{}", status.message),
        other => panic!("the apiserver accepted an sts.amazonaws.com token: {other:?}"),
    }
    // Anyone else (the admin here) is not limited by the policy.
    request_token(&admin, &ns, "app", &[], 600).await.expect("the policy binds only the controller");
}

#[tokio::test]
async fn irsa_disabled_reports_a_clear_condition_and_requests_no_token() {
    env();
    let client = client().await;
    let (_controller, user) = spawn_own_controller("noirsa", None, &["--disable-irsa"]);
    let ns = namespace(&client, "noirsa").await;
    irsa_account(&client, &env().aws, &ns, "puller").await;
    let offset = audit_offset();
    let spec = json!({"source": {"ecr": {"registry": "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
                                          "auth": {"serviceAccountRef": {"name": "puller"}}}}});
    create_credential_for(&client, &ns, "irsa", Some("noirsa"), spec).await;
    let cr = wait_ready(&client, &ns, "irsa", "False", Some("IrsaDisabled")).await;
    let message = &cr.status.expect("status").conditions[0].message;
    assert!(message.contains("irsa.enabled=false"), "{message}");
    let tokens: Vec<_> = requests_of_since(&user, offset)
        .into_iter()
        .filter(|(verb, res, _, _)| verb == "create" && res == "serviceaccounts")
        .collect();
    assert!(tokens.is_empty(), "TokenRequests made: {tokens:?}");
}

#[tokio::test]
async fn a_tenant_can_name_nothing_outside_its_namespace() {
    env();
    let admin = client().await;
    let ns = namespace(&admin, "tenant").await;
    let other = namespace(&admin, "victim").await;
    let tenant = tenant(&admin, &ns).await;
    let basic = json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}}});
    // Editors may manage RegistryCredentials once the aggregation controller has merged the
    // chart's role into edit.
    regcred_testenv::eventually("edit aggregates RegistryCredentials", TIMEOUT, || async {
        create_raw(&tenant, Some(&ns), "RegistryCredential", "own", basic.clone()).await.ok()
    })
    .await;

    // Every reference that could name another namespace is refused at admission.
    let refs = [
        json!({"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": other}}}),
        json!({"ghcr": {"username": "u", "tokenSecretRef": {"name": "src", "namespace": other}}}),
        json!({"gcr": {"jsonKeySecretRef": {"name": "src", "namespace": other}}}),
        json!({"ecr": {"registry": "123456789012.dkr.ecr.eu-west-1.amazonaws.com", "auth": {"secretRef": {"name": "src", "namespace": other}}}}),
        json!({"ecr": {"registry": "123456789012.dkr.ecr.eu-west-1.amazonaws.com", "auth": {"serviceAccountRef": {"name": "default", "namespace": other}}}}),
        json!({"gcr": {"workloadIdentity": {"serviceAccountRef": {"name": "default", "namespace": other},
               "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/pool/providers/kube"}}}),
        json!({"acr": {"registry": "team.azurecr.io", "workloadIdentity": {"serviceAccountRef": {"name": "default", "namespace": other}}}}),
        json!({"acr": {"registry": "team.azurecr.io", "servicePrincipal": {"tenantId": "contoso.onmicrosoft.com",
               "clientId": "11111111-2222-3333-4444-555555555555", "clientSecretRef": {"name": "src", "namespace": other}}}}),
    ];
    for (i, source) in refs.into_iter().enumerate() {
        let spec = json!({"registry": "r.example.com", "source": source});
        // ecr and acr name their registry in the source.
        let spec = if (3..=4).contains(&i) || i >= 6 { json!({"source": spec["source"]}) } else { spec };
        match create_raw(&tenant, Some(&ns), "RegistryCredential", &format!("cross-{i}"), spec).await {
            Err(kube::Error::Api(status)) if status.code == 422 => {
                assert!(status.message.contains("reads its own namespace"), "{}", status.message)
            }
            other => panic!("reference {i} into {other:?} was not refused at admission"),
        }
    }
    // Cluster-wide fan-out is for cluster admins only.
    let fan = json!({"registry": "r.example.com", "namespaces": {"names": [other]},
                     "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": ns}}}});
    match create_raw(&tenant, None, "ClusterRegistryCredential", &format!("tenant-{}", &unique()[..6]), fan).await {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("a tenant created a ClusterRegistryCredential: {other:?}"),
    }
    // Nor may a tenant write a credential's status or the Secrets' owner: the controller does.
    let status = json!({"status": {"conditions": []}});
    let result = Api::<regcred::crd::RegistryCredential>::namespaced(tenant.clone(), &ns)
        .patch_status("own", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&status))
        .await;
    assert!(matches!(result, Err(kube::Error::Api(ref s)) if s.code == 403), "status written by a tenant: {result:?}");
}
