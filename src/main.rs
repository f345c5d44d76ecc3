//! The regcred binary: CLI parsing, logging, and the subcommands (`doctor` lives in the library, `regcred::doctor::cli`).

use std::{io::Write, path::PathBuf, sync::atomic::Ordering, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use regcred::{
    admin, controller, crd, leader,
    pacing::{PaceLayer, Pacing},
    render,
    shutdown::{self, Shutdown},
};
use tracing_subscriber::{EnvFilter, Layer, filter::FilterExt, fmt, layer::SubscriberExt, util::SubscriberInitExt};

#[derive(Parser)]
// A flag given twice takes its last value, as with most CLIs (wrappers append overrides).
#[command(version, args_override_self = true, about = "Keeps kubernetes.io/dockerconfigjson pull Secrets correct")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "REGCRED_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum CertificatesArg {
    #[value(name = "self")]
    SelfManaged,
    External,
}

#[derive(Clone, Copy, ValueEnum)]
enum AttachArg {
    ServiceAccounts,
    Pods,
    Both,
}

impl From<AttachArg> for regcred::crd::Attach {
    fn from(arg: AttachArg) -> Self {
        match arg {
            AttachArg::ServiceAccounts => Self::ServiceAccounts,
            AttachArg::Pods => Self::Pods,
            AttachArg::Both => Self::Both,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (kubeconfig from KUBECONFIG or ~/.kube/config, or in-cluster).
    Run(Box<RunArgs>),
    /// Print the CustomResourceDefinitions, or write them one file each into --dir.
    Crdgen {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Print the Secrets that RegistryCredential and ClusterRegistryCredential manifests would
    /// produce, without a cluster.
    Render(RenderArgs),
    /// Why can't a Pod pull? Checks a Pod, a workload's Pod template or an image against its
    /// pull Secrets by the kubelet's rules, with the user's kubeconfig.
    Doctor(regcred::doctor::cli::DoctorArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Reconcile every credential at least this often (Go duration, e.g. 15m).
    #[arg(long, default_value = "15m", env = "REGCRED_RESYNC_INTERVAL")]
    resync_interval: kube::core::Duration,
    /// Longest wait between retries of a failing credential.
    #[arg(long, default_value = "5m", env = "REGCRED_MAX_BACKOFF")]
    max_backoff: kube::core::Duration,
    /// Reconciles running at once.
    #[arg(long, default_value_t = 8, env = "REGCRED_CONCURRENCY")]
    concurrency: u16,
    /// Run only while holding a coordination.k8s.io Lease, so that of several replicas one
    /// writes (the Helm chart turns this on).
    #[arg(long, env = "REGCRED_LEADER_ELECT")]
    leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(long, default_value = "regcred-leader", env = "REGCRED_LEADER_ELECTION_LEASE")]
    leader_election_lease: String,
    /// Namespace of the leader Lease (default: the pod's namespace, else `default`).
    #[arg(long, env = "POD_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// How long a leader holds the Lease without renewing it; a standby takes over after it.
    #[arg(long, default_value = "15s", env = "REGCRED_LEADER_ELECTION_DURATION")]
    leader_election_duration: kube::core::Duration,
    /// Address of the admin endpoint (/metrics, /healthz, /readyz).
    #[arg(long, default_value = "0.0.0.0:8080", env = "REGCRED_ADMIN_ADDR")]
    admin_addr: std::net::SocketAddr,
    /// Name of this replica in Events (set to the pod name by the Helm chart).
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
    /// Serve the Pod admission webhook (HTTPS, path /mutate-pods) on this address, on every
    /// replica, leader or standby. Off when not given.
    #[arg(long, env = "REGCRED_WEBHOOK_ADDR")]
    webhook_addr: Option<std::net::SocketAddr>,
    /// The MutatingWebhookConfiguration whose caBundle the controller keeps (self-managed
    /// certificates).
    #[arg(long, default_value = "regcred", env = "REGCRED_WEBHOOK_CONFIGURATION")]
    webhook_configuration: String,
    /// The TLS Secret (in the controller's namespace) with the webhook's serving certificate.
    #[arg(long, default_value = "regcred-webhook-tls", env = "REGCRED_WEBHOOK_SECRET")]
    webhook_secret: String,
    /// Namespace of that Secret, also never mutated (default: the pod's namespace, else
    /// `default`).
    #[arg(long, env = "REGCRED_WEBHOOK_NAMESPACE")]
    webhook_namespace: Option<String>,
    /// Who issues the serving certificate: `self` (the controller: its own CA, rotated with
    /// overlap, injected into the configuration) or `external` (cert-manager writes the Secret).
    #[arg(long, value_enum, default_value_t = CertificatesArg::SelfManaged, env = "REGCRED_WEBHOOK_CERTIFICATES")]
    webhook_certificates: CertificatesArg,
    /// Names (or IP addresses) the self-managed serving certificate is for, e.g. the Service's
    /// `regcred-webhook.regcred-system.svc`.
    #[arg(long, value_delimiter = ',', env = "REGCRED_WEBHOOK_HOSTS")]
    webhook_hosts: Vec<String>,
    /// Lifetime of a self-managed serving certificate; renewed with a third of it left.
    #[arg(long, default_value = "2160h", env = "REGCRED_WEBHOOK_CERT_VALIDITY")]
    webhook_cert_validity: kube::core::Duration,
    /// Lifetime of the self-managed CA; a new one joins the bundle with a third of it left.
    #[arg(long, default_value = "87600h", env = "REGCRED_WEBHOOK_CA_VALIDITY")]
    webhook_ca_validity: kube::core::Duration,
    /// How credentials that do not set `spec.attach` reach Pods: `service-accounts` (their
    /// `serviceAccounts`), `pods` (the webhook) or `both`. Default: `both` with the webhook,
    /// `service-accounts` without.
    #[arg(long, value_enum, env = "REGCRED_ATTACH")]
    attach: Option<AttachArg>,
    /// Let namespaced RegistryCredentials use the controller's own AWS identity (off: a
    /// tenant must not borrow it).
    #[arg(long, env = "REGCRED_ALLOW_AMBIENT_AWS_IDENTITY")]
    allow_ambient_aws_identity: bool,
    /// Refresh an ECR token when this share of its lifetime is left (0.25: ~9 h into 12 h).
    #[arg(long, default_value_t = 0.25, value_parser = share, env = "REGCRED_ECR_REFRESH_SHARE")]
    ecr_refresh_share: f64,
    /// Reconcile only credentials of both kinds, RegistryCredentials and
    /// ClusterRegistryCredentials, matching this label selector (e.g. to shard or canary
    /// controllers). A credential relabelled out of the selection gets its ServiceAccount
    /// entries and finalizer removed (its Secrets stay, owned by it).
    #[arg(long, env = "REGCRED_SELECTOR")]
    selector: Option<String>,
    /// Do not watch Secrets (where RBAC grants no cluster-wide list/watch on them): drift,
    /// deletion and source changes are then repaired at the next resync only.
    #[arg(long, env = "REGCRED_NO_SECRET_WATCH")]
    no_secret_watch: bool,
    /// Never request ServiceAccount tokens (where the install grants no
    /// `serviceaccounts/token`): IRSA credentials then report `IrsaDisabled`.
    #[arg(long, env = "REGCRED_DISABLE_IRSA")]
    disable_irsa: bool,
    /// Watch and write only these namespaces (comma-separated), where RBAC grants Secrets and
    /// ServiceAccounts through Roles in them alone; every namespace when unset.
    #[arg(long, value_delimiter = ',', value_parser = namespace_name, env = "REGCRED_NAMESPACES")]
    namespaces: Vec<String>,
    /// Verify every credential against its registry (the Verified condition), not only those
    /// with spec.verify.
    #[arg(long, env = "REGCRED_VERIFY_DEFAULT")]
    verify_default: bool,
    /// Check each verified credential again after this long (minus up to 10 % jitter), and
    /// after every change of its Secret's content.
    #[arg(long, default_value = "6h", env = "REGCRED_VERIFY_INTERVAL")]
    verify_interval: kube::core::Duration,
    /// Writes (creates, applies, patches, deletes) sent to the apiserver per second, across
    /// all credentials, so a rotation of many Secrets does not crowd out other clients; 0: as
    /// fast as `--concurrency` allows. Reads and watches are not paced.
    #[arg(long, default_value_t = 0.0, value_parser = not_negative, env = "REGCRED_WRITE_QPS")]
    write_qps: f64,
    /// Writes sent at once after a quiet spell, with `--write-qps`.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..), env = "REGCRED_WRITE_BURST")]
    write_burst: u32,
    /// Registry checks started per second, across all credentials.
    #[arg(long, default_value_t = 5.0, value_parser = positive, env = "REGCRED_VERIFY_QPS")]
    verify_qps: f64,
    /// Registry host suffixes checks may connect to, registries and their token realms alike
    /// (`azurecr.io` allows it and every host under it); empty: any host.
    #[arg(long, value_delimiter = ',', env = "REGCRED_VERIFY_ALLOWED_HOSTS")]
    verify_allowed_hosts: Vec<String>,
    /// Let RegistryCredentials' checks reach private, loopback and link-local addresses and
    /// speak plain HTTP (`spec.verify.insecure`); without it only ClusterRegistryCredentials'
    /// checks may.
    #[arg(long, env = "REGCRED_VERIFY_PRIVATE_NETWORKS")]
    verify_private_networks: bool,
    /// AWS endpoint for ECR and STS (an emulator, a VPC endpoint). AWS_ENDPOINT_URL_* work too.
    #[arg(long, env = "REGCRED_AWS_ENDPOINT_URL")]
    aws_endpoint_url: Option<String>,
    /// Let namespaced RegistryCredentials use the controller's own Google identity (GKE
    /// Workload Identity or the node's service account; off: a tenant must not borrow it).
    #[arg(long, env = "REGCRED_ALLOW_AMBIENT_GCP_IDENTITY")]
    allow_ambient_gcp_identity: bool,
    /// Refresh a Google access token when this share of its lifetime is left (0.25: ~45 min
    /// into an hour).
    #[arg(long, default_value_t = 0.25, value_parser = share, env = "REGCRED_GCP_REFRESH_SHARE")]
    gcp_refresh_share: f64,
    /// Google STS token endpoint (Workload Identity Federation).
    #[arg(long, default_value = "https://sts.googleapis.com/v1/token", env = "REGCRED_GCP_STS_URL")]
    gcp_sts_url: String,
    /// IAM Credentials endpoint (impersonation).
    #[arg(long, default_value = "https://iamcredentials.googleapis.com", env = "REGCRED_GCP_IAM_CREDENTIALS_URL")]
    gcp_iam_credentials_url: String,
    /// The metadata server, host[:port], for `gcr.ambient`.
    #[arg(long, default_value = "metadata.google.internal", env = "GCE_METADATA_HOST")]
    gcp_metadata_host: String,
    /// A token endpoint a key's token_uri may name besides Google's (a private endpoint, an
    /// emulator); repeatable or comma-separated. Others are refused: the controller would
    /// post wherever a tenant's key file says.
    #[arg(long, value_delimiter = ',', env = "REGCRED_GCP_TOKEN_URIS")]
    gcp_token_uri: Vec<String>,
    /// Let namespaced RegistryCredentials use the controller's own Azure managed identity
    /// (`acr.ambient`; off: a tenant must not borrow it).
    #[arg(long, env = "REGCRED_ALLOW_AMBIENT_AZURE_IDENTITY")]
    allow_ambient_azure_identity: bool,
    /// Refresh an ACR refresh token when this share of its lifetime is left (0.25: ~2 h 15 min
    /// into 3 h).
    #[arg(long, default_value_t = 0.25, value_parser = share, env = "REGCRED_AZURE_REFRESH_SHARE")]
    azure_refresh_share: f64,
    /// Registry host suffixes Azure tokens may be sent to (comma-separated; `.azurecr.io`
    /// allows every host under it). An acr source naming another host is refused.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = ".azurecr.io,.azurecr.cn,.azurecr.us",
        env = "REGCRED_ACR_REGISTRY_SUFFIXES"
    )]
    acr_registry_suffixes: Vec<String>,
    /// A Microsoft Entra authority (`https://host[:port]`) acr sources may name in
    /// `authorityHost` besides the public and sovereign clouds' (an air-gapped cloud, an
    /// emulator); repeatable or comma-separated.
    #[arg(long, value_delimiter = ',', env = "REGCRED_AZURE_AUTHORITY_HOSTS")]
    azure_authority_host: Vec<String>,
    /// The Azure instance metadata service, for `acr.ambient`.
    #[arg(long, default_value = "http://169.254.169.254", env = "REGCRED_AZURE_IMDS_ENDPOINT")]
    azure_imds_endpoint: String,
}

fn share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v > 0.0 && v < 1.0 => Ok(v),
        _ => Err("a number between 0 and 1 (exclusive)".into()),
    }
}

fn not_negative(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v >= 0.0 && v.is_finite() => Ok(v),
        _ => Err("a number, 0 or more".into()),
    }
}

fn positive(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err("a positive number".into()),
    }
}

/// A DNS-1123 label, as namespace names are: a typo fails at start instead of watching nothing.
fn namespace_name(text: &str) -> Result<String, String> {
    let valid = !text.is_empty()
        && text.len() <= 63
        && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-');
    match valid {
        true => Ok(text.to_string()),
        false => Err("a namespace name (lowercase letters, digits and '-', at most 63)".into()),
    }
}

#[derive(clap::Args)]
struct RenderArgs {
    /// Manifest files (YAML or JSON, several documents each); `-` reads standard input.
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// Namespace for manifests that name none: the first one given (default `default`).
    /// Repeatable: ClusterRegistryCredentials render into each one given that their selection
    /// picks (as a namespace without labels), besides the Namespace manifests in the input.
    #[arg(short = 'n', long = "namespace", value_name = "NAMESPACE")]
    namespaces: Vec<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Yaml)]
    output: Output,
    /// Also prove each credential against its registries, as the controller's Verified
    /// condition does (spec.verify's repository, reference and insecure apply): one line per
    /// registry on standard error; exit status 3 when any check fails.
    #[arg(long)]
    verify: bool,
    /// PEM CA certificates for --verify, besides the system's (the caBundle a cluster would
    /// read from a ConfigMap or Secret).
    #[arg(long, value_name = "FILE", requires = "verify")]
    ca_file: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Yaml,
    Json,
}

fn main() -> anyhow::Result<()> {
    limit_malloc_arenas();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(cli_main());
    // Dropping the runtime would wait for every blocking task (a hung DNS lookup, say).
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// glibc gives each thread that meets contention its own malloc arena and keeps freed memory in
/// it: measured at 1,000 namespaces, that was a third of the controller's RSS (46 MiB with the
/// default, 31 MiB with one arena). With two arenas the second one's retention made RSS step
/// up by about 7 MiB in an arbitrary round of repeated fan-outs (`cargo bench --bench core`:
/// 25.7 → 33.3 MiB); one arena stayed flat (25.4, then 26.6–26.9 MiB). The controller's
/// allocations are few and small next to its network waits, so one arena costs no measurable
/// time there. Set before the runtime starts its threads; `MALLOC_ARENA_MAX` still wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes allocator tuning; no other thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

async fn cli_main() -> anyhow::Result<()> {
    let cli = parse_cli();
    init_logging(cli.log_format);
    match cli.command {
        Command::Run(args) => {
            // First of all, so that no SIGTERM goes unheard, whatever blocks later.
            let shutdown = Shutdown::listen().context("listening for SIGTERM")?;
            let stop = shutdown.clone().requested();
            match shutdown::bounded(run(*args, shutdown), stop, STOP_LIMIT, || false).await {
                Some(result) => result,
                None => {
                    tracing::warn!(limit = ?STOP_LIMIT, "still stopping after SIGTERM; exiting anyway");
                    Ok(())
                }
            }
        }
        Command::Crdgen { dir } => crdgen(dir),
        Command::Render(args) => render_manifests(args).await,
        Command::Doctor(args) => {
            let status = regcred::doctor::cli::main(args).await;
            std::io::stdout().flush()?;
            std::process::exit(status)
        }
    }
}

/// The command line; as `kubectl-regcred` (a kubectl plugin: `ln -s regcred kubectl-regcred`
/// somewhere on PATH), help and errors name it `kubectl regcred`.
fn parse_cli() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let plugin = std::path::Path::new(&argv0).file_name().is_some_and(|name| name == "kubectl-regcred");
    let command = if plugin { Cli::command().bin_name("kubectl regcred") } else { Cli::command() };
    Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit())
}

/// How long the reconciles in flight may take to finish once the controller is told to stop.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// How long the process may take to stop after SIGTERM, whatever it is doing (the drain, then
/// the release of the Lease): kubelet's grace period is 30 s by default.
const STOP_LIMIT: Duration = Duration::from_secs(8);

async fn run(args: RunArgs, shutdown: Shutdown) -> anyhow::Result<()> {
    let kube_config = kube::Config::infer().await.context("no Kubernetes client configuration")?;
    // The Lease's own client; the controller's writes go through the leader's write gate
    // (checked as each is sent), after waiting for their slot with --write-qps.
    let lease_client = kube::Client::try_from(kube_config.clone()).context("building the Kubernetes client")?;
    let gate = leader::WriteGate::default();
    let builder = kube::client::ClientBuilder::try_from(kube_config).context("building the Kubernetes client")?;
    let pacing = (args.write_qps > 0.0).then_some(Pacing { per_second: args.write_qps, burst: args.write_burst });
    let buffered = tower::buffer::BufferLayer::new(1024);
    let client = match (args.leader_elect, pacing) {
        (true, Some(pacing)) => {
            builder.with_layer(&gate.layer()).with_layer(&buffered).with_layer(&PaceLayer::new(pacing)).build()
        }
        (true, None) => builder.with_layer(&gate.layer()).build(),
        (false, Some(pacing)) => builder.with_layer(&buffered).with_layer(&PaceLayer::new(pacing)).build(),
        (false, None) => lease_client.clone(),
    };
    let attach = args.attach.map(Into::into).unwrap_or(match args.webhook_addr {
        Some(_) => regcred::crd::Attach::Both,
        None => regcred::crd::Attach::ServiceAccounts,
    });
    let webhook = webhook_config(&args, attach);
    let config = controller::ControllerConfig {
        attach,
        resync_interval: args.resync_interval.into(),
        max_backoff: args.max_backoff.into(),
        concurrency: args.concurrency,
        instance: args.instance,
        ecr: regcred::source::ecr::EcrSettings {
            allow_ambient_for_namespaced: args.allow_ambient_aws_identity,
            refresh_share_left: args.ecr_refresh_share,
            endpoint_url: args.aws_endpoint_url,
            irsa: !args.disable_irsa,
        },
        gcp: regcred::source::gcr::GcpSettings {
            allow_ambient_for_namespaced: args.allow_ambient_gcp_identity,
            refresh_share_left: args.gcp_refresh_share,
            service_account_tokens: !args.disable_irsa,
            sts_url: args.gcp_sts_url,
            iam_credentials_url: args.gcp_iam_credentials_url,
            metadata_host: args.gcp_metadata_host,
            extra_token_uris: args.gcp_token_uri,
        },
        azure: regcred::source::acr::AzureSettings {
            allow_ambient_for_namespaced: args.allow_ambient_azure_identity,
            refresh_share_left: args.azure_refresh_share,
            service_account_tokens: !args.disable_irsa,
            registry_suffixes: args.acr_registry_suffixes.into_iter().filter(|s| !s.trim().is_empty()).collect(),
            extra_authorities: args.azure_authority_host,
            imds_endpoint: args.azure_imds_endpoint,
        },
        selector: args.selector,
        watch_secrets: !args.no_secret_watch,
        namespaces: (!args.namespaces.is_empty()).then(|| args.namespaces.into_iter().collect()),
        verify: regcred::verify::VerifySettings {
            default_on: args.verify_default,
            interval: args.verify_interval.into(),
            qps: args.verify_qps,
            allowed_hosts: args.verify_allowed_hosts,
            private_networks: args.verify_private_networks,
        },
    };
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "starting controller");
    let admin = admin::AdminState { metrics: Default::default(), ready: Default::default() };
    let listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding the admin endpoint to {}", args.admin_addr))?;
    tokio::spawn(admin::serve(listener, admin.clone()));
    if let (Some(addr), Some(webhook)) = (args.webhook_addr, webhook) {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the webhook endpoint to {addr}"))?;
        let addr = listener.local_addr().context("the webhook endpoint's address")?;
        tracing::info!(%addr, "admission webhook listening");
        let (client, metrics) = (lease_client.clone(), admin.metrics.clone());
        tokio::spawn(regcred::webhook::run(client, listener, webhook, metrics, shutdown.clone().requested()));
    }
    if !args.leader_elect {
        admin.metrics.leader.set(1);
        run_controller(client, config, admin, shutdown.requested()).await;
        return Ok(());
    }
    let duration: Duration = args.leader_election_duration.into();
    let settings = leader::LeaseSettings {
        name: args.leader_election_lease,
        namespace: args.leader_election_namespace.unwrap_or_else(|| "default".into()),
        identity: config.instance.clone().unwrap_or_else(|| format!("regcred-{}", std::process::id())),
        duration_secs: duration.as_secs().max(2),
        grace_secs: (duration.as_secs() / 3).max(1),
    };
    let mut lease = tokio::select! {
        lease = leader::Lease::start_retrying(lease_client, &settings, gate) => lease,
        () = shutdown.clone().requested() => return Ok(()),
    };
    // A standby is ready: it serves its purpose by competing for the Lease. Were it
    // unready, a rolling update (maxUnavailable 0) and the PodDisruptionBudget would
    // wait forever for pods that only become ready on taking the Lease.
    admin.ready.store(true, Ordering::Relaxed);
    tokio::select! {
        _ = lease.acquired() => {}
        () = shutdown.clone().requested() => {
            lease.release().await;
            return Ok(());
        }
    }
    tracing::info!(lease = %settings.name, identity = %settings.identity, "became the leader");
    admin.metrics.leader.set(1);
    // The leader is ready again once its caches have synced (controller::run says so).
    admin.ready.store(false, Ordering::Relaxed);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let leader_gauge = admin.metrics.leader.clone();
    let watcher = tokio::spawn(async move {
        let lost = tokio::select! {
            _ = lease.lost() => true,
            () = shutdown.requested() => false,
        };
        if lost {
            // Its writes stopped already (the write gate closed): it says so at once, not
            // after the drain.
            leader_gauge.set(0);
            tracing::warn!("lost the leader Lease: no more writes; stopping");
        }
        let _ = stop_tx.send(());
        (lost, lease)
    });
    run_controller(client, config, admin.clone(), async move {
        let _ = stop_rx.await;
    })
    .await;
    admin.metrics.leader.set(0);
    let (lost, lease) = watcher.await.context("leader watcher")?;
    lease.release().await;
    if lost {
        // Exit so the process restarts with fresh caches and competes again.
        anyhow::bail!("lost the leader Lease");
    }
    Ok(())
}

/// The webhook's settings, when it is on.
fn webhook_config(args: &RunArgs, attach: regcred::crd::Attach) -> Option<regcred::webhook::WebhookConfig> {
    use regcred::webhook::certs::{CertMode, CertSettings};
    args.webhook_addr?;
    let namespace = args.webhook_namespace.clone().or_else(|| args.leader_election_namespace.clone());
    let namespace = namespace.unwrap_or_else(|| "default".into());
    let certs = CertSettings {
        mode: match args.webhook_certificates {
            CertificatesArg::SelfManaged => CertMode::SelfManaged,
            CertificatesArg::External => CertMode::External,
        },
        namespace: namespace.clone(),
        secret: args.webhook_secret.clone(),
        configuration: args.webhook_configuration.clone(),
        hosts: args.webhook_hosts.iter().map(|h| h.trim().to_string()).filter(|h| !h.is_empty()).collect(),
        leaf_validity: args.webhook_cert_validity.into(),
        ca_validity: args.webhook_ca_validity.into(),
    };
    Some(regcred::webhook::WebhookConfig {
        certs,
        served: (!args.namespaces.is_empty()).then(|| args.namespaces.iter().cloned().collect()),
        selector: args.selector.clone(),
        attach,
        excluded: vec!["kube-system".into(), namespace],
    })
}

/// [`controller::run`] until `stop`, then waits at most [`DRAIN_LIMIT`] for the reconciles in
/// flight, and not at all before the caches have synced: no reconcile runs before that, and
/// kube's `Controller` would wait for a sync that an unreachable apiserver never allows.
async fn run_controller<F>(
    client: kube::Client,
    config: controller::ControllerConfig,
    admin: admin::AdminState,
    stop: F,
) where
    F: Future<Output = ()> + Send + Sync + 'static,
{
    let stop = futures::FutureExt::shared(stop);
    let synced = admin.ready.clone();
    let work = controller::run(client, config, admin, stop.clone());
    if shutdown::bounded(work, stop, DRAIN_LIMIT, || !synced.load(Ordering::Relaxed)).await.is_none() {
        tracing::warn!(limit = ?DRAIN_LIMIT, "stopped without waiting for the controller to finish");
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // RUST_LOG decides, within the ceiling that keeps secret-logging levels off.
    let filter = filter.and(regcred::telemetry::ceiling());
    let layer = fmt::layer().with_writer(std::io::stderr);
    let layer = match format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer.json().flatten_event(true).boxed(),
    };
    tracing_subscriber::registry().with(layer.with_filter(filter)).init();
}

fn crdgen(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    for crd in crd::crds() {
        let yaml = crd::crd_yaml(&crd)?;
        match &dir {
            Some(dir) => std::fs::write(dir.join(crd::crd_file_name(&crd)), yaml)?,
            None => write!(stdout, "---\n{yaml}")?,
        }
    }
    Ok(())
}

async fn render_manifests(args: RenderArgs) -> anyhow::Result<()> {
    let mut documents = Vec::new();
    for file in &args.files {
        let text = if file.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())?
        } else {
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
        };
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)
            .map_err(|e| anyhow::anyhow!("{}: not valid YAML: {e}", file.display()))?;
        documents.extend(docs.into_iter().filter(|d| !d.is_null()));
    }
    let manifests = render::read_manifests(documents, &args.namespaces)?;
    let render::Rendered { secrets, notes, logins } = render::render(&manifests).await?;
    // Standard output is where the rendered Secrets go out: only now is the data plain bytes.
    let rendered: Vec<_> = secrets.iter().map(regcred::secret::DesiredSecret::to_secret).collect();
    for note in notes {
        eprintln!("note: {note}");
    }
    let mut stdout = std::io::stdout().lock();
    match args.output {
        Output::Yaml => {
            for secret in &rendered {
                write!(stdout, "---\n{}", serde_saphyr::to_string(secret)?)?;
            }
        }
        Output::Json if rendered.len() == 1 => writeln!(stdout, "{}", serde_json::to_string_pretty(&rendered[0])?)?,
        Output::Json => {
            let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": rendered});
            writeln!(stdout, "{}", serde_json::to_string_pretty(&list)?)?;
        }
    }
    drop(stdout);
    if args.verify {
        let ca_bundle = match &args.ca_file {
            Some(path) => Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?),
            None => None,
        };
        if !verify_rendered(&logins, ca_bundle).await {
            std::io::stdout().flush()?;
            std::process::exit(3);
        }
    }
    Ok(())
}

/// `render --verify`: one line per credential and registry on standard error; false when any
/// check failed.
async fn verify_rendered(
    logins: &[(String, Vec<regcred::dockerconfig::RegistryAuth>, Option<regcred::crd::VerifySpec>)],
    ca_bundle: Option<Vec<u8>>,
) -> bool {
    use regcred::verify::{Options, Reason, Verifier, VerifySettings};
    // Offline and interactive: no rate to keep.
    let verifier = Verifier::new(VerifySettings { qps: 1000.0, ..Default::default() });
    let mut all_verified = true;
    for (credential, auths, spec) in logins {
        let options = Options::from_spec(&spec.clone().unwrap_or_default(), ca_bundle.clone());
        match verifier.check_each(auths, &options).await {
            Ok(findings) => {
                for (host, finding) in findings {
                    all_verified &= finding.reason == Reason::Verified;
                    eprintln!("verify: {credential}: {host}: {}: {}", finding.reason.as_str(), finding.message);
                }
            }
            Err(problem) => {
                all_verified = false;
                eprintln!("verify: {credential}: {}: {problem}", Reason::CaBundleUnavailable.as_str());
            }
        }
    }
    all_verified
}
