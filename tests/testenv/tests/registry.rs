//! The test registries enforce their users, as seen through a `.dockerconfigjson` handed to
//! crane and through plain HTTP requests: basic auth (users changed while it runs, stopped
//! and started again, its requests counted), TLS with a test CA, and token auth with a
//! real token server that grants each user only its own repositories.

use std::process::Command;
use std::time::Duration;

use base64::Engine;
use regcred_testenv::{Registry, RegistryOptions, Request, http_get_basic_auth, testbin, wait_for};

fn config_json(host: &str, user: &str, pass: &str) -> Vec<u8> {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#).into_bytes()
}

fn port(host_or_url: &str) -> u16 {
    let after_colon = host_or_url.rsplit(':').next().unwrap();
    after_colon.split('/').next().unwrap().parse().unwrap()
}

/// The status of `GET /v2/` as `user`.
fn v2_status(reg: &Registry, user: &str, pass: &str) -> u16 {
    http_get_basic_auth(port(&reg.host()), "/v2/", user, pass).unwrap().0
}

#[test]
fn pull_needs_the_right_password() {
    let reg = Registry::start(&[("alice", "s3cret"), ("bob", "hunter2")]).unwrap();
    let host = reg.host();
    let image = reg.push_test_image("team/app", "v1", "alice", "s3cret").unwrap();
    assert_eq!(image, format!("{host}/team/app:v1"));

    reg.pull_with_auth_file(&image, &config_json(&host, "alice", "s3cret")).unwrap();
    reg.pull_with_auth_file(&image, &config_json(&host, "bob", "hunter2")).unwrap();

    let err = reg.pull_with_auth_file(&image, &config_json(&host, "alice", "wrong")).unwrap_err();
    assert!(format!("{err:#}").contains("UNAUTHORIZED"), "{err:#}");
    // Credentials for another registry are no credentials here.
    reg.pull_with_auth_file(&image, &config_json("127.0.0.1:1", "alice", "s3cret")).unwrap_err();
    assert!(reg.push_test_image("team/app", "v2", "alice", "wrong").is_err());
}

#[test]
fn set_users_takes_effect_while_it_runs() {
    let reg = Registry::start(&[("alice", "old")]).unwrap();
    assert_eq!(v2_status(&reg, "alice", "old"), 200);
    assert_eq!(v2_status(&reg, "alice", "wrong"), 401);

    reg.set_users(&[("alice", "new"), ("bob", "b")]).unwrap();
    assert_eq!(v2_status(&reg, "alice", "old"), 401, "the old password is revoked");
    assert_eq!(v2_status(&reg, "alice", "new"), 200);
    assert_eq!(v2_status(&reg, "bob", "b"), 200);

    // Twice in a row: with coarse file timestamps both rewrites could share one.
    reg.set_users(&[("alice", "newer")]).unwrap();
    reg.set_users(&[("alice", "newest")]).unwrap();
    assert_eq!(v2_status(&reg, "alice", "newest"), 200);
    assert_eq!(v2_status(&reg, "alice", "newer"), 401);
    assert_eq!(v2_status(&reg, "bob", "b"), 401);
}

#[test]
fn stopped_it_refuses_connections_and_starts_again_on_the_same_port() {
    let mut reg = Registry::start(&[("alice", "s3cret")]).unwrap();
    let host = reg.host();
    let image = reg.push_test_image("team/app", "v1", "alice", "s3cret").unwrap();

    reg.stop();
    let err = std::net::TcpStream::connect(&host).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    reg.pull_with_auth_file(&image, &config_json(&host, "alice", "s3cret")).unwrap_err();

    reg.start_again().unwrap();
    assert_eq!(reg.host(), host);
    assert_eq!(http_get_basic_auth(port(&host), "/v2/", "alice", "s3cret").unwrap().0, 200);
    // Same storage: the image pushed before is still there.
    reg.pull_with_auth_file(&image, &config_json(&host, "alice", "s3cret")).unwrap();
    assert!(reg.start_again().is_err(), "it is already running");
}

#[test]
fn the_access_log_counts_requests() {
    let reg = Registry::start(&[("alice", "s3cret")]).unwrap();
    let image = reg.push_test_image("team/app", "v1", "alice", "s3cret").unwrap();

    let offset = reg.log_offset().unwrap();
    assert_eq!(v2_status(&reg, "alice", "wrong"), 401);
    assert_eq!(v2_status(&reg, "alice", "s3cret"), 200);
    reg.pull_with_auth_file(&image, &config_json(&reg.host(), "alice", "s3cret")).unwrap();

    let get = |path: &str, status| Request { method: "GET".into(), path: path.into(), status };
    let manifest = |r: &Request| *r == get("/v2/team/app/manifests/v1", 200);
    let requests = wait_for("the pull in the access log", Duration::from_secs(10), || {
        let requests = reg.requests_since(offset).unwrap();
        requests.iter().any(manifest).then_some(requests)
    })
    .unwrap();
    assert_eq!(requests[..2], [get("/v2/", 401), get("/v2/", 200)], "{requests:#?}");
    assert_eq!(requests.iter().filter(|r| manifest(r)).count(), 1, "{requests:#?}");
    // Nothing from before the offset: the push is not counted.
    assert!(requests.iter().all(|r| r.method != "PUT"), "{requests:#?}");
}

#[test]
fn tls_registry_is_trusted_only_with_its_ca() {
    let options = RegistryOptions { tls: true, ..Default::default() };
    let reg = Registry::start_with(&[("alice", "s3cret")], options).unwrap();
    assert_eq!(reg.url(), format!("https://{}", reg.host()));
    let image = reg.push_test_image("team/app", "v1", "alice", "s3cret").unwrap();
    reg.pull_with_auth_file(&image, &config_json(&reg.host(), "alice", "s3cret")).unwrap();

    // crane by hand, trusting the CA from ca_pem() or only the system's roots.
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("config.json"), config_json(&reg.host(), "alice", "s3cret")).unwrap();
    let ca = work.path().join("ca.pem");
    std::fs::write(&ca, reg.ca_pem().unwrap()).unwrap();
    let digest = |ca: Option<&std::path::Path>| {
        let mut cmd = Command::new(testbin("crane").unwrap());
        cmd.args(["digest", &image]).env("DOCKER_CONFIG", work.path()).env_remove("SSL_CERT_DIR");
        match ca {
            Some(ca) => cmd.env("SSL_CERT_FILE", ca),
            None => cmd.env_remove("SSL_CERT_FILE"),
        };
        cmd.output().unwrap()
    };
    let with_ca = digest(Some(&ca));
    assert!(with_ca.status.success(), "{}", String::from_utf8_lossy(&with_ca.stderr));
    let without = digest(None);
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert!(!without.status.success());
    assert!(stderr.contains("certificate signed by unknown authority"), "{stderr}");

    // Each TLS registry has a CA of its own, and its crane trusts only that one.
    let other = Registry::start_with(&[("alice", "s3cret")], options).unwrap();
    let other_image = other.push_test_image("team/app", "v1", "alice", "s3cret").unwrap();
    let err = reg.pull_with_auth_file(&other_image, &config_json(&other.host(), "alice", "s3cret")).unwrap_err();
    assert!(format!("{err:#}").contains("certificate signed by unknown authority"), "{err:#}");
}

#[test]
fn token_server_grants_each_user_only_its_own_repositories() {
    let options = RegistryOptions { token_auth: true, ..Default::default() };
    let reg = Registry::start_with(&[("team", "team-pw"), ("other", "other-pw")], options).unwrap();
    let host = reg.host();
    let realm = reg.token_server_url().unwrap();
    assert_eq!(realm, format!("http://localhost:{}/token/", port(&realm)));
    let team_app = reg.push_test_image("team/app", "v1", "team", "team-pw").unwrap();
    let other_app = reg.push_test_image("other/app", "v1", "other", "other-pw").unwrap();

    reg.pull_with_auth_file(&team_app, &config_json(&host, "team", "team-pw")).unwrap();
    reg.pull_with_auth_file(&other_app, &config_json(&host, "other", "other-pw")).unwrap();
    let offset = reg.log_offset().unwrap();
    let err = reg.pull_with_auth_file(&other_app, &config_json(&host, "team", "team-pw")).unwrap_err();
    assert!(format!("{err:#}").contains("UNAUTHORIZED"), "{err:#}");
    // crane got a token and showed it: the registry itself refused it for other/app.
    let refused = Request { method: "GET".into(), path: "/v2/other/app/manifests/v1".into(), status: 401 };
    wait_for("the refused manifest GET in the access log", Duration::from_secs(10), || {
        reg.requests_since(offset).unwrap().contains(&refused).then_some(())
    })
    .unwrap();
    assert!(reg.push_test_image("other/app", "v2", "team", "team-pw").is_err());
    reg.pull_with_auth_file(&team_app, &config_json(&host, "team", "wrong")).unwrap_err();

    // The handshake by hand: the realm gives a token for the right password only, and the
    // registry wants that token, not the password.
    let token_path = "/token/?service=regcred-testenv&scope=repository:team/app:pull";
    let (status, body) = http_get_basic_auth(port(&realm), token_path, "team", "team-pw").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"access_token\""), "{body}");
    assert_eq!(http_get_basic_auth(port(&realm), token_path, "team", "wrong").unwrap().0, 401);
    assert_eq!(http_get_basic_auth(port(&realm), token_path, "nobody", "team-pw").unwrap().0, 401);
    assert_eq!(v2_status(&reg, "team", "team-pw"), 401);

    // The token server rereads its users too.
    reg.set_users(&[("team", "rotated")]).unwrap();
    assert_eq!(http_get_basic_auth(port(&realm), token_path, "team", "team-pw").unwrap().0, 401);
    reg.pull_with_auth_file(&team_app, &config_json(&host, "team", "rotated")).unwrap();
}

#[test]
fn token_auth_over_tls() {
    let options = RegistryOptions { tls: true, token_auth: true };
    let reg = Registry::start_with(&[("team", "team-pw")], options).unwrap();
    assert!(reg.token_server_url().unwrap().starts_with("https://localhost:"));
    let image = reg.push_test_image("team/app", "v1", "team", "team-pw").unwrap();
    reg.pull_with_auth_file(&image, &config_json(&reg.host(), "team", "team-pw")).unwrap();
    let err = reg.pull_with_auth_file(&image, &config_json(&reg.host(), "team", "wrong")).unwrap_err();
    assert!(format!("{err:#}").contains("UNAUTHORIZED"), "{err:#}");
}
