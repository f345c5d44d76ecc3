//! A real node for the shared control plane: containerd (Debian's package, with its own root,
//! state, socket and config) and a kubelet built from the same Kubernetes version as the
//! apiserver, registered as `system:node:NAME` under Node authorization. Pods run with
//! `hostNetwork` (there are no CNI plugins) and name the node in `spec.nodeName` (there is no
//! scheduler).
//!
//! The kubelet changes machine-wide state (sysctls, cgroups under `kubepods`,
//! `/var/lib/kubelet/device-plugins`, `/var/log/containers`), so there is one node per
//! machine: a lock file serialises test processes, everything lives under one fixed directory
//! (`$TMPDIR/regcred-node`), and the teardown (at the exit of the test process, or at the next
//! start after a crash) kills the containers, unmounts their filesystems, removes what the
//! node created outside that directory and restores the sysctls.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Node as NodeObject;
use kube::Api;

use crate::process::Process;
use crate::{ControlPlane, Registry, block_on, free_port, random_hex, testbin, wait_until};

/// The name of the node (and of its kubelet's user, `system:node:NAME`).
pub const NODE_NAME: &str = "regcred-test-node";
/// The sandbox image containerd runs for every Pod, built from `testimage pause` and imported
/// at start under this name (the machine has no access to registry.k8s.io).
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10";
/// Set to `1` to skip the node tests on purpose (they fail where a node cannot run).
pub const SKIP_ENV: &str = "REGCRED_SKIP_NODE";
/// The node's taint (NoSchedule): the scheduler ([`Node::start_scheduler`]) places only Pods
/// that tolerate it, not the Pods other tests create; Pods that name the node run anyway.
pub const NODE_TAINT: &str = "regcred.dev/test-node";
/// With the CNI plugins installed (Debian's `containernetworking-plugins`), Pods without
/// `hostNetwork` get an address on the bridge `regcred0` (10.244.0.0/24), and reach the
/// apiserver at this address (the bridge's, on the machine) and the apiserver's port, which
/// the node forwards to the apiserver on 127.0.0.1. The apiserver's certificate names it.
pub const POD_GATEWAY: &str = "10.244.0.1";
const POD_SUBNET: &str = "10.244.0.0/24";
const BRIDGE: &str = "regcred0";
const CNI_PLUGINS: &str = "/usr/lib/cni";
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a second test process waits for the node of another one to go.
const LOCK_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// The sysctls the kubelet sets at start (`setupKernelTunables` and the keyring limits):
/// saved before it starts, restored at teardown.
const SYSCTLS: [&str; 7] = [
    // The bridge plugin turns forwarding on for the gateway.
    "net/ipv4/ip_forward",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];
/// Paths outside the node's directory that containerd or the kubelet create; those missing
/// before the node starts are removed at teardown.
const MACHINE_PATHS: [&str; 5] =
    ["/var/lib/kubelet", "/var/log/containers", "/run/containerd", "/etc/cni", "/run/netns"];

/// containerd + kubelet, registered as [`NODE_NAME`] with the shared [`ControlPlane`].
pub struct Node {
    dir: PathBuf,
    containerd: Mutex<Option<Process>>,
    kubelet: Mutex<Option<Process>>,
    scheduler: Mutex<Option<Process>>,
    /// Whether Pods without hostNetwork get an address (the CNI plugins are installed).
    pod_network: bool,
    /// Registry host names mapped to a local registry right now (see [`Node::map_registry`]).
    mapped: Mutex<BTreeSet<String>>,
    unmapped: Condvar,
    torn_down: Mutex<bool>,
    /// Held (flock) while the node lives.
    _lock: File,
}

impl Node {
    /// The node of this test process, started on first use for [`ControlPlane::shared`] and
    /// torn down when the process exits. `None` when `REGCRED_SKIP_NODE=1` (saying so on
    /// stderr). Panics, saying why, if this machine cannot run a node (not root, containerd
    /// or runc missing) or the node does not start.
    pub fn shared() -> Option<&'static Node> {
        if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
            let why = Node::cannot_run().unwrap_or_else(|| "this machine could run it".into());
            // Past the test harness's capture (which only takes the print macros), so that a
            // skip shows in the output of a passing run.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "testenv: {SKIP_ENV}=1: skipping a test that needs the node ({why})");
            return None;
        }
        if let Some(why) = Node::cannot_run() {
            panic!(
                "this machine cannot run the test node: {why}. The node tests need root, containerd and runc \
                 (scripts/setup.sh installs them with apt-get as root); set {SKIP_ENV}=1 to skip them on purpose"
            );
        }
        static SHARED: OnceLock<Result<Node, String>> = OnceLock::new();
        let node = SHARED.get_or_init(|| {
            let node = Node::start(ControlPlane::shared()).map_err(|e| format!("{e:#}"))?;
            extern "C" fn teardown_at_exit() {
                if let Some(Ok(node)) = SHARED.get() {
                    node.teardown();
                }
            }
            // SAFETY: registers a plain function; it runs at exit(3), after the tests.
            unsafe { libc::atexit(teardown_at_exit) };
            Ok(node)
        });
        match node {
            Ok(node) => Some(node),
            Err(e) => panic!("cannot start the test node: {e}"),
        }
    }

    /// Why this machine cannot run the node, if it cannot.
    pub fn cannot_run() -> Option<String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Some("the kubelet and containerd need root, and this is not root".into());
        }
        let missing: Vec<&str> = ["containerd", "containerd-shim-runc-v2", "runc", "ctr"]
            .into_iter()
            .filter(|b| which(b).is_none())
            .collect();
        if !missing.is_empty() {
            return Some(format!("{} not installed (apt-get install containerd runc)", missing.join(", ")));
        }
        if !Path::new("/sys/fs/cgroup").is_dir() {
            return Some("no /sys/fs/cgroup".into());
        }
        None
    }

    /// The Node's name, for a Pod's `spec.nodeName`.
    pub fn name(&self) -> &str {
        NODE_NAME
    }

    /// The directory holding containerd's and the kubelet's files and logs
    /// (`containerd.log`, `kubelet.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes containerd pull images named `host/...` (e.g. `ghcr.io`, `docker.io`,
    /// `123456789012.dkr.ecr.eu-west-1.amazonaws.com`) from `registry` instead (a `hosts.toml`
    /// whose server is the registry, with its CA when it serves HTTPS), while the kubelet still looks up the image's pull
    /// credential under `host`. One mapping per host at a time: this waits while another test
    /// maps the same host. The mapping lasts until the guard is dropped.
    pub fn map_registry(&self, host: &str, registry: &Registry) -> Result<HostMapping<'_>> {
        self.map_host(host, &registry.url(), registry.ca_pem())
    }

    /// As [`Node::map_registry`], to any registry `url` (`https://127.0.0.1:PORT`), trusting
    /// `ca_pem` for it when given.
    pub fn map_host(&self, host: &str, url: &str, ca_pem: Option<&str>) -> Result<HostMapping<'_>> {
        let mut mapped = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
        while mapped.contains(host) {
            mapped = self.unmapped.wait(mapped).unwrap_or_else(|e| e.into_inner());
        }
        let dir = self.path("certs.d").join(host);
        std::fs::create_dir_all(&dir)?;
        // Written aside and renamed: containerd reads it at every pull.
        let tmp = dir.join("hosts.toml.tmp");
        // containerd 1.6 insists on a `host` table; the server (the fallback) is the registry
        // too, so that no pull ever goes to the real host.
        let mut hosts = format!("server = \"{url}\"\n\n[host.\"{url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n");
        // An HTTPS registry: containerd trusts its CA for this host only, as a node trusts a
        // private registry's CA in production.
        if let Some(ca) = ca_pem {
            let path = dir.join("ca.crt");
            std::fs::write(&path, ca)?;
            hosts.push_str(&format!("  ca = \"{}\"\n", path.display()));
        }
        std::fs::write(&tmp, hosts)?;
        std::fs::rename(&tmp, dir.join("hosts.toml"))?;
        mapped.insert(host.to_string());
        Ok(HostMapping { node: self, host: host.to_string() })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Starts a node for `cp` (the demo's; tests use [`Node::shared`]) and waits until it is
    /// Ready. Drop tears it down. Fails, saying why, where [`Node::cannot_run`] says it cannot.
    pub fn start(cp: &ControlPlane) -> Result<Node> {
        if let Some(why) = Node::cannot_run() {
            bail!("this machine cannot run the node: {why}");
        }
        let t0 = Instant::now();
        let dir = std::env::temp_dir().join("regcred-node");
        let lock = lock_machine(&std::env::temp_dir().join("regcred-node.lock"))?;
        // A node of a process that died without its teardown: clean up after it first.
        if dir.exists() {
            eprintln!("testenv: cleaning up the node of an earlier test process in {}", dir.display());
            cleanup(&dir);
        }
        std::fs::create_dir_all(&dir)?;
        let pod_network = ["bridge", "host-local", "loopback"].iter().all(|p| Path::new(CNI_PLUGINS).join(p).is_file());
        let node = Node {
            dir,
            containerd: Mutex::new(None),
            kubelet: Mutex::new(None),
            scheduler: Mutex::new(None),
            pod_network,
            mapped: Mutex::new(BTreeSet::new()),
            unmapped: Condvar::new(),
            torn_down: Mutex::new(false),
            _lock: lock,
        };
        let started = node.save_machine_state().and_then(|()| node.start_containerd(cp)).and_then(|()| {
            node.import_pause_image()?;
            node.start_kubelet(cp)?;
            node.wait_ready(cp)
        });
        if let Err(e) = started {
            let logs = node.log_tails();
            node.teardown();
            return Err(e.context(logs));
        }
        eprintln!("testenv: node {NODE_NAME} ready in {:.1?} (files in {})", t0.elapsed(), node.dir.display());
        Ok(node)
    }

    /// Records the sysctls and which machine paths exist, in the node's directory, so that
    /// the teardown (or the next start, after a crash) can put them back.
    fn save_machine_state(&self) -> Result<()> {
        let mut saved = String::new();
        for name in SYSCTLS {
            if let Ok(value) = std::fs::read_to_string(Path::new("/proc/sys").join(name)) {
                saved += &format!("{name}={}\n", value.trim());
            }
        }
        std::fs::write(self.path("sysctls.saved"), saved)?;
        let absent: Vec<String> = machine_paths().into_iter().filter(|p| !Path::new(p).exists()).collect();
        std::fs::write(self.path("created-paths"), absent.join("\n"))?;
        let netns: Vec<String> = std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        std::fs::write(self.path("netns-before"), netns.join("\n"))?;
        Ok(())
    }

    fn start_containerd(&self, cp: &ControlPlane) -> Result<()> {
        for d in ["root", "state", "certs.d", "cni/net.d", "cni/bin", "opt", "kubelet", "pod-logs"] {
            std::fs::create_dir_all(self.path(d))?;
        }
        let cni_bin = if self.pod_network {
            self.start_pod_network(cp)?;
            let ipam = serde_json::json!({"type": "host-local", "dataDir": self.path("cni/ipam"),
                "ranges": [[{"subnet": POD_SUBNET, "gateway": POD_GATEWAY}]], "routes": [{"dst": "0.0.0.0/0"}]});
            let conflist = serde_json::json!({"cniVersion": "1.0.0", "name": "regcred-test", "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": true, "ipMasq": false, "ipam": ipam}]});
            std::fs::write(self.path("cni/net.d/10-regcred.conflist"), conflist.to_string())?;
            PathBuf::from(CNI_PLUGINS)
        } else {
            // No plugin binaries: enough for the CRI plugin to report the network ready, and
            // hostNetwork Pods never call a plugin.
            std::fs::write(
                self.path("cni/net.d/10-regcred.conflist"),
                r#"{"cniVersion": "1.0.0", "name": "regcred-test", "plugins": [{"type": "loopback"}]}"#,
            )?;
            self.path("cni/bin")
        };
        let runc = which("runc").context("runc")?;
        let p = |name: &str| self.path(name).display().to_string();
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{socket}"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # This VM drops CAP_SYS_RESOURCE: runc cannot lower the sandbox's oom_score_adj to -998.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    # hosts.toml per registry host, read at every pull (Node::map_registry).
    config_path = "{certs}"
"#,
            root = p("root"),
            state = p("state"),
            socket = p("containerd.sock"),
            opt = p("opt"),
            runc = runc.display(),
            cni_bin = cni_bin.display(),
            cni_conf = p("cni/net.d"),
            certs = p("certs.d"),
        );
        std::fs::write(self.path("containerd.toml"), config)?;
        let mut cmd = Command::new(which("containerd").context("containerd")?);
        cmd.arg("--config").arg(self.path("containerd.toml"));
        let mut proc = Process::spawn("containerd", cmd, &self.path("containerd.log"))?;
        let started =
            wait_until("containerd", READY_TIMEOUT, || proc.check_alive(), || self.ctr(&["version"]).map(drop));
        *self.containerd.lock().unwrap() = Some(proc);
        started
    }

    /// The bridge with the gateway address (made here, before any Pod, so the forwarder can
    /// listen on it; the bridge plugin takes it as it is), and the forwarder from
    /// `POD_GATEWAY:PORT` to the apiserver on `127.0.0.1:PORT`.
    fn start_pod_network(&self, cp: &ControlPlane) -> Result<()> {
        std::fs::write(self.path("bridge"), BRIDGE)?;
        let ip = |args: &[&str]| -> Result<()> {
            let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
            ensure!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
            Ok(())
        };
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{POD_GATEWAY}/24"), "dev", BRIDGE])?;
        ip(&["link", "set", BRIDGE, "up"])?;
        let port = cp.api_port();
        let listener = std::net::TcpListener::bind((POD_GATEWAY, port))
            .with_context(|| format!("listening on {POD_GATEWAY}:{port} for Pods"))?;
        std::thread::Builder::new().name("testenv-apiserver-forwarder".into()).spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", port)) else { continue };
                let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else { continue };
                let pipe = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
                    move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    }
                };
                std::thread::spawn(pipe(client, server));
                std::thread::spawn(pipe(server2, client2));
            }
        })?;
        Ok(())
    }

    /// Whether Pods without `hostNetwork` can run here (see [`POD_GATEWAY`]).
    pub fn has_pod_network(&self) -> bool {
        self.pod_network
    }

    /// Starts kube-scheduler (once; later calls do nothing) as `system:kube-scheduler`, for
    /// Pods that do not name the node. It places only Pods that tolerate [`NODE_TAINT`].
    pub fn start_scheduler(&self, cp: &ControlPlane) -> Result<()> {
        let mut slot = self.scheduler.lock().unwrap();
        if slot.is_some() {
            return Ok(());
        }
        let (cert, key) = cp.client_certificate("system:kube-scheduler", "system:kube-scheduler")?;
        std::fs::write(self.path("scheduler.crt"), cert)?;
        std::fs::write(self.path("scheduler.key"), key)?;
        std::fs::write(
            self.path("scheduler.kubeconfig"),
            cp.kubeconfig_for_certificate(&self.path("scheduler.crt"), &self.path("scheduler.key")),
        )?;
        let mut cmd = Command::new(testbin("kube-scheduler")?);
        cmd.arg(format!("--kubeconfig={}", self.path("scheduler.kubeconfig").display()))
            .arg(format!("--authentication-kubeconfig={}", self.path("scheduler.kubeconfig").display()))
            .arg(format!("--authorization-kubeconfig={}", self.path("scheduler.kubeconfig").display()))
            .arg("--leader-elect=false")
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={}", free_port()))
            .arg("--v=1");
        *slot = Some(Process::spawn("kube-scheduler", cmd, &self.path("kube-scheduler.log"))?);
        Ok(())
    }

    /// `ctr` against this node's containerd, in the CRI plugin's namespace: its stdout.
    fn ctr(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.path("containerd.sock"))
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .context("running ctr")?;
        ensure!(out.status.success(), "ctr {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Builds the sandbox image (`testimage pause`) in a throwaway registry and imports it
    /// into containerd under [`PAUSE_IMAGE`].
    fn import_pause_image(&self) -> Result<()> {
        let password = random_hex();
        let registry = Registry::start(&[("node", &password)])?;
        let image = registry.push_program_image("pause", "3.10", "node", &password, &["pause"])?;
        let tarball = self.path("pause.tar");
        registry.save_image(&image, "node", &password, &tarball)?;
        self.ctr(&["images", "import", &tarball.display().to_string()])?;
        self.ctr(&["images", "tag", "--force", &image, PAUSE_IMAGE])?;
        self.ctr(&["images", "rm", &image])?;
        Ok(())
    }

    fn start_kubelet(&self, cp: &ControlPlane) -> Result<()> {
        let (cert, key) = cp.client_certificate(&format!("system:node:{NODE_NAME}"), "system:nodes")?;
        std::fs::write(self.path("kubelet-client.crt"), cert)?;
        std::fs::write(self.path("kubelet-client.key"), key)?;
        std::fs::write(
            self.path("kubelet.kubeconfig"),
            cp.kubeconfig_for_certificate(&self.path("kubelet-client.crt"), &self.path("kubelet-client.key")),
        )?;
        std::fs::write(self.path("ca.crt"), std::fs::read(cp.dir().join("ca.crt"))?)?;
        // The apiserver reaches the kubelet at the InternalIP (for `kubectl logs`); the kubelet
        // refuses a loopback address there, so it is the address of the default route.
        let ip = host_ip()?;
        let (port, healthz) = (free_port(), free_port());
        let p = |name: &str| self.path(name).display().to_string();
        let config = serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "containerRuntimeEndpoint": format!("unix://{}", p("containerd.sock")),
            "address": ip,
            "port": port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz,
            // Only the apiserver's client certificate (the test CA) and webhook-checked tokens.
            "authentication": {"anonymous": {"enabled": false}, "webhook": {"enabled": true},
                               "x509": {"clientCAFile": p("ca.crt")}},
            "authorization": {"mode": "Webhook"},
            // This machine: cgroup v1 without systemd, and swap is not refused.
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": false,
            "failSwapOn": false,
            "podLogsDirectory": p("pod-logs"),
            // Pulls of parallel tests do not wait for each other; no image is ever collected,
            // and nothing is evicted for a full disk on a shared test machine.
            "serializeImagePulls": false,
            "imageGCHighThresholdPercent": 100,
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "nodeStatusReportFrequency": "10s",
            "syncFrequency": "5s",
            "fileCheckFrequency": "5s",
            "resolvConf": "/etc/resolv.conf",
            "registerNode": true,
            "registerWithTaints": [{"key": NODE_TAINT, "effect": "NoSchedule"}],
        });
        std::fs::write(self.path("kubelet.json"), config.to_string())?;
        let mut cmd = Command::new(testbin("kubelet")?);
        cmd.arg(format!("--config={}", p("kubelet.json")))
            .arg(format!("--kubeconfig={}", p("kubelet.kubeconfig")))
            .arg(format!("--root-dir={}", p("kubelet")))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg(format!("--node-ip={ip}"))
            .arg("--v=2");
        let proc = Process::spawn("kubelet", cmd, &self.path("kubelet.log"))?;
        *self.kubelet.lock().unwrap() = Some(proc);
        Ok(())
    }

    /// Waits until the Node is Ready (registered, its runtime and network ready).
    fn wait_ready(&self, cp: &ControlPlane) -> Result<()> {
        let config = cp.kube_config();
        wait_until(
            &format!("Node {NODE_NAME} Ready"),
            READY_TIMEOUT,
            || self.check_alive(),
            || {
                let node = block_on(async {
                    let nodes = Api::<NodeObject>::all(kube::Client::try_from(config.clone())?);
                    anyhow::Ok(tokio::time::timeout(Duration::from_secs(10), nodes.get(NODE_NAME)).await??)
                })?;
                let ready =
                    node.status.and_then(|s| s.conditions).unwrap_or_default().into_iter().find(|c| c.type_ == "Ready");
                match ready {
                    Some(c) if c.status == "True" => Ok(()),
                    other => bail!("Node {NODE_NAME} is not Ready: {other:?}"),
                }
            },
        )?;
        // The kubelet registers with `node.kubernetes.io/not-ready`, which kube-controller-manager's
        // node lifecycle controller (not run here) removes once the node is Ready: done here.
        let patch = serde_json::json!({"spec": {"taints": [{"key": NODE_TAINT, "effect": "NoSchedule"}]}});
        block_on(async {
            let nodes = Api::<NodeObject>::all(kube::Client::try_from(config.clone())?);
            nodes.patch(NODE_NAME, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await?;
            anyhow::Ok(())
        })
        .context("removing the not-ready taint")
    }

    fn check_alive(&self) -> Result<()> {
        for slot in [&self.containerd, &self.kubelet, &self.scheduler] {
            if let Some(p) = slot.lock().unwrap().as_mut() {
                p.check_alive()?;
            }
        }
        Ok(())
    }

    fn log_tails(&self) -> String {
        [&self.containerd, &self.kubelet]
            .iter()
            .filter_map(|slot| slot.lock().unwrap().as_ref().map(Process::log_tail))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops the kubelet, kills the containers, stops containerd, and puts the machine back
    /// (see [`cleanup`]). Runs once.
    fn teardown(&self) {
        let mut done = self.torn_down.lock().unwrap_or_else(|e| e.into_inner());
        if *done {
            return;
        }
        *done = true;
        for slot in [&self.scheduler, &self.kubelet] {
            if let Some(mut p) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                p.stop();
            }
        }
        kill_shims(&self.dir);
        if let Some(mut p) = self.containerd.lock().unwrap_or_else(|e| e.into_inner()).take() {
            p.stop();
        }
        // The logs outlive the node, for a look after a failed run.
        let logs = std::env::temp_dir().join("regcred-node-logs");
        let _ = std::fs::create_dir_all(&logs);
        for name in ["kubelet.log", "containerd.log", "kube-scheduler.log"] {
            let _ = std::fs::copy(self.path(name), logs.join(name));
        }
        cleanup(&self.dir);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Registry host `host` mapped to a local registry (see [`Node::map_registry`]); drop
/// removes the mapping.
pub struct HostMapping<'a> {
    node: &'a Node,
    host: String,
}

impl Drop for HostMapping<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.node.path("certs.d").join(&self.host));
        let mut mapped = self.node.mapped.lock().unwrap_or_else(|e| e.into_inner());
        mapped.remove(&self.host);
        self.node.unmapped.notify_all();
    }
}

/// Takes the machine-wide node lock, waiting while another test process holds it.
fn lock_machine(path: &Path) -> Result<File> {
    use std::os::fd::AsRawFd;
    let file = File::options().create(true).truncate(false).write(true).open(path)?;
    let deadline = Instant::now() + LOCK_TIMEOUT;
    let mut said = false;
    loop {
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(file);
        }
        if Instant::now() >= deadline {
            bail!("another test process kept the node ({}) for {LOCK_TIMEOUT:?}", path.display());
        }
        if !said {
            eprintln!("testenv: waiting for another test process's node to go ({})", path.display());
            said = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Puts the machine back after a node that used `dir`: kills its containers (a shim
/// outlives containerd), unmounts what is mounted under `dir`, restores the sysctls and
/// removes the paths it created, then `dir`. Safe to run on a half-started node.
fn cleanup(dir: &Path) {
    kill_shims(dir);
    unmount_under(dir);
    // The Pods' network namespaces (the CRI plugin pins them under /run/netns), then the
    // bridge (their veths went with them).
    if let Ok(before) = std::fs::read_to_string(dir.join("netns-before")) {
        let before: BTreeSet<&str> = before.lines().collect();
        for e in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !before.contains(name.as_str()) {
                unmount_under(&e.path());
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    if let Ok(bridge) = std::fs::read_to_string(dir.join("bridge")) {
        let _ = Command::new("ip").args(["link", "del", bridge.trim()]).output();
    }
    if let Ok(saved) = std::fs::read_to_string(dir.join("sysctls.saved")) {
        for line in saved.lines() {
            if let Some((name, value)) = line.split_once('=') {
                let path = Path::new("/proc/sys").join(name);
                if std::fs::read_to_string(&path).is_ok_and(|now| now.trim() != value) {
                    let _ = std::fs::write(&path, value);
                }
            }
        }
    }
    if let Ok(created) = std::fs::read_to_string(dir.join("created-paths")) {
        for path in created.lines().filter(|l| !l.is_empty()) {
            let path = Path::new(path);
            if path.starts_with("/sys/fs/cgroup") {
                remove_cgroup(path);
            } else {
                let _ = std::fs::remove_dir_all(path);
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The machine paths to watch: [`MACHINE_PATHS`] and the `kubepods` cgroup of every v1
/// hierarchy.
fn machine_paths() -> Vec<String> {
    let mut paths: Vec<String> = MACHINE_PATHS.iter().map(|p| p.to_string()).collect();
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in entries.flatten() {
            if e.path().is_dir() {
                paths.push(e.path().join("kubepods").display().to_string());
            }
        }
    }
    paths
}

/// Removes a cgroup directory tree, children first (a cgroup goes with rmdir once empty).
fn remove_cgroup(path: &Path) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(path);
}

/// SIGKILLs every containerd shim whose command line names `dir` (its containerd's socket),
/// and every process below it (the containers).
fn kill_shims(dir: &Path) {
    let dir = dir.display().to_string();
    let procs = processes();
    let shims: Vec<i32> = procs
        .iter()
        .filter(|(_, _, cmdline)| {
            cmdline.first().is_some_and(|exe| exe.contains("containerd-shim"))
                && cmdline.iter().any(|a| a.contains(&dir))
        })
        .map(|(pid, _, _)| *pid)
        .collect();
    for shim in shims {
        let mut tree = vec![shim];
        let mut i = 0;
        while i < tree.len() {
            let parent = tree[i];
            tree.extend(procs.iter().filter(|(_, ppid, _)| *ppid == parent).map(|(pid, _, _)| *pid));
            i += 1;
        }
        // Children first, so none is reparented to a dead shim's successor.
        for pid in tree.iter().rev() {
            // SAFETY: kill(2) on a pid found above.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
    }
    // Until they are gone (their mounts are busy until then).
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && processes().iter().any(|(_, _, c)| {
            c.first().is_some_and(|e| e.contains("containerd-shim")) && c.iter().any(|a| a.contains(&dir))
        })
    {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// (pid, parent pid, command line) of every process.
fn processes() -> Vec<(i32, i32, Vec<String>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return out };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // pid (comm) state ppid ...; comm may hold spaces and parentheses.
        let Some(ppid) = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        out.push((pid, ppid, cmdline));
    }
    out
}

/// Unmounts (lazily) every mount point under `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    points.dedup();
    for point in points {
        if let Ok(c) = std::ffi::CString::new(point.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 with a valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            out.push((bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The address this machine reaches other hosts from (the default route's source): the
/// node's InternalIP. No packet is sent.
fn host_ip() -> Result<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    socket.connect("8.8.8.8:53").context("no route off this machine")?;
    let ip = socket.local_addr()?.ip();
    ensure!(!ip.is_loopback() && !ip.is_unspecified(), "no address off loopback for the node ({ip})");
    Ok(ip)
}

/// The full path of `name` in PATH (and the sbin directories, which a non-login root shell
/// may lack).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b\134c"), r"/tmp/a b\c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
