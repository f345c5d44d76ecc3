//! The end-to-end demo: a local control plane, the regcred controller, the sample
//! credentials in `examples/` plus one for a real local registry, the resulting Secrets, and
//! a pull through that registry using one of them, and, where the machine can run a node
//! (root, containerd and runc), a real Pod running from the private image with that Secret.
//! Run it with `bash scripts/demo.sh`.

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use regcred_testenv::{ControlPlane, Node, Process, Registry, wait_for};

const NAMESPACE: &str = "regcred-demo";

fn main() -> Result<()> {
    let regcred =
        std::env::var_os("REGCRED_BIN").map(PathBuf::from).context("set REGCRED_BIN to the regcred binary")?;
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let keep = std::env::args().any(|a| a == "--keep");

    step("starting etcd, kube-apiserver and kube-controller-manager");
    let cp = ControlPlane::start()?;
    cp.install_crds(&repo.join("crds"))?;
    let kubectl = |args: &[&str]| -> Result<String> {
        let out = cp.kubectl(args);
        if !out.status.success() {
            bail!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    };

    step("starting a registry with htpasswd auth and pushing demo/hello:v1");
    let password = "demo-registry-password";
    let registry = Registry::start(&[("demo", password)])?;
    let image = registry.push_program_image(
        "demo/hello",
        "v1",
        "demo",
        password,
        &["hello", "from", "a", "private", "image"],
    )?;

    step("starting the regcred controller");
    let log = cp.dir().join("regcred.log");
    let mut cmd = Command::new(&regcred);
    let admin = format!("127.0.0.1:{}", regcred_testenv::free_port());
    // The demo's registry listens on loopback, as a registry inside the cluster would: its
    // RegistryCredential may be checked there only with --verify-private-networks.
    cmd.args(["run", "--admin-addr", &admin, "--verify-private-networks"])
        .env("KUBECONFIG", cp.controller_kubeconfig_path());
    let _controller = Process::spawn("regcred", cmd, &log)?;

    step("applying examples/ and a credential for the local registry");
    kubectl(&["create", "namespace", NAMESPACE])?;
    for example in ["basic.yaml", "ghcr.yaml", "gcr.yaml"] {
        let path = repo.join("examples").join(example);
        print!("{}", kubectl(&["apply", "-n", NAMESPACE, "-f", path.to_str().context("path")?])?);
    }
    let local = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: local-password}}\nstringData: {{password: {password}}}\n---\n\
         apiVersion: regcred.dev/v1alpha1\nkind: RegistryCredential\nmetadata: {{name: local}}\n\
         spec:\n  registry: \"{}\"\n  verify: {{insecure: true}}\n  source:\n    basic: {{username: demo, passwordSecretRef: {{name: local-password}}}}\n",
        registry.host()
    );
    let local_file = cp.dir().join("local.yaml");
    std::fs::write(&local_file, local)?;
    print!("{}", kubectl(&["apply", "-n", NAMESPACE, "-f", local_file.to_str().context("path")?])?);

    step("waiting for every RegistryCredential to be Ready");
    kubectl(&["wait", "-n", NAMESPACE, "--for=condition=Ready", "registrycredential", "--all", "--timeout=60s"])?;
    print!("{}", kubectl(&["get", "registrycredentials", "-n", NAMESPACE])?);
    println!();
    print!("{}", kubectl(&["get", "secrets", "-n", NAMESPACE, "-l", "app.kubernetes.io/managed-by=regcred"])?);

    step("the .dockerconfigjson regcred wrote (passwords shortened)");
    let names =
        kubectl(&["get", "secrets", "-n", NAMESPACE, "-l", "app.kubernetes.io/managed-by=regcred", "-o", "name"])?;
    for name in names.lines() {
        let config = kubectl(&["get", "-n", NAMESPACE, name, "-o", "jsonpath={.data.\\.dockerconfigjson}"])?;
        for (server, user, pw) in logins(&config)? {
            let shown: String = pw.chars().take(6).flat_map(char::escape_default).collect();
            println!("{name:<30} {server:<32} user={user:<14} password={shown}… ({} chars)", pw.chars().count());
        }
    }

    step(&format!("pulling {image} with Secret {NAMESPACE}/local as the only credentials"));
    let config = kubectl(&["get", "secret", "-n", NAMESPACE, "local", "-o", "jsonpath={.data.\\.dockerconfigjson}"])?;
    registry.pull_with_auth_file(&image, &base64_decode(&config)?)?;
    println!("pulled {image}: the Secret works as an image pull credential");
    let verified = "jsonpath={.status.conditions[?(@.type==\"Verified\")]['status','reason','message']}";
    kubectl(&["wait", "-n", NAMESPACE, "--for=condition=Verified", "registrycredential/local", "--timeout=30s"])?;
    println!(
        "and regcred proved it first (Verified): {}",
        kubectl(&["get", "-n", NAMESPACE, "registrycredential/local", "-o", verified])?
    );

    // Kept until the end: dropping it stops the kubelet and containerd and puts the machine back.
    let _node = run_pod_on_a_node(&cp, &kubectl, &image)?;

    step("changing the registry password in the source Secret: regcred rewrites the pull Secret");
    kubectl(&[
        "patch",
        "secret",
        "-n",
        NAMESPACE,
        "local-password",
        "-p",
        "{\"stringData\":{\"password\":\"rotated\"}}",
    ])?;
    wait_for("the pull Secret to carry the new password", Duration::from_secs(30), || {
        let config =
            kubectl(&["get", "secret", "-n", NAMESPACE, "local", "-o", "jsonpath={.data.\\.dockerconfigjson}"]).ok()?;
        (logins(&config).ok()?.first()?.2 == "rotated").then_some(())
    })?;
    println!("Secret {NAMESPACE}/local updated");
    let refused = "--for=jsonpath={.status.conditions[?(@.type==\"Verified\")].reason}=Unauthorized";
    kubectl(&["wait", "-n", NAMESPACE, refused, "registrycredential/local", "--timeout=30s"])?;
    println!(
        "the registry does not know that password, and regcred says so before any pod pulls: {}",
        kubectl(&["get", "-n", NAMESPACE, "registrycredential/local", "-o", verified])?
    );

    step("a ClusterRegistryCredential (examples/cluster.yaml): one Secret in each selected namespace");
    kubectl(&["create", "namespace", "build"])?;
    kubectl(&["create", "namespace", "team-a-web"])?;
    kubectl(&["label", "namespace", "team-a-web", "team=a"])?;
    let cluster = repo.join("examples").join("cluster.yaml");
    print!("{}", kubectl(&["apply", "-f", cluster.to_str().context("path")?])?);
    kubectl(&["wait", "--for=condition=Ready", "clusterregistrycredential/company-registry", "--timeout=60s"])?;
    print!("{}", kubectl(&["get", "clusterregistrycredentials"])?);
    println!();
    print!("{}", kubectl(&["get", "secrets", "-A", "--field-selector", "metadata.name=regcred-pull"])?);
    wait_for("the default ServiceAccount in build to list the Secret", Duration::from_secs(30), || {
        let names =
            kubectl(&["get", "serviceaccount", "default", "-n", "build", "-o", "jsonpath={.imagePullSecrets[*].name}"])
                .ok()?;
        names.contains("regcred-pull").then_some(())
    })?;
    println!(
        "\nServiceAccount build/default imagePullSecrets: regcred-pull (pods there need no imagePullSecrets line)"
    );

    if keep {
        step("running; press Ctrl-C to stop everything");
        println!("export KUBECONFIG={}", cp.kubeconfig_path().display());
        println!("controller log: {}", log.display());
        loop {
            std::thread::park();
        }
    }
    step("done; stopping the control plane, the registry and the controller");
    Ok(())
}

/// Starts a node (containerd and a kubelet) and runs a Pod from the private `image` with
/// regcred's Secret `local` as its only pull credential; says plainly why not where this
/// machine cannot run a node.
fn run_pod_on_a_node(
    cp: &ControlPlane,
    kubectl: &dyn Fn(&[&str]) -> Result<String>,
    image: &str,
) -> Result<Option<Node>> {
    step("running a Pod from the private image on a real node (containerd and a kubelet)");
    if let Some(why) = Node::cannot_run() {
        println!("SKIPPED: this machine cannot run a node: {why}.");
        println!("(As root, scripts/setup.sh installs containerd and runc with apt-get.)");
        return Ok(None);
    }
    let node = Node::start(cp)?;
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: hello}}\nspec:\n  nodeName: {}\n  hostNetwork: true\n  \
         restartPolicy: Never\n  automountServiceAccountToken: false\n  imagePullSecrets: [{{name: local}}]\n  \
         containers: [{{name: hello, image: \"{image}\", imagePullPolicy: Always}}]\n",
        node.name()
    );
    let pod_file = cp.dir().join("pod.yaml");
    std::fs::write(&pod_file, &pod)?;
    print!("{pod}");
    print!("{}", kubectl(&["apply", "-n", NAMESPACE, "-f", pod_file.to_str().context("path")?])?);
    kubectl(&["wait", "-n", NAMESPACE, "--for=jsonpath={.status.phase}=Succeeded", "pod/hello", "--timeout=60s"])?;
    print!("{}", kubectl(&["get", "pod", "-n", NAMESPACE, "hello", "-o", "wide"])?);
    let events = "custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message";
    print!(
        "{}",
        kubectl(&["get", "events", "-n", NAMESPACE, "--field-selector", "involvedObject.name=hello", "-o", events])?
    );
    println!("kubectl logs hello: {}", kubectl(&["logs", "-n", NAMESPACE, "hello"])?.trim());
    Ok(Some(node))
}

fn step(what: &str) {
    println!("\n==> {what}");
}

/// (server, username, password) of each login in a base64 `.dockerconfigjson`, decoded
/// from the `auth` field as the kubelet does.
fn logins(config_b64: &str) -> Result<Vec<(String, String, String)>> {
    let doc: serde_json::Value = serde_json::from_slice(&base64_decode(config_b64)?)?;
    let auths = doc.get("auths").and_then(|a| a.as_object()).context("no auths")?;
    auths
        .iter()
        .map(|(server, entry)| {
            let auth = entry.get("auth").and_then(|a| a.as_str()).context("no auth field")?;
            let decoded = String::from_utf8(base64_decode(auth)?)?;
            let (user, pw) = decoded.split_once(':').context("auth is not user:password")?;
            Ok((server.clone(), user.to_string(), pw.to_string()))
        })
        .collect()
}

fn base64_decode(text: &str) -> Result<Vec<u8>> {
    use base64::Engine;
    Ok(base64::engine::general_purpose::STANDARD.decode(text.trim())?)
}
