//! When a reconcile has written a credential's logins, starts the registry check if its
//! logins or `spec.verify` changed or it is due, in the background: a slow registry never
//! holds up a reconcile. When the check ends, its result goes into the credential's state and
//! the credential is reconciled again, which writes it into status (one status writer).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, ResourceExt};

use super::{Context, credential::Credential, fan_out::FanOut};
use crate::{
    crd::{CaBundle, VerifySpec},
    metrics::VerifyLabels,
    source::resolve_reference,
    verify::{self, Options, Reason, Verification},
};

/// The key a CA bundle is read from when its reference names none.
const DEFAULT_CA_KEY: &str = "ca.crt";

/// `spec.verify`, or the default one with `--verify-default`; `None`: verification is off.
pub(super) fn spec<K: Credential>(obj: &K, ctx: &Context) -> Option<VerifySpec> {
    obj.parts().verify.cloned().or_else(|| ctx.verifier.settings().default_on.then(VerifySpec::default))
}

/// Starts a check if one is needed; returns how long until the next periodic one, if any.
pub(super) fn schedule<K: Credential>(obj: &K, uid: &str, ctx: &Arc<Context>, done: &FanOut) -> Option<Duration> {
    let Some(spec) = spec(obj, ctx) else {
        ctx.states.with(uid, |s| s.verification = Default::default());
        return None;
    };
    let spec_text = serde_json::to_string(&spec).unwrap_or_default();
    let fingerprint = verify::fingerprint(&done.config_hash, &spec_text);
    let now = Instant::now();
    let start = ctx.states.with(uid, |s| {
        let start = verify::should_check(&s.verification, &fingerprint, now);
        if start {
            s.verification.running = true;
            s.verification.checked = Some(fingerprint);
        }
        start
    });
    if start {
        let own_namespace = obj.namespace();
        let (ctx, uid, logins, trigger) = (ctx.clone(), uid.to_string(), done.logins.clone(), obj.trigger());
        tokio::spawn(async move {
            let result = match options(&ctx, &spec, own_namespace.as_deref()).await {
                Ok(options) => ctx.verifier.verify(&logins, &options).await,
                Err(problem) => Verification {
                    reason: Reason::CaBundleUnavailable,
                    message: problem,
                    at: k8s_openapi::jiff::Timestamp::now(),
                },
            };
            ctx.metrics.verifications.get_or_create(&VerifyLabels { result: result.reason.as_str().into() }).inc();
            if !ctx.index.contains(&uid) {
                return; // deleted meanwhile: nothing to keep or report
            }
            let due = ctx.verifier.next_due(Instant::now());
            ctx.states.with(&uid, |s| {
                s.verification.running = false;
                s.verification.result = Some(result);
                s.verification.due = Some(due);
            });
            ctx.retrigger.send(trigger);
        });
    }
    ctx.states.with(uid, |s| s.verification.due).map(|due| due.saturating_duration_since(now))
}

/// What the check needs from `spec.verify`, with the CA bundle read now.
async fn options(ctx: &Context, spec: &VerifySpec, own_namespace: Option<&str>) -> Result<Options, String> {
    let ca_bundle = match &spec.ca_bundle {
        Some(bundle) => Some(read_ca_bundle(ctx, bundle, own_namespace).await?),
        None => None,
    };
    // A RegistryCredential's check is a tenant's: it waits for that tenant's other checks, and
    // reaches only what tenants may.
    Ok(Options { tenant: own_namespace.map(str::to_string), ..Options::from_spec(spec, ca_bundle) })
}

/// The PEM text of a CA bundle reference, from the credential's own namespace (a
/// RegistryCredential) or the one it names (a ClusterRegistryCredential).
async fn read_ca_bundle(ctx: &Context, bundle: &CaBundle, own_namespace: Option<&str>) -> Result<Vec<u8>, String> {
    let (kind, name, explicit, key) = match (&bundle.config_map, &bundle.secret) {
        (Some(c), _) => ("ConfigMap", &c.name, c.namespace.as_deref(), c.key.as_deref()),
        (None, Some(s)) => ("Secret", &s.name, s.namespace.as_deref(), s.key.as_deref()),
        (None, None) => return Err("spec.verify.caBundle names neither a ConfigMap nor a Secret".into()),
    };
    let key = key.unwrap_or(DEFAULT_CA_KEY);
    let namespace = resolve_reference(own_namespace, explicit, ctx.config.namespaces.as_ref())
        .map_err(|e| format!("spec.verify.caBundle: {e}"))?;
    let namespace = namespace.as_str();
    let missing = || format!("spec.verify.caBundle: {kind} {namespace}/{name} has no key {key:?}");
    let failed = |e: kube::Error| format!("spec.verify.caBundle: reading {kind} {namespace}/{name}: {e}");
    let bytes = match kind {
        "ConfigMap" => {
            let map =
                Api::<ConfigMap>::namespaced(ctx.client.clone(), namespace).get_opt(name).await.map_err(failed)?;
            let map = map.ok_or_else(|| format!("spec.verify.caBundle: ConfigMap {namespace}/{name} not found"))?;
            map.data.and_then(|mut d| d.remove(key)).map(String::into_bytes).ok_or_else(missing)?
        }
        _ => {
            let secret =
                Api::<Secret>::namespaced(ctx.client.clone(), namespace).get_opt(name).await.map_err(failed)?;
            let secret = secret.ok_or_else(|| format!("spec.verify.caBundle: Secret {namespace}/{name} not found"))?;
            secret.data.and_then(|mut d| d.remove(key)).map(|b| b.0).ok_or_else(missing)?
        }
    };
    Ok(bytes)
}
