//! Fault helpers: restarting the apiserver or etcd keeps the data and the audit log, a
//! rotated audit log is caught, and Drop stops everything. Own test binary, because a restart would disturb tests
//! running in parallel on the shared control plane.

use std::time::Instant;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use regcred_testenv::ControlPlane;

#[test]
fn restarts_keep_data_and_drop_stops_everything() {
    let t = Instant::now();
    let cp = ControlPlane::start().unwrap();
    eprintln!("ControlPlane::start: {:?}", t.elapsed());
    let cm = ConfigMap {
        metadata: ObjectMeta { name: Some("survivor".into()), ..Default::default() },
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let config = cp.kube_config();
    let get = || {
        rt.block_on(async {
            let client = kube::Client::try_from(config.clone()).unwrap();
            Api::<ConfigMap>::namespaced(client, "default").get("survivor").await
        })
    };
    rt.block_on(async {
        let client = kube::Client::try_from(config.clone()).unwrap();
        Api::<ConfigMap>::namespaced(client, "default").create(&PostParams::default(), &cm).await.unwrap();
    });

    let t = Instant::now();
    cp.restart_apiserver().unwrap();
    eprintln!("restart_apiserver: {:?}", t.elapsed());
    get().unwrap();

    let t = Instant::now();
    cp.restart_etcd().unwrap();
    eprintln!("restart_etcd: {:?}", t.elapsed());
    get().unwrap();

    // The apiserver appended to the same audit log across its restart, so it reads as one.
    let audit_len = cp.audit_log_len().unwrap();
    assert!(cp.read_audit_log(0, None).unwrap().contains(r#""name":"survivor""#));
    // A rotation, done the way lumberjack does it (rename, then a fresh file), is caught.
    std::fs::rename(cp.audit_log_path(), cp.dir().join("audit-2026-01-01T00-00-00.000.log")).unwrap();
    std::fs::write(cp.audit_log_path(), "").unwrap();
    let err = cp.audit_log_len().unwrap_err().to_string();
    assert!(err.contains("rotated its audit log"), "{err}");
    assert!(cp.read_audit_log(audit_len, None).is_err());

    let (dir, port) = (cp.dir().to_owned(), cp.server().rsplit(':').next().unwrap().to_owned());
    drop(cp);
    assert!(!dir.exists(), "temp dir left behind");
    assert!(std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err(), "apiserver still listening");
}
