//! The `regcred doctor` command line (also `kubectl regcred doctor`): its arguments, the
//! user's kubeconfig, the output and the exit status.

use clap::{Args, Subcommand, ValueEnum};

use super::{Request, Target, WorkloadKind, probe::ProbeOptions, render};

#[derive(Args, Debug)]
pub struct DoctorArgs {
    #[command(subcommand)]
    pub what: What,
    /// Namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Text, global = true)]
    pub output: Format,
    /// Also try the matching login at the registry: a manifest HEAD of the image's
    /// repository and reference, as a pull starts.
    #[arg(long, global = true)]
    pub verify: bool,
    /// With --verify: speak plain HTTP to the registry (otherwise only where the managing
    /// credential's spec.verify.insecure says so).
    #[arg(long, global = true)]
    pub plain_http: bool,
    /// With --verify: PEM CA certificates to trust besides the system's.
    #[arg(long, value_name = "FILE", global = true)]
    pub ca_file: Option<std::path::PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum What {
    /// A Pod: its containers' images and the pull Secrets it has.
    Pod { name: String },
    /// A Deployment's Pod template, with what its ServiceAccount would add.
    Deployment { name: String },
    /// A StatefulSet's Pod template.
    Statefulset { name: String },
    /// A DaemonSet's Pod template.
    Daemonset { name: String },
    /// A Job's Pod template.
    Job { name: String },
    /// A CronJob's Pod template.
    Cronjob { name: String },
    /// An image, pulled by a Pod with no imagePullSecrets of its own running as
    /// --service-account.
    Image {
        image: String,
        /// The ServiceAccount the Pod would run as.
        #[arg(long, default_value = "default")]
        service_account: String,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

impl What {
    fn target(self) -> Target {
        let workload = |kind, name| Target::Workload(kind, name);
        match self {
            What::Pod { name } => Target::Pod(name),
            What::Deployment { name } => workload(WorkloadKind::Deployment, name),
            What::Statefulset { name } => workload(WorkloadKind::StatefulSet, name),
            What::Daemonset { name } => workload(WorkloadKind::DaemonSet, name),
            What::Job { name } => workload(WorkloadKind::Job, name),
            What::Cronjob { name } => workload(WorkloadKind::CronJob, name),
            What::Image { image, service_account } => Target::Image { image, service_account },
        }
    }
}

/// Exit status: every image has a matching credential (and, with --verify, the registry
/// accepts it).
pub const EXIT_OK: i32 = 0;
/// Some image has none, or the registry refused it.
pub const EXIT_FAILING: i32 = 1;
/// The subject could not be read at all.
pub const EXIT_ERROR: i32 = 2;

/// Runs the command with the user's kubeconfig; prints the report on standard output and
/// returns the exit status.
pub async fn main(args: DoctorArgs) -> i32 {
    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(e) => {
            eprintln!("error: no Kubernetes client configuration: {e}");
            return EXIT_ERROR;
        }
    };
    let namespace = args.namespace.unwrap_or_else(|| client.default_namespace().to_string());
    let ca_bundle = match &args.ca_file {
        Some(path) => match std::fs::read(path) {
            Ok(pem) => Some(pem),
            Err(e) => {
                eprintln!("error: reading {}: {e}", path.display());
                return EXIT_ERROR;
            }
        },
        None => None,
    };
    let verify = args.verify.then_some(ProbeOptions { plain_http: args.plain_http, ca_bundle });
    let request = Request { namespace, target: args.what.target(), verify };
    match super::run(&client, &request).await {
        Ok(report) => {
            let shown = match args.output {
                Format::Text => render::text(&report),
                Format::Json => render::json(&report) + "\n",
            };
            print!("{shown}");
            if report.ok { EXIT_OK } else { EXIT_FAILING }
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_ERROR
        }
    }
}
