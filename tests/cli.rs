//! The binary's offline subcommands: `crdgen` and `render` (no cluster needed).

use std::{path::Path, process::Command};

use k8s_openapi::api::core::v1::Secret;

fn regcred(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_regcred"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success(), "regcred {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn crdgen_prints_what_crds_holds() {
    let printed = regcred(&["crdgen"]);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let on_disk: String = files.iter().map(|f| format!("---\n{}", std::fs::read_to_string(f).unwrap())).collect();
    assert_eq!(printed, on_disk);
}

fn rendered_login(example: &str, output: &str) -> (Secret, Vec<(String, String, String)>) {
    use secrecy::ExposeSecret;
    let text = regcred(&["render", "-f", example, "-n", "review", "-o", output]);
    let secret: Secret = match output {
        "json" => serde_json::from_str(&text).unwrap(),
        _ => serde_saphyr::from_str(text.trim_start_matches("---\n")).unwrap(),
    };
    let bytes = &secret.data.as_ref().unwrap()[".dockerconfigjson"].0;
    let logins = regcred::dockerconfig::parse(bytes)
        .unwrap()
        .into_iter()
        .map(|a| (a.server, a.username, a.password.expose_secret().to_string()))
        .collect();
    (secret, logins)
}

#[test]
fn render_works_offline_for_each_static_source() {
    let (secret, logins) = rendered_login("examples/basic.yaml", "yaml");
    assert_eq!(secret.metadata.name.as_deref(), Some("dockerhub-pull"));
    assert_eq!(secret.metadata.namespace.as_deref(), Some("review"));
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
    let hub = |server: &str| (server.to_string(), "example-user".to_string(), "example-dockerhub-token".to_string());
    assert_eq!(logins, vec![hub("https://index.docker.io/v1/"), hub("registry-1.docker.io")]);

    let (_, logins) = rendered_login("examples/ghcr.yaml", "json");
    assert_eq!(logins, vec![("ghcr.io".into(), "octocat".into(), "ghp_exampleExampleExampleExample0000".into())]);

    let (_, logins) = rendered_login("examples/gcr.yaml", "yaml");
    assert_eq!(logins[0].0, "europe-docker.pkg.dev");
    assert_eq!(logins[0].1, "_json_key");
    assert!(logins[0].2.starts_with("{\n  \"type\": \"service_account\""), "the key must be sent verbatim");
}

#[test]
fn render_reports_a_missing_secret_by_name() {
    let out = Command::new(env!("CARGO_BIN_EXE_regcred"))
        .args(["render", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(
                b"apiVersion: regcred.dev/v1alpha1\nkind: RegistryCredential\nmetadata: {name: x}\nspec:\n  source:\n    ghcr: {username: u, tokenSecretRef: {name: pat}}\n",
            )?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Secret default/pat not found"));
}
