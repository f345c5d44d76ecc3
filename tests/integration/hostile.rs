//! Servers a tenant controls, answering the controller with hostile responses. Each test
//! starts its own servers and, where it measures the controller, its own controller process,
//! so the figures are that process's alone.

use kube::Api;
use regcred::crd::RegistryCredential;
use serde_json::json;

use crate::support::*;

/// A tenant points `spec.verify` at a registry of their own whose Bearer realm answers the
/// token request with an endless body (chunked), or announces a 1 TiB one (Content-Length)
/// and streams it. The controller stops reading at its cap: `Verified=False` with
/// `ResponseTooLarge` naming the endpoint and the cap, its peak RSS stays under 100 MiB, and
/// it keeps running. Each realm streams at most 256 MiB and then stops, so the test ends by
/// itself even against a controller that reads it all.
#[tokio::test]
async fn an_endless_token_answer_is_cut_off_at_the_cap_and_memory_stays_bounded() {
    use std::{
        io::{Read, Write},
        net::TcpListener,
        sync::{
            Arc,
            atomic::{AtomicBool, AtomicU64, Ordering},
        },
        time::Duration,
    };

    /// The most a realm sends on one connection.
    const BUDGET: u64 = 256 << 20;
    const CHUNK: usize = 64 << 10;

    /// A registry on 127.0.0.1: `GET /v2/` is a Bearer challenge naming its own `/token` as
    /// the realm, which streams `{"token":"aaaa…` until `BUDGET` is sent or the client hangs
    /// up. `lying`: announce a 1 TiB Content-Length instead of chunking. Counts the body bytes
    /// it got out; stops accepting once `stop` is set.
    fn hostile_registry(lying: bool, sent: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let host = listener.local_addr().expect("its address").to_string();
        listener.set_nonblocking(true).expect("non-blocking accept");
        let realm = format!("http://{host}/token");
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let Ok((mut socket, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let (realm, sent) = (realm.clone(), sent.clone());
                std::thread::spawn(move || {
                    let _ = socket.set_nonblocking(false);
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.ends_with(b"\r\n\r\n") && request.len() < 16 << 10 {
                        match socket.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    if !request.starts_with(b"GET /token") {
                        let challenge = format!(
                            "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Bearer realm=\"{realm}\",service=\"hostile\"\r\n\
                             content-length: 0\r\nconnection: close\r\n\r\n"
                        );
                        let _ = socket.write_all(challenge.as_bytes());
                        return;
                    }
                    let framing = if lying { "content-length: 1099511627776" } else { "transfer-encoding: chunked" };
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{framing}\r\nconnection: close\r\n\r\n"
                    );
                    if socket.write_all(head.as_bytes()).is_err() {
                        return;
                    }
                    // `{"token":"` and then a token that never ends.
                    let frame = |data: &[u8]| match lying {
                        true => data.to_vec(),
                        false => [format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"].concat(),
                    };
                    if socket.write_all(&frame(br#"{"token":""#)).is_err() {
                        return;
                    }
                    let frame = frame(&[b'a'; CHUNK]);
                    let mut out = 0u64;
                    while out < BUDGET {
                        if socket.write_all(&frame).is_err() {
                            return; // the controller hung up
                        }
                        out += CHUNK as u64;
                        sent.fetch_add(CHUNK as u64, Ordering::SeqCst);
                    }
                    if !lying {
                        let _ = socket.write_all(b"0\r\n\r\n");
                    }
                });
            }
        });
        host
    }

    /// Stops the servers' accept loops when the test ends, however it ends.
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    let client = client().await;
    let ns = namespace(&client, "hostile-endless").await;
    let name = format!("hostile-{}", &unique()[..6]);
    let mut controller = spawn_labelled(&name, &[], &[]);
    let stop = Stop(Arc::default());
    let (endless_sent, lying_sent) = (Arc::<AtomicU64>::default(), Arc::<AtomicU64>::default());
    let endless = hostile_registry(false, endless_sent.clone(), stop.0.clone());
    let lying = hostile_registry(true, lying_sent.clone(), stop.0.clone());
    let password = secret_value("tenant", "hostile");
    create_secret(&client, &ns, "src", &[("password", password.as_bytes())]).await;
    for (cred, host) in [("endless", &endless), ("lying", &lying)] {
        let spec = json!({"registry": host, "verify": {"insecure": true},
                          "source": {"basic": {"username": "tenant", "passwordSecretRef": {"name": "src"}}}});
        create_credential_for(&client, &ns, cred, Some(&name), spec).await;
    }

    // Whatever the reason: the check ended. Then the memory it took, then the reason.
    let api = Api::<RegistryCredential>::namespaced(client.clone(), &ns);
    let verified = |cr: &RegistryCredential| {
        let condition = cr.status.as_ref()?.condition("Verified")?;
        (condition.status == "False").then(|| (condition.reason.clone(), condition.message.clone()))
    };
    let mut results = Vec::new();
    for (cred, host) in [("endless", &endless), ("lying", &lying)] {
        let result = regcred_testenv::eventually(&format!("{cred}: Verified=False"), TIMEOUT, || async {
            verified(&api.get(cred).await.ok()?)
        })
        .await;
        results.push((cred, host, result));
    }
    let (rss, peak) = controller.rss_kib();
    let (endless_sent, lying_sent) = (endless_sent.load(Ordering::SeqCst), lying_sent.load(Ordering::SeqCst));
    println!(
        "controller VmRSS {} KiB, VmHWM {} KiB; the realms got out {endless_sent} (endless) and {lying_sent} (lying) \
         body bytes; {results:?}",
        rss, peak
    );
    assert!(
        peak < 100 << 10,
        "the controller's peak RSS reached {} MiB reading the realms' answers ({} and {} MiB sent): {results:?}",
        peak >> 10,
        endless_sent >> 20,
        lying_sent >> 20
    );
    for (cred, host, (reason, message)) in &results {
        assert_eq!(reason, "ResponseTooLarge", "{cred}: {message}");
        let named = format!("the token endpoint http://{host}/token answered with more than 64 KiB");
        assert!(message.contains(&named), "{cred}: {message}");
        assert!(!message.contains("aaaa"), "{cred}: the body is quoted: {message}");
    }
    // The controller hung up soon after the cap: what got out is the cap plus what the
    // sockets' buffers took in.
    assert!(endless_sent < 32 << 20, "the endless realm got {endless_sent} bytes out");
    controller.check_alive().expect("the controller survived the realms' answers");
    assert_eq!(admin_get(controller.admin_port, "/healthz").0, 200, "the controller still answers");
    drop(stop);
}
