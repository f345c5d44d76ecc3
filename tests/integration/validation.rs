//! Invalid specs are refused by the apiserver itself (HTTP 422), from the CRD schema.

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn invalid_specs_are_rejected_at_admission() {
    env();
    let client = client().await;
    let ns = namespace(&client, "invalid").await;
    let basic = json!({"username": "u", "passwordSecretRef": {"name": "s"}});
    let ghcr = json!({"username": "u", "tokenSecretRef": {"name": "s"}});
    let cases = [
        ("no-source", json!({"registry": "r.io", "source": {}}), "source"),
        ("two-sources", json!({"registry": "r.io", "source": {"basic": basic, "ghcr": ghcr}}), "source"),
        ("scheme", json!({"registry": "https://r.io", "source": {"basic": basic}}), "spec.registry"),
        ("path", json!({"registry": "r.io/team", "source": {"basic": basic}}), "spec.registry"),
        ("no-registry-for-basic", json!({"source": {"basic": basic}}), "spec.registry is required"),
        (
            "bad-secret-name",
            json!({"registry": "r.io", "source": {"basic": basic}, "secret": {"name": "Not_DNS"}}),
            "spec.secret.name",
        ),
        (
            "bad-ref-name",
            json!({"registry": "r.io", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "a/b"}}}}),
            "passwordSecretRef.name",
        ),
        (
            "colon-user",
            json!({"registry": "r.io", "source": {"basic": {"username": "a:b", "passwordSecretRef": {"name": "s"}}}}),
            "username",
        ),
        (
            "huge-user",
            json!({"registry": "r.io", "source": {"basic": {"username": "u".repeat(5000), "passwordSecretRef": {"name": "s"}}}}),
            "username",
        ),
        // gcr: one identity, `login` for keys only, no impersonation with the key itself.
        ("gcr-none", json!({"source": {"gcr": {}}}), "exactly one of jsonKeySecretRef, workloadIdentity or ambient"),
        (
            "gcr-two",
            json!({"source": {"gcr": {"jsonKeySecretRef": {"name": "k"}, "ambient": {}}}}),
            "exactly one of jsonKeySecretRef, workloadIdentity or ambient",
        ),
        (
            "gcr-login",
            json!({"source": {"gcr": {"ambient": {}, "login": "JsonKey"}}}),
            "login applies to jsonKeySecretRef",
        ),
        (
            "gcr-json-key-impersonates",
            json!({"source": {"gcr": {"jsonKeySecretRef": {"name": "k"}, "login": "JsonKey",
                   "impersonate": {"serviceAccount": "a@p.iam.gserviceaccount.com"}}}}),
            "cannot impersonate",
        ),
        (
            "gcr-audience",
            json!({"source": {"gcr": {"workloadIdentity": {"serviceAccountRef": {"name": "sa"},
                   "audience": "https://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/pool/providers/kube"}}}}),
            "audience",
        ),
        // acr: one identity, its registry in the source, GUID client ids.
        (
            "acr-none",
            json!({"source": {"acr": {"registry": "team.azurecr.io"}}}),
            "exactly one of workloadIdentity, servicePrincipal or ambient",
        ),
        (
            "acr-two",
            json!({"source": {"acr": {"registry": "team.azurecr.io", "ambient": {},
                   "workloadIdentity": {"serviceAccountRef": {"name": "sa"}}}}}),
            "exactly one of workloadIdentity, servicePrincipal or ambient",
        ),
        (
            "acr-spec-registry",
            json!({"registry": "team.azurecr.io", "source": {"acr": {"registry": "team.azurecr.io", "ambient": {}}}}),
            "set source.acr.registry",
        ),
        (
            "acr-ambient-both",
            json!({"source": {"acr": {"registry": "team.azurecr.io", "ambient": {
                   "clientId": "11111111-2222-3333-4444-555555555555",
                   "resourceId": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/mi"}}}}),
            "at most one of clientId or resourceId",
        ),
        (
            "acr-client-id",
            json!({"source": {"acr": {"registry": "team.azurecr.io",
                   "workloadIdentity": {"serviceAccountRef": {"name": "sa"}, "clientId": "not-a-guid"}}}}),
            "clientId",
        ),
        (
            "acr-authority",
            json!({"source": {"acr": {"registry": "team.azurecr.io", "ambient": {},
                   "authorityHost": "https://login.example/tenant/path"}}}),
            "authorityHost",
        ),
    ];
    for (name, spec, field) in cases {
        match create_raw(&client, Some(&ns), "RegistryCredential", name, spec).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{name}: {}", status.message);
                assert!(status.message.contains(field), "{name}: {}", status.message);
            }
            other => panic!("{name}: expected 422, got {other:?}"),
        }
    }
    // A valid spec passes, so the cases above fail for their own reason.
    create_raw(
        &client,
        Some(&ns),
        "RegistryCredential",
        "valid",
        json!({"registry": "r.io:5000", "source": {"basic": basic}}),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn kubectl_refuses_unknown_fields_and_explains_the_api() {
    let cp = env().cp;
    let out = cp.kubectl(&["explain", "registrycredential.spec.source"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for word in ["basic", "ghcr", "gcr", "ecr", "acr", "Exactly one"] {
        assert!(text.contains(word), "kubectl explain lacks {word}: {text}");
    }

    let client = client().await;
    let ns = namespace(&client, "unknown-field").await;
    let manifest = format!(
        "apiVersion: regcred.dev/v1alpha1\nkind: RegistryCredential\nmetadata: {{name: typo, namespace: {ns}}}\nspec:\n  registry: r.io\n  source:\n    basic: {{username: u, passwordSecretRef: {{name: s}}, pasword: oops}}\n"
    );
    let file = cp.dir().join(format!("{ns}.yaml"));
    std::fs::write(&file, manifest).unwrap();
    let out = cp.kubectl(&["apply", "--server-side", "-f", file.to_str().unwrap()]);
    assert!(!out.status.success(), "an unknown field was accepted");
    assert!(String::from_utf8_lossy(&out.stderr).contains("pasword"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Item 15: the v1 shape. Short names are distinct from the category: `rcred` and `crcred`
/// name one kind each, `regcred` (the category) lists both.
#[tokio::test]
async fn short_names_and_the_category_resolve_unambiguously() {
    let cp = env().cp;
    let client = client().await;
    let ns = namespace(&client, "names").await;
    create_raw(
        &client,
        Some(&ns),
        "RegistryCredential",
        "listed",
        json!({"registry": "r.io", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "s"}}}}),
    )
    .await
    .unwrap();
    let get = |args: &[&str]| {
        let out = cp.kubectl(args);
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(get(&["get", "rcred", "-n", &ns, "-o", "name"]).contains("registrycredential.regcred.dev/listed"));
    get(&["get", "crcred", "-o", "name"]);
    let both = get(&["get", "regcred", "-A", "-o", "name"]);
    assert!(both.contains("registrycredential.regcred.dev/listed"), "{both}");
}

/// Issue 20, item 11b: `source.ecr.registry` is judged at admission exactly as the controller
/// judges it (`parse_ecr_host`): each host below is admitted if and only if the controller
/// would accept it, so a bad host is refused with 422 instead of failing after the fact.
#[tokio::test]
async fn ecr_registry_hosts_are_judged_at_admission_as_the_controller_judges_them() {
    env();
    let client = client().await;
    let ns = namespace(&client, "invalid-ecr").await;
    let hosts = [
        // Accepted: each partition, FIPS, dual-stack, any letter case.
        "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
        "123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn",
        "123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com",
        "123456789012.dkr-ecr.us-east-1.on.aws",
        "123456789012.dkr.ecr.us-iso-east-1.c2s.ic.gov",
        "123456789012.dkr.ecr.us-isob-east-1.sc2s.sgov.gov",
        "123456789012.dkr.ecr.eu-isoe-west-1.cloud.adc-e.uk",
        "123456789012.DKR.ECR.EU-WEST-1.AMAZONAWS.COM",
        // Refused.
        "ghcr.io",
        "",
        "12345678901.dkr.ecr.eu-west-1.amazonaws.com",
        "1234567890123.dkr.ecr.eu-west-1.amazonaws.com",
        "abcdefghijkl.dkr.ecr.eu-west-1.amazonaws.com",
        "123456789012.dkr.ecs.eu-west-1.amazonaws.com",
        "123456789012.dkr-ecr-fips.us-east-1.on.aws",
        "123456789012.dkr.ecr.eu-west-1.evil.com",
        "123456789012.dkr.ecr.eu_west.amazonaws.com",
        "123456789012.dkr.ecr..amazonaws.com",
        "123456789012.dkr.ecr.eu.west-1.amazonaws.com",
        "123456789012.dkr.ecr.eu-west-1.amazonaws.com.evil.com",
        "123456789012.dkr.ecr.eu-west-1.amazonaws.com:443",
        "https://123456789012.dkr.ecr.eu-west-1.amazonaws.com",
    ];
    let mut refused = 0;
    for (i, host) in hosts.into_iter().enumerate() {
        let controller_accepts = regcred::source::ecr::parse_ecr_host(host).is_ok();
        let spec = json!({"source": {"ecr": {"registry": host, "auth": {"secretRef": {"name": "keys"}}}}});
        match (controller_accepts, create_raw(&client, Some(&ns), "RegistryCredential", &format!("h{i}"), spec).await) {
            (true, Ok(())) => {}
            (false, Err(kube::Error::Api(status))) => {
                assert_eq!(status.code, 422, "{host:?}: {}", status.message);
                assert!(status.message.contains("spec.source.ecr.registry"), "{host:?}: {}", status.message);
                refused += 1;
            }
            (accepts, result) => panic!("{host:?}: the controller accepts it: {accepts}; admission: {result:?}"),
        }
    }
    assert_eq!(refused, 14, "the refused hosts above");
    // The cluster kind shares the rule.
    let spec = json!({"source": {"ecr": {"registry": "123456789012.dkr.ecr.eu-west-1.evil.com",
                                          "auth": {"ambient": {}}}}});
    let name = format!("invalid-ecr-{}", &unique()[..8]);
    match create_raw(&client, None, "ClusterRegistryCredential", &name, spec).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 422, "{}", status.message),
        other => panic!("a ClusterRegistryCredential with a bad ECR host: {other:?}"),
    }
}

/// Issue 20, item 11c: a template's annotations are bounded at admission (at most 64, each
/// value at most 3072 bytes of UTF-8), and whatever admission lets through fits the written
/// Secret: 64 annotations with the longest keys and values become a Secret.
#[tokio::test]
async fn template_annotations_are_bounded_at_admission_and_what_passes_fits_the_secret() {
    env();
    let client = client().await;
    let ns = namespace(&client, "invalid-annotations").await;
    let spec = |annotations: serde_json::Value| {
        json!({"registry": "r.io", "secret": {"annotations": annotations},
               "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}}})
    };
    let many = |n: usize, value: &str| -> serde_json::Value {
        // Keys of the longest length admission allows: a 253-character prefix and a
        // 63-character name.
        let prefix = format!("{}.{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61));
        (0..n).map(|i| (format!("{prefix}/k{i:02}{}", "x".repeat(60)), json!(value))).collect()
    };
    let refused = [
        ("long-value", json!({"note": "x".repeat(3073)})),
        // 1,025 characters, but 3,075 bytes.
        ("long-in-bytes", json!({"note": "€".repeat(1025)})),
        ("too-many", many(65, "v")),
    ];
    for (name, annotations) in refused {
        match create_raw(&client, Some(&ns), "RegistryCredential", name, spec(annotations)).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{name}: {}", status.message);
                assert!(status.message.contains("spec.secret.annotations"), "{name}: {}", status.message);
            }
            other => panic!("{name}: expected 422, got {other:?}"),
        }
    }

    let password = secret_value("u", "annotations");
    create_secret(&client, &ns, "src", &[("password", password.as_bytes())]).await;
    create_raw(&client, Some(&ns), "RegistryCredential", "at-the-bound", spec(many(64, &"v".repeat(3072))))
        .await
        .expect("64 annotations of the longest keys and values are admitted");
    wait_ready(&client, &ns, "at-the-bound", "True", Some("Synced")).await;
    let secret = wait_secret(&client, &ns, "at-the-bound", "written", |_| true).await;
    let annotations = secret.metadata.annotations.unwrap_or_default();
    assert_eq!(annotations.values().filter(|v| v.len() == 3072).count(), 64);
}

/// Issue 20, item 11d: `kubectl get` shows every server key in the Registry column: Docker
/// Hub's two, not only the first.
#[tokio::test]
async fn the_registry_column_shows_every_server_key() {
    let cp = env().cp;
    let client = client().await;
    let ns = namespace(&client, "column").await;
    let password = secret_value("u", "column");
    create_secret(&client, &ns, "src", &[("password", password.as_bytes())]).await;
    let spec =
        json!({"registry": "docker.io", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}}});
    create_credential(&client, &ns, "hub", spec).await;
    let status = wait_ready(&client, &ns, "hub", "True", Some("Synced")).await.status.unwrap();
    assert_eq!(status.registries, ["https://index.docker.io/v1/", "registry-1.docker.io"]);
    let out = cp.kubectl(&["get", "rcred", "hub", "-n", &ns]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for key in &status.registries {
        assert!(table.contains(key.as_str()), "the Registry column lacks {key}:\n{table}");
    }
}
