//! The registry enforces its htpasswd users, as seen through a
//! `.dockerconfigjson` handed to crane.

use base64::Engine;
use regcred_testenv::Registry;

fn config_json(host: &str, user: &str, pass: &str) -> Vec<u8> {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#).into_bytes()
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
