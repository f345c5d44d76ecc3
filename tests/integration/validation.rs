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
    for word in ["basic", "ghcr", "gcr", "Exactly one"] {
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
