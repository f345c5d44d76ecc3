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

/// Runs `regcred` with `stdin` as its standard input; returns success, stdout and stderr.
fn regcred_with_input(args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_regcred"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

/// Issue item 19: a ClusterRegistryCredential renders into the Namespace manifests its selector
/// matches and the `-n` namespaces it names, from a source Secret in its own namespace.
const CLUSTER_MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: team-a, labels: {team: a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: team-b, labels: {team: b}}
---
apiVersion: v1
kind: Secret
metadata: {name: registry-robot, namespace: platform}
stringData:
  password: "robot-s3cret-value\n"
---
apiVersion: regcred.dev/v1alpha1
kind: ClusterRegistryCredential
metadata: {name: company-registry}
spec:
  registry: registry.example.com
  source:
    basic:
      username: robot
      passwordSecretRef: {name: registry-robot, namespace: platform}
  namespaces:
    selector: {matchLabels: {team: a}}
    names: [build]
  secret: {name: regcred-pull, labels: {team: platform}}
---
apiVersion: regcred.dev/v1alpha1
kind: ClusterRegistryCredential
metadata: {name: unused}
spec:
  registry: other.example.com
  source:
    basic:
      username: robot
      passwordSecretRef: {name: registry-robot, namespace: platform}
  namespaces: {names: [nowhere]}
"#;

#[test]
fn render_fans_a_cluster_credential_out_to_the_namespaces_it_selects() {
    use secrecy::ExposeSecret;
    let (ok, stdout, stderr) = regcred_with_input(&["render", "-f", "-", "-n", "build", "-n", "ci"], CLUSTER_MANIFESTS);
    assert!(ok, "regcred render failed: {stderr}");
    let secrets: Vec<Secret> = serde_saphyr::from_multiple(&stdout).unwrap();
    let placed: Vec<_> = secrets
        .iter()
        .map(|s| (s.metadata.namespace.as_deref().unwrap(), s.metadata.name.as_deref().unwrap()))
        .collect();
    assert_eq!(placed, [("build", "regcred-pull"), ("team-a", "regcred-pull")]);
    for secret in &secrets {
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
        let labels = secret.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["team"], "platform");
        assert!(!labels.contains_key("regcred.dev/credential-uid"), "no owner offline, so no uid label");
        assert!(secret.metadata.owner_references.is_none());
        let logins = regcred::dockerconfig::parse(&secret.data.as_ref().unwrap()[".dockerconfigjson"].0).unwrap();
        let logins: Vec<_> =
            logins.iter().map(|a| (a.server.as_str(), a.username.as_str(), a.password.expose_secret())).collect();
        assert_eq!(logins, [("registry.example.com", "robot", "robot-s3cret-value")], "line ending removed");
    }
    // Notes: the credential that selects nothing, and the line ending removed (by key, not value).
    assert!(
        stderr.contains(
            "ClusterRegistryCredential unused selects none of the known namespaces (team-a, team-b, build, ci)"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("Secret platform/registry-robot ended in a line break"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "a secret value on stderr: {stderr}");

    // Selecting nothing anywhere is an error that says why.
    let only_unused =
        CLUSTER_MANIFESTS.split("---").filter(|doc| !doc.contains("company-registry")).collect::<Vec<_>>();
    let (ok, stdout, stderr) = regcred_with_input(&["render", "-f", "-", "-n", "ci"], &only_unused.join("---"));
    assert!(!ok && stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("nothing to render: ClusterRegistryCredential unused selects none of the known namespaces"),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret"), "a secret value on stderr: {stderr}");
}

/// A kubeconfig whose apiserver is a local port nobody listens on, in a fresh directory.
fn unreachable_kubeconfig(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("regcred-cli-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Bound and released at once: the port was free a moment ago and nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "gone", "cluster": {"server": format!("https://127.0.0.1:{port}"), "insecure-skip-tls-verify": true}}],
        "users": [{"name": "gone", "user": {"token": "not-a-real-token"}}],
        "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "gone"}}],
        "current-context": "gone",
    });
    let path = dir.join("kubeconfig");
    std::fs::write(&path, kubeconfig.to_string()).unwrap();
    path
}

/// Runs `regcred run` against an apiserver that does not answer, waits until its log shows
/// `started` and then `failing` (it is trying to reach the apiserver), sends SIGTERM, and
/// asserts that it is still running then (it retries instead of giving up) and exits cleanly
/// within 10 s. The child is killed if it does not, so the test never hangs.
fn exits_on_sigterm_without_an_apiserver(test: &str, extra: &[&str], failing: &str) {
    use std::time::{Duration, Instant};
    let kubeconfig = unreachable_kubeconfig(test);
    let log = kubeconfig.with_file_name("regcred.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_regcred"))
        .args(["run", "--admin-addr", "127.0.0.1:0"])
        .args(extra)
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info")
        .env_remove("REGCRED_LEADER_ELECT")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(read_log().contains("starting controller") && read_log().contains(failing)) {
        if Instant::now() >= deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("regcred {extra:?} did not start and log {failing:?}:\n{}", read_log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(status) = child.try_wait().unwrap() {
        panic!("regcred {extra:?} exited ({status}) before SIGTERM, instead of retrying:\n{}", read_log());
    }
    // SAFETY: kill(2) on the pid of a child we have not reaped yet.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let sent = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if sent.elapsed() >= Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("regcred {extra:?} still running 10 s after SIGTERM:\n{}", read_log());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("regcred {extra:?} exited ({status}) {:?} after SIGTERM", sent.elapsed());
    assert!(status.success(), "regcred {extra:?} did not stop cleanly ({status}):\n{}", read_log());
    let _ = std::fs::remove_dir_all(kubeconfig.parent().unwrap());
}

#[test]
fn sigterm_stops_a_controller_that_cannot_reach_its_apiserver() {
    exits_on_sigterm_without_an_apiserver("plain", &[], "(Connect)");
}

#[test]
fn sigterm_stops_a_leader_candidate_that_cannot_reach_its_apiserver() {
    exits_on_sigterm_without_an_apiserver("leader", &["--leader-elect"], "(Connect)");
}

/// `render --verify`: the controller's registry check, offline, one line per registry, exit
/// status 3 when one fails. Against a real registry (CNCF distribution with htpasswd).
#[test]
fn render_verify_checks_each_registry_like_the_controller() {
    let registry = regcred_testenv::Registry::start(&[("puller", "right-password")]).unwrap();
    let manifests = |password: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: pass}}\nstringData: {{password: {password}}}\n---\n\
             apiVersion: regcred.dev/v1alpha1\nkind: RegistryCredential\nmetadata: {{name: pull}}\n\
             spec: {{registry: \"{}\", verify: {{insecure: true}}, source: {{basic: {{username: puller, passwordSecretRef: {{name: pass}}}}}}}}\n",
            registry.host()
        )
    };
    let run = |password: &str| {
        let file =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("verify-{}-{password}.yaml", std::process::id()));
        std::fs::write(&file, manifests(password)).unwrap();
        let out =
            Command::new(env!("CARGO_BIN_EXE_regcred")).args(["render", "--verify", "-f"]).arg(&file).output().unwrap();
        std::fs::remove_file(&file).unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run("right-password");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("kind: Secret"), "the Secret is still printed: {stdout}");
    let line = format!(
        "verify: RegistryCredential default/pull: {}: Verified: the registry accepted the login",
        registry.host()
    );
    assert!(stderr.contains(&line), "{stderr}");
    let (code, _, stderr) = run("wrong-password");
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains(&format!("{}: Unauthorized:", registry.host())), "{stderr}");
    assert!(!stderr.contains("wrong-password"), "the password is never printed: {stderr}");
}

/// Issue 20, item 11e: `--selector` applies to both kinds, and its help says so.
#[test]
fn the_selector_help_names_both_kinds() {
    let help = regcred(&["run", "--help"]);
    let selector = help.split("--selector").nth(1).expect("--selector in `regcred run --help`");
    let selector = &selector[..selector.find("\n  -").unwrap_or(selector.len())];
    for kind in ["RegistryCredentials", "ClusterRegistryCredentials"] {
        assert!(selector.contains(kind), "--selector's help does not name {kind}: {selector}");
    }
}

/// As a kubectl plugin (`ln -s regcred kubectl-regcred` on PATH, then `kubectl regcred …`) the
/// binary is the same CLI, named `kubectl regcred` in help and errors; `doctor` without any
/// cluster configuration says so with exit status 2 (1 is for images that cannot pull).
#[test]
fn as_kubectl_regcred_it_is_the_same_cli_named_as_a_plugin() {
    let dir = std::env::temp_dir().join(format!("regcred-plugin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plugin = dir.join("kubectl-regcred");
    let _ = std::fs::remove_file(&plugin);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_regcred"), &plugin).unwrap();
    let help = Command::new(&plugin).args(["doctor", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success() && text.contains("Usage: kubectl regcred doctor"), "{text}");
    for what in ["pod", "deployment", "statefulset", "daemonset", "job", "cronjob", "image"] {
        assert!(text.contains(&format!("\n  {what} ")), "{what} in {text}");
    }
    let out = Command::new(&plugin)
        .args(["doctor", "pod", "web"])
        .env("KUBECONFIG", dir.join("missing-kubeconfig"))
        .env("HOME", &dir)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no Kubernetes client configuration"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
