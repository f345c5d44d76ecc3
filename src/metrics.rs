//! Prometheus metrics. Labels name kinds, objects, reasons and AWS error codes; never a
//! credential.
//!
//! The series of one credential (labels `kind`, `namespace`, `name`: Ready, Verified, its
//! conditions' reasons, its token's expiry and refresh time) exist while the controller
//! serves it, at most one per condition type, and go with it ([`Metrics::forget_credential`]):
//! their number follows the number of credentials, never the number of reconciles or reasons
//! seen.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError, atomic::AtomicU64},
};

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

/// One condition of a credential as it stands: `condition` is its type (`Ready`, `Degraded`,
/// `Verified`, `NamespacesSynced`), `status` `True`/`False`/`Unknown`, `reason` its reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub condition: String,
    pub status: String,
    pub reason: String,
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    /// `patched` (Secrets added), `unchanged`, or `invalid` (a request that is no Pod CREATE).
    pub result: String,
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
    /// When the controller fetches each credential's next token (`status.nextRefreshAt`).
    pub token_refresh: Family<ObjectLabels, Gauge<f64, AtomicU64>>,
    /// 1 when the credential's last registry check passed (Verified=True), 0 when it failed;
    /// no series while it is not checked.
    pub verified_credentials: Family<ObjectLabels, Gauge>,
    /// 1 for each condition of each credential, with its status and reason.
    conditions: Family<ConditionLabels, Gauge>,
    /// The condition series each credential has now, to replace and remove them.
    condition_series: Mutex<HashMap<ObjectLabels, Vec<ConditionLabels>>>,
    pub provider_calls: Family<ProviderLabels, Counter>,
    pub provider_failures: Family<ProviderFailureLabels, Counter>,
    /// 1 while this replica is the one that writes.
    pub leader: Gauge,
    /// Registry checks of credentials, by result.
    pub verifications: Family<VerifyLabels, Counter>,
    /// Pods the admission webhook answered for, by result.
    pub admissions: Family<AdmissionLabels, Counter>,
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
        let token_refresh = Family::<ObjectLabels, Gauge<f64, AtomicU64>>::default();
        let verified_credentials = Family::<ObjectLabels, Gauge>::default();
        let conditions = Family::<ConditionLabels, Gauge>::default();
        let provider_calls = Family::<ProviderLabels, Counter>::default();
        let provider_failures = Family::<ProviderFailureLabels, Counter>::default();
        let leader = Gauge::default();
        let verifications = Family::<VerifyLabels, Counter>::default();
        let admissions = Family::<AdmissionLabels, Counter>::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register("reconcile_failures", "Reconciles that failed, by reason", reconcile_failures.clone());
        registry.register("reconcile_duration_seconds", "Time a reconcile took", reconcile_duration.clone());
        registry.register("credential_ready", "1 when the credential's Secret is current", ready_credentials.clone());
        registry.register(
            "token_expiry_timestamp_seconds",
            "When the token in the credential's Secret expires (alert on time() + 3600 > this)",
            token_expiry.clone(),
        );
        registry.register(
            "token_refresh_timestamp_seconds",
            "When the controller fetches the credential's next token (status.nextRefreshAt); past it, a refresh is overdue",
            token_refresh.clone(),
        );
        registry.register(
            "credential_verified",
            "1 when the credential's last registry check passed, 0 when it failed (no series while unchecked)",
            verified_credentials.clone(),
        );
        registry.register(
            "credential_condition",
            "1 for each condition of the credential, with its status and reason",
            conditions.clone(),
        );
        registry.register("provider_calls", "Calls to credential providers", provider_calls.clone());
        registry.register("provider_failures", "Failed calls to credential providers", provider_failures.clone());
        registry.register("leader", "1 while this replica writes", leader.clone());
        registry.register(
            "verifications",
            "Checks of credentials against their registries, by result",
            verifications.clone(),
        );
        registry.register(
            "webhook_admissions",
            "Pods the admission webhook answered for, by result (patched, unchanged, invalid)",
            admissions.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_failures,
            reconcile_duration,
            ready_credentials,
            token_expiry,
            token_refresh,
            verified_credentials,
            conditions,
            condition_series: Mutex::default(),
            provider_calls,
            provider_failures,
            leader,
            verifications,
            admissions,
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

    /// Makes `conditions` (type, status, reason) the condition series of credential `object`:
    /// the series of a type that changed status or reason is replaced, that of a type no longer
    /// reported removed.
    pub fn set_conditions<'a>(
        &self,
        object: &ObjectLabels,
        conditions: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    ) {
        let next: Vec<ConditionLabels> = conditions
            .into_iter()
            .map(|(condition, status, reason)| ConditionLabels {
                kind: object.kind.clone(),
                namespace: object.namespace.clone(),
                name: object.name.clone(),
                condition: condition.into(),
                status: status.into(),
                reason: reason.into(),
            })
            .collect();
        let mut series = self.condition_series.lock().unwrap_or_else(PoisonError::into_inner);
        let previous = series.remove(object).unwrap_or_default();
        if previous == next {
            // The usual case: a reconcile that changed no condition.
            if !next.is_empty() {
                series.insert(object.clone(), next);
            }
            return;
        }
        for gone in previous.iter().filter(|p| !next.contains(p)) {
            self.conditions.remove(gone);
        }
        for current in &next {
            self.conditions.get_or_create(current).set(1);
        }
        if !next.is_empty() {
            series.insert(object.clone(), next);
        }
    }

    /// Removes every series of credential `object` (it was deleted, or left this controller).
    pub fn forget_credential(&self, object: &ObjectLabels) {
        self.ready_credentials.remove(object);
        self.token_expiry.remove(object);
        self.token_refresh.remove(object);
        self.verified_credentials.remove(object);
        self.set_conditions(object, []);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(name: &str) -> ObjectLabels {
        ObjectLabels { kind: "RegistryCredential".into(), namespace: "team-a".into(), name: name.into() }
    }

    /// The lines of the exposition that name credential `name`.
    fn series_of(metrics: &Metrics, name: &str) -> Vec<String> {
        let needle = format!("name=\"{name}\"");
        metrics.render().lines().filter(|l| l.contains(&needle)).map(str::to_string).collect()
    }

    /// A credential has one series per condition type, whatever reasons it went through, and
    /// none once it is forgotten: the number of series follows the credentials.
    #[test]
    fn condition_series_are_replaced_and_forgotten() {
        let metrics = Metrics::default();
        let pull = object("pull");
        metrics.set_conditions(&pull, [("Ready", "False", "SourceSecretNotFound")]);
        metrics.set_conditions(&pull, [("Ready", "False", "SourceKeyMissing"), ("Verified", "False", "Unauthorized")]);
        metrics.set_conditions(&pull, [("Ready", "True", "Synced"), ("Verified", "False", "Unauthorized")]);
        metrics.set_conditions(&object("other"), [("Ready", "True", "Synced")]);
        let mut lines = series_of(&metrics, "pull");
        lines.sort();
        assert_eq!(
            lines,
            [
                "regcred_credential_condition{kind=\"RegistryCredential\",namespace=\"team-a\",name=\"pull\",condition=\"Ready\",status=\"True\",reason=\"Synced\"} 1",
                "regcred_credential_condition{kind=\"RegistryCredential\",namespace=\"team-a\",name=\"pull\",condition=\"Verified\",status=\"False\",reason=\"Unauthorized\"} 1",
            ]
        );
        // Verification turned off: its condition, and its series, go.
        metrics.set_conditions(&pull, [("Ready", "True", "Synced")]);
        assert_eq!(series_of(&metrics, "pull").len(), 1, "{:?}", series_of(&metrics, "pull"));

        metrics.ready_credentials.get_or_create(&pull).set(1);
        metrics.verified_credentials.get_or_create(&pull).set(0);
        metrics.token_expiry.get_or_create(&pull).set(1_800_000_000.0);
        metrics.token_refresh.get_or_create(&pull).set(1_799_990_000.0);
        assert_eq!(series_of(&metrics, "pull").len(), 5, "{:?}", series_of(&metrics, "pull"));
        metrics.forget_credential(&pull);
        assert_eq!(series_of(&metrics, "pull"), Vec::<String>::new());
        assert_eq!(series_of(&metrics, "other").len(), 1, "another credential's series stay");
        assert!(metrics.condition_series.lock().unwrap().get(&pull).is_none(), "nothing kept for it");
    }

    /// The names the shipped alerting rules and dashboard query (charts/regcred/files).
    #[test]
    fn exposition_names_the_series_the_rules_use() {
        let metrics = Metrics::default();
        let pull = object("pull");
        metrics.ready_credentials.get_or_create(&pull).set(0);
        metrics.verified_credentials.get_or_create(&pull).set(1);
        metrics.token_expiry.get_or_create(&pull).set(1_800_000_000.0);
        metrics.token_refresh.get_or_create(&pull).set(1_799_990_000.0);
        metrics.set_conditions(&pull, [("Ready", "False", "SourceSecretNotFound")]);
        let text = metrics.render();
        for line in [
            "regcred_credential_ready{kind=\"RegistryCredential\",namespace=\"team-a\",name=\"pull\"} 0",
            "regcred_credential_verified{kind=\"RegistryCredential\",namespace=\"team-a\",name=\"pull\"} 1",
            "regcred_token_expiry_timestamp_seconds{kind=\"RegistryCredential\",namespace=\"team-a\",name=\"pull\"} 1800000000.0",
            "regcred_token_refresh_timestamp_seconds{kind=\"RegistryCredential\",namespace=\"team-a\",name=\"pull\"} 1799990000.0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in:\n{text}");
        }
    }
}
