//! Prometheus metrics. Labels name kinds, objects, reasons and AWS error codes; never a
//! credential.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerifyLabels {
    /// `Verified` or the failure's reason (`Unauthorized`, `Unreachable`, …).
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub kind: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: String,
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderFailureLabels {
    pub provider: String,
    pub operation: String,
    pub code: String,
}

/// Every metric the controller exports.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<KindLabels, Counter>,
    pub reconcile_failures: Family<FailureLabels, Counter>,
    pub reconcile_duration: Family<KindLabels, Histogram>,
    /// Credentials whose Secret holds the current credential (Ready=True).
    pub ready_credentials: Family<ObjectLabels, Gauge>,
    /// Expiry of the token in each credential's Secret, as a Unix timestamp.
    pub token_expiry: Family<ObjectLabels, Gauge<f64, AtomicU64>>,
    pub provider_calls: Family<ProviderLabels, Counter>,
    pub provider_failures: Family<ProviderFailureLabels, Counter>,
    /// 1 while this replica is the one that writes.
    pub leader: Gauge,
    /// Registry checks of credentials, by result.
    pub verifications: Family<VerifyLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("regcred");
        let reconciles = Family::<KindLabels, Counter>::default();
        let reconcile_failures = Family::<FailureLabels, Counter>::default();
        let reconcile_duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
        });
        let ready_credentials = Family::<ObjectLabels, Gauge>::default();
        let token_expiry = Family::<ObjectLabels, Gauge<f64, AtomicU64>>::default();
        let provider_calls = Family::<ProviderLabels, Counter>::default();
        let provider_failures = Family::<ProviderFailureLabels, Counter>::default();
        let leader = Gauge::default();
        let verifications = Family::<VerifyLabels, Counter>::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register("reconcile_failures", "Reconciles that failed, by reason", reconcile_failures.clone());
        registry.register("reconcile_duration_seconds", "Time a reconcile took", reconcile_duration.clone());
        registry.register("credential_ready", "1 when the credential's Secret is current", ready_credentials.clone());
        registry.register(
            "token_expiry_timestamp_seconds",
            "When the token in the credential's Secret expires (alert on time() + 3600 > this)",
            token_expiry.clone(),
        );
        registry.register("provider_calls", "Calls to credential providers", provider_calls.clone());
        registry.register("provider_failures", "Failed calls to credential providers", provider_failures.clone());
        registry.register("leader", "1 while this replica writes", leader.clone());
        registry.register(
            "verifications",
            "Checks of credentials against their registries, by result",
            verifications.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_failures,
            reconcile_duration,
            ready_credentials,
            token_expiry,
            provider_calls,
            provider_failures,
            leader,
            verifications,
        }
    }
}

impl Metrics {
    /// Counts a call to a credential provider, named `service:Operation` (e.g.
    /// `ecr:GetAuthorizationToken`, `sts:token`), and its failure code if it failed (`None`
    /// when the answer was unusable).
    pub fn provider_call(&self, operation: &str, failed: Option<Option<&str>>) {
        let (provider, operation) = operation.split_once(':').unwrap_or(("", operation));
        let labels = ProviderLabels { provider: provider.into(), operation: operation.into() };
        self.provider_calls.get_or_create(&labels).inc();
        if let Some(code) = failed {
            let code = code.unwrap_or("InvalidAnswer").to_string();
            let labels = ProviderFailureLabels { provider: labels.provider, operation: labels.operation, code };
            self.provider_failures.get_or_create(&labels).inc();
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
