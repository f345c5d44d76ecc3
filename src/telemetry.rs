//! What logging may show. Some dependencies log message bodies and signing material at their
//! most verbose level; those levels stay off whatever `RUST_LOG` asks, so that no level leaks
//! a secret.

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;

/// Targets that log secrets, and the most they may log (a target covers its modules and any
/// crate whose name it begins):
/// - `aws_smithy_runtime`: "read HTTP response body" at TRACE prints whole response bodies,
///   ECR's authorizationToken and STS's SecretAccessKey and SessionToken among them;
/// - `aws_sigv4`: the canonical request at TRACE holds the `x-amz-security-token` header of
///   temporary credentials (IRSA, assumed roles, the pod's own).
pub const CEILINGS: &[(&str, LevelFilter)] =
    &[("aws_smithy_runtime", LevelFilter::DEBUG), ("aws_sigv4", LevelFilter::DEBUG)];

/// A filter that enables everything except what [`CEILINGS`] forbids; it is combined with the
/// user's `RUST_LOG` filter, so both must let an event through.
pub fn ceiling() -> Targets {
    Targets::new().with_default(LevelFilter::TRACE).with_targets(CEILINGS.iter().copied())
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::*;

    #[test]
    fn secret_logging_targets_are_capped_and_the_rest_is_not() {
        let ceiling = ceiling();
        for target in [
            "aws_smithy_runtime::client::orchestrator::http",
            "aws_smithy_runtime_api::client",
            "aws_sigv4::http_request::sign",
        ] {
            assert!(!ceiling.would_enable(target, &Level::TRACE), "{target} at TRACE");
            assert!(ceiling.would_enable(target, &Level::DEBUG), "{target} at DEBUG");
        }
        for target in ["regcred::controller", "kube_client::client", "hyper_util::client", "aws_config::sts"] {
            assert!(ceiling.would_enable(target, &Level::TRACE), "{target} at TRACE");
        }
    }
}
