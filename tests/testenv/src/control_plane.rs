use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::process::{Process, temp_dir};
use crate::{CONTROLLER_USER, block_on, free_port, http_get, random_hex, testbin, wait_until};

/// The audience of the apiserver's own ServiceAccount tokens; also the issuer.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// etcd + kube-apiserver + kube-controller-manager on loopback ports, with a
/// temp dir holding certs, keys, kubeconfigs, etcd data and one log file per
/// process (`<dir>/<name>.log`). Drop stops everything and removes the dir.
pub struct ControlPlane {
    // Field order is drop order: processes stop before the dir goes.
    workload_kcm: Mutex<Option<Process>>,
    kcm: Mutex<Option<Process>>,
    apiserver: Mutex<Option<Process>>,
    etcd: Mutex<Option<Process>>,
    server: String,
    etcd_port: u16,
    etcd_peer_port: u16,
    api_port: u16,
    kubeconfig: PathBuf,
    /// The audit log as the apiserver first created it, with the largest length seen since.
    audit_log: Mutex<Option<LogFile>>,
    /// The CA the apiserver trusts for client certificates and serves under.
    ca: OnceLock<rcgen::CertifiedIssuer<'static, rcgen::KeyPair>>,
    dir: tempfile::TempDir,
}

impl ControlPlane {
    /// Starts a control plane and waits until it serves requests and its
    /// controllers run (the `default` ServiceAccount exists).
    pub fn start() -> Result<ControlPlane> {
        let t0 = Instant::now();
        let dir = temp_dir("cp")?;
        let api_port = free_port();
        let cp = ControlPlane {
            workload_kcm: Mutex::new(None),
            kcm: Mutex::new(None),
            apiserver: Mutex::new(None),
            etcd: Mutex::new(None),
            server: format!("https://127.0.0.1:{api_port}"),
            etcd_port: free_port(),
            etcd_peer_port: free_port(),
            api_port,
            kubeconfig: dir.path().join("admin.kubeconfig"),
            audit_log: Mutex::new(None),
            ca: OnceLock::new(),
            dir,
        };
        cp.write_credentials()?;
        cp.start_etcd()?;
        cp.start_apiserver()?;
        cp.start_kcm()?;
        cp.wait_default_service_account()?;
        eprintln!(
            "testenv: control plane {} ready in {:.1?} (files in {})",
            cp.server,
            t0.elapsed(),
            cp.dir().display()
        );
        Ok(cp)
    }

    /// One control plane per test process, started on first use. Its
    /// processes die with the test process (see `process.rs`).
    pub fn shared() -> &'static ControlPlane {
        // The error is kept too, so later tests fail at once instead of each
        // retrying a start that cannot work.
        static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
        match SHARED.get_or_init(|| ControlPlane::start().map_err(|e| format!("{e:#}"))) {
            Ok(cp) => cp,
            Err(e) => panic!("cannot start the test control plane: {e}"),
        }
    }

    /// `https://127.0.0.1:PORT`
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The apiserver's port on 127.0.0.1.
    pub fn api_port(&self) -> u16 {
        self.api_port
    }

    /// Starts a second kube-controller-manager with the Deployment and ReplicaSet controllers
    /// (once; later calls do nothing), for workloads on a `Node`. Not by default: with them,
    /// every Deployment a test applies (the packaged manifests have one) would make Pods.
    pub fn start_workload_controllers(&self) -> Result<()> {
        let mut slot = self.workload_kcm.lock().unwrap();
        if slot.is_some() {
            return Ok(());
        }
        let p = |name: &str| self.path(name).display().to_string();
        let mut cmd = Command::new(testbin("kube-controller-manager")?);
        cmd.args([
            format!("--kubeconfig={}", p("kcm.kubeconfig")),
            "--leader-elect=false".into(),
            "--use-service-account-credentials=true".into(),
            "--secure-port=0".into(),
            "--controllers=deployment-controller,replicaset-controller".into(),
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
            "--v=1".into(),
        ]);
        *slot = Some(Process::spawn("kube-controller-manager-workloads", cmd, &self.path("kcm-workloads.log"))?);
        Ok(())
    }

    /// The admin kubeconfig (a token user in group `system:masters`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kubeconfig for the controller under test: its own user,
    /// `regcred-controller`, so its requests are told apart from the tests'
    /// admin ones (audit, managedFields); it is in `system:masters` too (the demo and the
    /// benchmark use it). For the packaged, least-privilege identity use
    /// [`ControlPlane::install_controller_identity`].
    pub fn controller_kubeconfig_path(&self) -> PathBuf {
        self.path("controller.kubeconfig")
    }

    /// Installs a rendered manifest of the controller (e.g. `deploy/regcred.yaml`: its
    /// ServiceAccount, ClusterRole, Role and bindings; a Deployment stays inert without
    /// kubelets) and returns a kubeconfig with a token of its ServiceAccount
    /// `namespace/name`, so a controller under test holds exactly the packaged permissions.
    pub fn install_controller_identity(&self, manifest: &Path, namespace: &str, name: &str) -> Result<PathBuf> {
        let path = manifest.display().to_string();
        let out = self.kubectl(&["apply", "--server-side", "--field-manager=testenv", "-f", &path]);
        if !out.status.success() {
            bail!("applying {path}: {}", String::from_utf8_lossy(&out.stderr));
        }
        self.service_account_kubeconfig(namespace, name)
    }

    /// A kubeconfig with a (24-hour) token of the ServiceAccount `namespace/name`, which must
    /// exist (e.g. installed with a manifest the caller applied itself).
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        let request = k8s_openapi::api::authentication::v1::TokenRequest {
            spec: k8s_openapi::api::authentication::v1::TokenRequestSpec {
                expiration_seconds: Some(24 * 3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let token = block_on(async {
            let client = self.client().await;
            Api::<ServiceAccount>::namespaced(client, namespace)
                .create_token_request(name, &Default::default(), &request)
                .await
        })
        .with_context(|| format!("requesting a token for {namespace}/{name}"))?
        .status
        .context("TokenRequest without status")?
        .token;
        let kubeconfig = self.path(&format!("sa-{namespace}-{name}.kubeconfig"));
        std::fs::write(&kubeconfig, self.kubeconfig_for(&token))?;
        Ok(kubeconfig)
    }

    /// The apiserver's audit log: one JSON event per request (Metadata level), written
    /// before the response is sent, so a test can count who wrote what. Read it with
    /// [`ControlPlane::audit_log_len`] and [`ControlPlane::read_audit_log`], which fail if the
    /// apiserver rotated it.
    pub fn audit_log_path(&self) -> PathBuf {
        self.path("audit.log")
    }

    /// The audit log's length now: the offset from which [`ControlPlane::read_audit_log`]
    /// reads what happens next. Err if the apiserver rotated the log (events would be lost).
    pub fn audit_log_len(&self) -> Result<u64> {
        self.check_audit_log().map(|file| file.len)
    }

    /// The audit log's text from byte `from` to byte `to` (or its end). Err if the apiserver
    /// rotated the log since the control plane started, before or while it was read.
    pub fn read_audit_log(&self, from: u64, to: Option<u64>) -> Result<String> {
        use std::io::{Read, Seek, SeekFrom};
        let before = self.check_audit_log()?;
        let to = to.unwrap_or(u64::MAX);
        anyhow::ensure!(from <= before.len, "audit log offset {from} is past its end ({} bytes)", before.len);
        let mut file = std::fs::File::open(self.audit_log_path()).context("opening the audit log")?;
        file.seek(SeekFrom::Start(from))?;
        let mut bytes = Vec::new();
        file.take(to.saturating_sub(from)).read_to_end(&mut bytes)?;
        self.check_audit_log()?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Records the audit log as the apiserver created it, or checks that it is still that file
    /// and has not been rotated; returns it as it is now.
    fn check_audit_log(&self) -> Result<LogFile> {
        use std::os::unix::fs::MetadataExt;
        let path = self.audit_log_path();
        let meta = std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        let now = LogFile { dev: meta.dev(), ino: meta.ino(), len: meta.len() };
        let siblings: Vec<String> = std::fs::read_dir(self.dir())?
            .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        let mut seen = self.audit_log.lock().unwrap_or_else(|e| e.into_inner());
        let before = *seen.get_or_insert(now);
        if let Some(problem) = audit_log_rotation(&before, &now, &siblings) {
            bail!("{problem} ({})", path.display());
        }
        *seen = Some(LogFile { len: before.len.max(now.len), ..before });
        Ok(now)
    }

    /// The temp dir with certs, kubeconfigs and `<process>.log` files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The admin `kube::Config`. Build one `Client` per tokio runtime from it.
    pub fn kube_config(&self) -> kube::Config {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).expect("reading admin kubeconfig");
        block_on(kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()))
            .expect("loading admin kubeconfig")
    }

    /// The admin config impersonating `user` (and `groups`), to test what an
    /// identity may do under RBAC, e.g. `system:serviceaccount:NS:NAME`.
    pub fn kube_config_as(&self, user: &str, groups: &[&str]) -> kube::Config {
        let mut config = self.kube_config();
        config.auth_info.impersonate = Some(user.into());
        if !groups.is_empty() {
            config.auth_info.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
        }
        config
    }

    /// An admin client.
    pub async fn client(&self) -> kube::Client {
        kube::Client::try_from(self.kube_config()).expect("building a kube client")
    }

    /// Runs the built kubectl against this control plane as admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(testbin("kubectl").expect("kubectl binary"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("running kubectl")
    }

    /// The apiserver's `/metrics` (Prometheus text), read as admin.
    pub fn apiserver_metrics(&self) -> Result<String> {
        self.raw_get("/metrics")
    }

    /// The keys the apiserver publishes for its ServiceAccount tokens, as an OIDC relying party
    /// finds them: `/.well-known/openid-configuration` (whose issuer is [`ISSUER`]), then
    /// `/openid/v1/jwks`. Read as admin: by default only ServiceAccounts may read them.
    pub fn service_account_jwks(&self) -> Result<serde_json::Value> {
        let discovery: serde_json::Value = serde_json::from_str(&self.raw_get("/.well-known/openid-configuration")?)?;
        anyhow::ensure!(discovery["issuer"] == ISSUER, "the apiserver's issuer is {}", discovery["issuer"]);
        Ok(serde_json::from_str(&self.raw_get("/openid/v1/jwks")?)?)
    }

    /// A token of ServiceAccount `namespace/name` (both created if missing) for `audiences`,
    /// valid `seconds`, from a TokenRequest as admin: what a Pod's projected token is.
    pub fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
        audiences: &[&str],
        seconds: i64,
    ) -> Result<String> {
        use k8s_openapi::api::core::v1::Namespace;
        use kube::api::{ObjectMeta, PostParams};
        let request = token_request(audiences, seconds);
        block_on(async {
            let client = self.client().await;
            let meta = |name: &str| ObjectMeta { name: Some(name.into()), ..Default::default() };
            // Created unless there: another test may be creating the same one (409).
            let exists = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.code == 409);
            let namespaces = Api::<Namespace>::all(client.clone());
            let ns = Namespace { metadata: meta(namespace), ..Default::default() };
            if let Err(e) = namespaces.create(&PostParams::default(), &ns).await.map(drop)
                && !exists(&e)
            {
                return Err(e.into());
            }
            let accounts = Api::<ServiceAccount>::namespaced(client, namespace);
            let account = ServiceAccount { metadata: meta(name), ..Default::default() };
            if let Err(e) = accounts.create(&PostParams::default(), &account).await.map(drop)
                && !exists(&e)
            {
                return Err(e.into());
            }
            let answer = accounts.create_token_request(name, &PostParams::default(), &request).await?;
            anyhow::Ok(answer.status.context("TokenRequest without status")?.token)
        })
        .with_context(|| format!("requesting a token for {namespace}/{name}"))
    }

    /// Server-side applies every `*.yaml` in `dir` and waits until each
    /// CustomResourceDefinition among them is Established.
    pub fn install_crds(&self, dir: &Path) -> Result<()> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
        files.sort();
        let mut crds = Vec::new();
        for file in &files {
            let file = file.to_str().context("non-UTF-8 path")?;
            let out = self.kubectl_ok(&[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=regcred-testenv",
                "-o=name",
                "-f",
                file,
            ])?;
            crds.extend(out.lines().filter(|l| l.starts_with("customresourcedefinition")).map(String::from));
        }
        if !crds.is_empty() {
            let mut args = vec!["wait", "--for=condition=Established", "--timeout=60s"];
            args.extend(crds.iter().map(String::as_str));
            self.kubectl_ok(&args)?;
            // kube-controller-manager rediscovers resource types only every 30 s; until then
            // its garbage collector cannot resolve owner references to the new kinds. A
            // restart makes it start with them, as in a cluster where the CRDs came first.
            if let Some(mut kcm) = self.kcm.lock().unwrap().take() {
                kcm.stop();
            }
            self.start_kcm()?;
        }
        Ok(())
    }

    /// Kills kube-apiserver and starts it again on the same port; returns
    /// when it is ready.
    pub fn restart_apiserver(&self) -> Result<()> {
        self.stop_apiserver();
        self.start_apiserver()
    }

    /// Kills etcd and starts it again (same data and port); returns when
    /// etcd is healthy and the apiserver ready again.
    pub fn restart_etcd(&self) -> Result<()> {
        self.stop_etcd();
        self.start_etcd()?;
        self.wait_apiserver_ready()
    }

    /// Kills kube-apiserver (SIGKILL, like a crash: a graceful stop takes
    /// seconds), for tests of an unreachable apiserver; bring it back with
    /// [`ControlPlane::start_apiserver`].
    pub fn stop_apiserver(&self) {
        if let Some(mut p) = self.apiserver.lock().unwrap().take() {
            p.kill();
        }
    }

    /// Kills etcd (SIGKILL; its data survives); the apiserver stays up but
    /// fails requests. Bring it back with [`ControlPlane::start_etcd`].
    pub fn stop_etcd(&self) {
        if let Some(mut p) = self.etcd.lock().unwrap().take() {
            p.kill();
        }
    }

    /// Starts etcd (if stopped) and waits until it is healthy.
    pub fn start_etcd(&self) -> Result<()> {
        let mut slot = self.etcd.lock().unwrap();
        if slot.is_some() {
            return Ok(());
        }
        let client = format!("http://127.0.0.1:{}", self.etcd_port);
        let peer = format!("http://127.0.0.1:{}", self.etcd_peer_port);
        let mut cmd = Command::new(testbin("etcd")?);
        cmd.arg("--name=testenv")
            .arg(format!("--data-dir={}", self.path("etcd").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=testenv={peer}"))
            // Throwaway data: skip fsync, which dominates write latency.
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        let proc = slot.insert(Process::spawn("etcd", cmd, &self.path("etcd.log"))?);
        wait_until(
            "etcd health",
            READY_TIMEOUT,
            || proc.check_alive(),
            || match http_get(self.etcd_port, "/health")? {
                (200, body) if body.contains(r#""health":"true""#) => Ok(()),
                (code, body) => bail!("etcd /health: {code} {body}"),
            },
        )
        .map_err(|e| e.context(proc.log_tail()))
    }

    /// Starts kube-apiserver (if stopped) and waits until `/readyz` is ok.
    pub fn start_apiserver(&self) -> Result<()> {
        {
            let mut slot = self.apiserver.lock().unwrap();
            if slot.is_some() {
                return Ok(());
            }
            let p = |name: &str| self.path(name).display().to_string();
            let mut cmd = Command::new(testbin("kube-apiserver")?);
            cmd.args([
                format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={}", self.api_port),
                format!("--tls-cert-file={}", p("apiserver.crt")),
                format!("--tls-private-key-file={}", p("apiserver.key")),
                format!("--token-auth-file={}", p("tokens.csv")),
                // Client certificates from the test CA: the node's kubelet (`Node`) is
                // `system:node:NAME` in `system:nodes`, as kubeadm makes it.
                format!("--client-ca-file={}", p("ca.crt")),
                // Node authorization and NodeRestriction: a kubelet reads only the Secrets of
                // the Pods bound to it and writes only its own Node and their status.
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                // For `kubectl logs` and exec: the apiserver reaches the kubelet at the
                // node's InternalIP with a client certificate the kubelet's webhook
                // authorization admits (system:masters).
                "--kubelet-preferred-address-types=InternalIP".into(),
                format!("--kubelet-client-certificate={}", p("apiserver-kubelet-client.crt")),
                format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
                format!("--service-account-issuer={ISSUER}"),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                format!("--api-audiences={ISSUER}"),
                // No kubelets or kube-proxy: nothing to reconcile the
                // `kubernetes` Service's endpoints for.
                "--endpoint-reconciler-type=none".into(),
                // The default; explicit to silence its deprecation warning.
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--profiling=false".into(),
                format!("--audit-policy-file={}", p("audit-policy.yaml")),
                format!("--audit-log-path={}", p("audit.log")),
                // Never rotate: lumberjack takes 0 (the default) as 100 MB, and a rotation
                // hides events from tests that count them. 1 TiB (the size is in MiB and
                // multiplied into an int64, so keep it far from 2^43); were it ever reached,
                // maxbackup=0 keeps every rotated file, and the readers fail on seeing one.
                "--audit-log-maxsize=1048576".into(),
                "--audit-log-maxbackup=0".into(),
                "--audit-log-maxage=0".into(),
                "--audit-log-format=json".into(),
                // Blocking mode: an event is on disk before its response is sent.
                "--audit-log-mode=blocking".into(),
                "--v=1".into(),
            ]);
            *slot = Some(Process::spawn("kube-apiserver", cmd, &self.path("kube-apiserver.log"))?);
        }
        self.wait_apiserver_ready()?;
        // The apiserver creates the log before it serves; the first start records which file
        // it is, later starts (which append to it) check that it is still that file.
        self.check_audit_log().map(drop)
    }

    fn start_kcm(&self) -> Result<()> {
        let p = |name: &str| self.path(name).display().to_string();
        let mut cmd = Command::new(testbin("kube-controller-manager")?);
        cmd.args([
            format!("--kubeconfig={}", p("kcm.kubeconfig")),
            "--leader-elect=false".into(),
            // Each controller acts as its own kube-system ServiceAccount with
            // its bootstrap RBAC role, as in real clusters; kcm's own user may
            // do little more than mint those tokens.
            "--use-service-account-credentials=true".into(),
            // No serving endpoint: nothing to probe, no certs, no extra port.
            "--secure-port=0".into(),
            "--controllers=garbage-collector-controller,namespace-controller,\
             serviceaccount-controller,serviceaccount-token-controller,\
             root-ca-certificate-publisher-controller,clusterrole-aggregation-controller"
                .into(),
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
            "--v=1".into(),
        ]);
        let proc = Process::spawn("kube-controller-manager", cmd, &self.path("kube-controller-manager.log"))?;
        *self.kcm.lock().unwrap() = Some(proc);
        Ok(())
    }

    fn wait_apiserver_ready(&self) -> Result<()> {
        let result = wait_until(
            "kube-apiserver /readyz",
            READY_TIMEOUT,
            || self.check_alive(),
            || self.raw_get("/readyz").map(drop),
        );
        result.map_err(|e| e.context(log_tail(&self.apiserver)))
    }

    fn wait_default_service_account(&self) -> Result<()> {
        let config = self.kube_config();
        wait_until(
            "ServiceAccount default/default (created by kube-controller-manager)",
            READY_TIMEOUT,
            || self.check_alive(),
            || {
                block_on(async {
                    let sas = Api::<ServiceAccount>::namespaced(kube::Client::try_from(config.clone())?, "default");
                    tokio::time::timeout(REQUEST_TIMEOUT, sas.get("default")).await??;
                    Ok(())
                })
            },
        )
        .map_err(|e| e.context(log_tail(&self.kcm)))
    }

    /// Err if a process that should run has exited.
    fn check_alive(&self) -> Result<()> {
        for slot in [&self.etcd, &self.apiserver, &self.kcm] {
            if let Some(p) = slot.lock().unwrap().as_mut() {
                p.check_alive()?;
            }
        }
        Ok(())
    }

    fn raw_get(&self, path: &str) -> Result<String> {
        let config = self.kube_config();
        let req = http::Request::get(path).body(Vec::new())?;
        block_on(async {
            let client = kube::Client::try_from(config)?;
            Ok(tokio::time::timeout(REQUEST_TIMEOUT, client.request_text(req)).await??)
        })
    }

    fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl(args);
        if !out.status.success() {
            bail!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// CA, apiserver serving cert, ServiceAccount signing key, static tokens
    /// and kubeconfigs, all fresh for this control plane.
    fn write_credentials(&self) -> Result<()> {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let mut ca = CertificateParams::default();
        ca.distinguished_name.push(DnType::CommonName, "regcred-testenv-ca");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
        let ca = self.ca.get_or_init(|| ca);

        let mut serving = CertificateParams::new(vec![
            "127.0.0.1".to_string(),
            // Where Pods on the node's bridge reach the apiserver (`Node`'s forwarder).
            crate::node::POD_GATEWAY.into(),
            "localhost".into(),
            "kubernetes".into(),
            "kubernetes.default.svc".into(),
        ])?;
        serving.distinguished_name.push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_key = KeyPair::generate()?;
        let serving = serving.signed_by(&serving_key, ca)?;

        let write =
            |name: &str, data: &str| std::fs::write(self.path(name), data).with_context(|| format!("writing {name}"));
        write("ca.crt", &ca.pem())?;
        write(
            "audit-policy.yaml",
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n",
        )?;
        write("apiserver.crt", &serving.pem())?;
        write("apiserver.key", &serving_key.serialize_pem())?;
        // The apiserver verifies with the public key (it cannot read one out
        // of a PKCS#8 private key file) and signs with the private one.
        let sa_key = KeyPair::generate()?;
        write("sa.key", &sa_key.serialize_pem())?;
        write("sa.pub", &sa_key.public_key_pem())?;

        let (cert, key) = self.client_certificate("kube-apiserver-kubelet-client", "system:masters")?;
        write("apiserver-kubelet-client.crt", &cert)?;
        write("apiserver-kubelet-client.key", &key)?;

        let (admin, controller, kcm) = (random_hex(), random_hex(), random_hex());
        write(
            "tokens.csv",
            &format!(
                "{admin},testenv-admin,testenv-admin,system:masters\n\
                 {controller},{CONTROLLER_USER},{CONTROLLER_USER},system:masters\n\
                 {kcm},system:kube-controller-manager,system:kube-controller-manager\n"
            ),
        )?;
        write("admin.kubeconfig", &self.kubeconfig_for(&admin))?;
        write("controller.kubeconfig", &self.kubeconfig_for(&controller))?;
        write("kcm.kubeconfig", &self.kubeconfig_for(&kcm))?;
        Ok(())
    }

    /// A fresh client certificate for user `cn` in `group` (the subject's O), signed by the
    /// control plane's CA, which the apiserver accepts (`--client-ca-file`): PEMs of the
    /// certificate and its key.
    pub fn client_certificate(&self, cn: &str, group: &str) -> Result<(String, String)> {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
        let ca = self.ca.get().context("the control plane has no CA yet")?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.distinguished_name.push(DnType::OrganizationName, group);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, ca)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A kubeconfig for this control plane authenticating with a client certificate and key
    /// (files), e.g. from [`ControlPlane::client_certificate`].
    pub fn kubeconfig_for_certificate(&self, cert: &Path, key: &Path) -> String {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "testenv", "cluster": {
                "server": self.server,
                "certificate-authority": self.path("ca.crt"),
            }}],
            "users": [{"name": "testenv", "user": {"client-certificate": cert, "client-key": key}}],
            "contexts": [{"name": "testenv", "context": {"cluster": "testenv", "user": "testenv"}}],
            "current-context": "testenv",
        })
        .to_string()
    }

    fn kubeconfig_for(&self, token: &str) -> String {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "testenv", "cluster": {
                "server": self.server,
                "certificate-authority": self.path("ca.crt"),
            }}],
            "users": [{"name": "testenv", "user": {"token": token}}],
            "contexts": [{"name": "testenv", "context": {"cluster": "testenv", "user": "testenv", "namespace": "default"}}],
            "current-context": "testenv",
        })
        .to_string()
    }
}

fn log_tail(slot: &Mutex<Option<Process>>) -> String {
    slot.lock().unwrap().as_ref().map(Process::log_tail).unwrap_or_default()
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // SIGTERM to all at once, so their grace periods overlap.
        let slots = [&self.workload_kcm, &self.kcm, &self.apiserver, &self.etcd];
        let mut procs: Vec<Process> = slots.iter().filter_map(|s| s.lock().unwrap().take()).collect();
        procs.iter_mut().for_each(Process::terminate);
        procs.iter_mut().for_each(Process::stop);
    }
}

/// The audit log file as seen: which file (device, inode) and the largest length seen so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LogFile {
    pub dev: u64,
    pub ino: u64,
    pub len: u64,
}

/// Whether the audit log was rotated between `before` (the file as first seen, with the
/// largest length seen since) and `now`, given the names of the files beside it. Rotation
/// (lumberjack's) renames the file to `audit-<time>.log` (`.gz` when compressed) and starts
/// an empty one: another inode under the name, a shorter file, or such a sibling gives it
/// away. Returns what shows it.
pub(crate) fn audit_log_rotation(before: &LogFile, now: &LogFile, siblings: &[String]) -> Option<String> {
    let trace = if (now.dev, now.ino) != (before.dev, before.ino) {
        format!("another file (inode {}) replaced the one the tests started reading (inode {})", now.ino, before.ino)
    } else if now.len < before.len {
        format!("the file shrank from {} to {} bytes", before.len, now.len)
    } else {
        let rotated = siblings.iter().find(|name| {
            name.strip_prefix("audit-").is_some_and(|rest| rest.ends_with(".log") || rest.ends_with(".log.gz"))
        })?;
        format!("a rotated file {rotated} lies beside it")
    };
    Some(format!(
        "the apiserver rotated its audit log ({trace}): events are missing from audit.log, so counts from it \
         cannot be trusted; raise --audit-log-maxsize in testenv's control_plane.rs"
    ))
}

/// A TokenRequest for these audiences, valid `seconds`, bound to no object.
pub fn token_request(audiences: &[&str], seconds: i64) -> k8s_openapi::api::authentication::v1::TokenRequest {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    TokenRequest {
        spec: TokenRequestSpec {
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            expiration_seconds: Some(seconds),
            bound_object_ref: None,
        },
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: LogFile = LogFile { dev: 2049, ino: 77, len: 1000 };

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_growing_file_is_not_rotated() {
        let dir = names(&["audit.log", "audit-policy.yaml", "etcd.log", "kube-apiserver.log", "ca.crt"]);
        assert_eq!(audit_log_rotation(&FILE, &FILE, &dir), None);
        assert_eq!(audit_log_rotation(&FILE, &LogFile { len: 5000, ..FILE }, &dir), None);
    }

    #[test]
    fn rotation_is_seen_in_each_of_its_traces() {
        let dir = names(&["audit.log", "audit-policy.yaml"]);
        let other_file = LogFile { ino: 78, len: 5000, ..FILE };
        let shorter = LogFile { len: 10, ..FILE };
        for (now, dir, trace) in [
            (other_file, dir.clone(), "another file"),
            (shorter, dir.clone(), "shrank"),
            (FILE, names(&["audit.log", "audit-2026-11-29T15-04-05.000.log"]), "audit-2026-11-29T15-04-05.000.log"),
            (
                FILE,
                names(&["audit-2026-11-29T15-04-05.000.log.gz", "audit.log"]),
                "audit-2026-11-29T15-04-05.000.log.gz",
            ),
        ] {
            let problem = audit_log_rotation(&FILE, &now, &dir);
            let problem = problem.unwrap_or_else(|| panic!("rotation ({trace}) not detected"));
            assert!(problem.contains(trace), "{problem}");
            assert!(problem.contains("--audit-log-maxsize"), "{problem}");
        }
    }
}
