//! **Pure.** Gathered facts → the report: for each image, which pull Secret entries the kubelet
//! would send (its own matching rules, `keyring`), and the verdict with the fix.

use super::{
    facts::{CredentialFacts, Facts, FoundSecret, ImageUse, PullEvent, SecretFacts},
    keyring::{self, Entry, ImageRef},
    report::{
        Cause, Check, CredentialReport, EntryReport, EventReport, ImageReport, Match, Report, SecretReport, Verdict,
    },
};

/// The report for everything `facts` holds.
pub fn diagnose(facts: &Facts) -> Report {
    let images: Vec<ImageReport> = facts.images.iter().map(|use_| image_report(facts, use_)).collect();
    let mut notes = Vec::new();
    if let super::facts::Listing::Unavailable(why) = &facts.credentials {
        notes.push(format!("credentials not listed: {why}"));
    }
    if let Some(problem) = &facts.service_account.problem {
        notes.push(format!("ServiceAccount {}: {problem}", facts.service_account.name));
    }
    Report {
        namespace: facts.namespace.clone(),
        subject: facts.subject.clone(),
        service_account: facts.service_account.name.clone(),
        ok: !images.is_empty() && images.iter().all(|i| i.verdict.ok),
        images,
        notes,
    }
}

fn image_report(facts: &Facts, use_: &ImageUse) -> ImageReport {
    let events: Vec<EventReport> = use_.events.iter().map(event_report).collect();
    let image = match keyring::parse_image(&use_.image) {
        Ok(image) => image,
        Err(e) => {
            let verdict = failed(Cause::BadImage, e.to_string(), vec!["fix the image name in the Pod spec".into()]);
            return bare_report(use_, events, verdict);
        }
    };
    let repository = image.repository();
    let listed = facts.secrets_sent();
    let secrets: Vec<SecretReport> = listed.iter().map(|(name, from)| secret_report(facts, name, from)).collect();
    let entries: Vec<Entry> =
        secrets.iter().flat_map(|s| s.entries.iter().map(|e| Entry { secret: &s.name, server: &e.server })).collect();
    let matches: Vec<Match> = keyring::lookup(&entries, &repository)
        .into_iter()
        .map(|e| Match { secret: e.secret.to_string(), server: e.server.to_string() })
        .collect();
    let secrets = mark_matches(secrets, &matches);
    let check = matches.first().and_then(|m| probe_of(facts, &use_.image, m));
    let verdict = verdict(facts, &image, &secrets, &matches, check.as_ref(), &events);
    ImageReport {
        image: use_.image.clone(),
        container: use_.container.clone(),
        role: use_.role.to_string(),
        registry: image.domain.clone(),
        repository,
        secrets,
        matches,
        events,
        check,
        verdict,
    }
}

fn bare_report(use_: &ImageUse, events: Vec<EventReport>, verdict: Verdict) -> ImageReport {
    ImageReport {
        image: use_.image.clone(),
        container: use_.container.clone(),
        role: use_.role.to_string(),
        registry: String::new(),
        repository: String::new(),
        secrets: vec![],
        matches: vec![],
        events,
        check: None,
        verdict,
    }
}

fn mark_matches(mut secrets: Vec<SecretReport>, matches: &[Match]) -> Vec<SecretReport> {
    for secret in &mut secrets {
        for entry in &mut secret.entries {
            entry.matches = matches.iter().any(|m| m.secret == secret.name && m.server == entry.server);
        }
    }
    secrets
}

fn probe_of(facts: &Facts, image: &str, m: &Match) -> Option<Check> {
    let probe = facts.probes.get(&(image.to_string(), m.secret.clone(), m.server.clone()))?;
    Some(Check {
        secret: m.secret.clone(),
        server: m.server.clone(),
        reason: probe.reason.clone(),
        message: probe.message.clone(),
    })
}

fn secret_report(facts: &Facts, name: &str, from: &str) -> SecretReport {
    let base = SecretReport {
        name: name.to_string(),
        from: from.to_string(),
        state: String::new(),
        type_: None,
        entries: vec![],
        problem: None,
        credential: None,
    };
    match facts.secrets.get(name).unwrap_or(&SecretFacts::Missing) {
        SecretFacts::Found(found) => found_report(facts, base, found),
        SecretFacts::Missing => SecretReport { state: "missing".into(), ..base },
        SecretFacts::Forbidden => forbidden_report(facts, base),
        SecretFacts::Unreadable(why) => SecretReport { state: "unreadable".into(), problem: Some(why.clone()), ..base },
    }
}

fn found_report(facts: &Facts, base: SecretReport, found: &FoundSecret) -> SecretReport {
    let credential = found.managed_by.as_ref().map(|(kind, name)| credential_report(facts, kind, name));
    let usable = is_pull_type(&found.type_);
    let (entries, problem) = match (&found.logins, usable) {
        (_, false) => (vec![], Some(format!("type {} is not a pull Secret: the kubelet ignores it", found.type_))),
        (Err(why), true) => (vec![], Some(why.clone())),
        (Ok(logins), true) => (logins.iter().map(|l| entry(&l.server, None)).collect(), None),
    };
    SecretReport { state: "present".into(), type_: Some(found.type_.clone()), entries, problem, credential, ..base }
}

/// The Secret cannot be read: what its credential's status says it holds.
fn forbidden_report(facts: &Facts, base: SecretReport) -> SecretReport {
    let problem =
        format!("no permission to read Secret {}: its entries are taken from its credential's status", base.name);
    let Some(credential) = credential_for_secret(facts, &base.name) else {
        let problem = format!("no permission to read Secret {}, and no credential names it", base.name);
        return SecretReport { state: "forbidden".into(), problem: Some(problem), ..base };
    };
    let entries = credential.registries.iter().map(|r| entry(r, Some("credential status"))).collect();
    SecretReport {
        state: "forbidden".into(),
        entries,
        problem: Some(problem),
        credential: Some(to_report(credential)),
        ..base
    }
}

fn entry(server: &str, source: Option<&str>) -> EntryReport {
    EntryReport { server: server.to_string(), matches: false, source: source.map(str::to_string) }
}

pub fn is_pull_type(type_: &str) -> bool {
    type_ == "kubernetes.io/dockerconfigjson" || type_ == "kubernetes.io/dockercfg"
}

fn credentials(facts: &Facts) -> &[CredentialFacts] {
    match &facts.credentials {
        super::facts::Listing::Read(list) => list,
        super::facts::Listing::Unavailable(_) => &[],
    }
}

fn credential_for_secret<'a>(facts: &'a Facts, secret: &str) -> Option<&'a CredentialFacts> {
    credentials(facts).iter().find(|c| c.secret_name.as_deref() == Some(secret))
}

fn credential_report(facts: &Facts, kind: &str, name: &str) -> CredentialReport {
    match credentials(facts).iter().find(|c| c.kind == kind && c.name == name) {
        Some(c) => to_report(c),
        None => CredentialReport {
            kind: kind.to_string(),
            name: name.to_string(),
            ready: None,
            verified: None,
            expires_at: None,
        },
    }
}

fn to_report(c: &CredentialFacts) -> CredentialReport {
    CredentialReport {
        kind: c.kind.clone(),
        name: c.name.clone(),
        ready: c.ready.clone(),
        verified: c.verified.clone(),
        expires_at: c.expires_at.clone(),
    }
}

fn event_report(event: &PullEvent) -> EventReport {
    EventReport {
        reason: event.reason.clone(),
        message: event.message.clone(),
        count: event.count,
        cause: event_cause(&event.message).map(str::to_string),
    }
}

/// What a kubelet pull failure's message says, as containerd words it.
pub fn event_cause(message: &str) -> Option<&'static str> {
    let m = message.to_ascii_lowercase();
    if m.contains("unable to retrieve some image pull secrets") {
        Some("secret-missing")
    } else if m.contains("401") || m.contains("unauthorized") {
        Some("unauthorized")
    } else if m.contains("403") || m.contains("forbidden") || m.contains("denied") {
        Some("forbidden")
    } else if m.contains("not found") || m.contains("404") {
        Some("not-found")
    } else if m.contains("x509") || m.contains("tls") || m.contains("certificate") {
        Some("tls")
    } else {
        None
    }
}

fn failed(cause: Cause, summary: String, fixes: Vec<String>) -> Verdict {
    Verdict { ok: false, cause, summary, fixes }
}

fn verdict(
    facts: &Facts,
    image: &ImageRef,
    secrets: &[SecretReport],
    matches: &[Match],
    check: Option<&Check>,
    events: &[EventReport],
) -> Verdict {
    match matches.first() {
        Some(first) => matched_verdict(facts, image, secrets, first, check, events),
        None => unmatched_verdict(facts, image, secrets),
    }
}

fn matched_verdict(
    facts: &Facts,
    image: &ImageRef,
    secrets: &[SecretReport],
    first: &Match,
    check: Option<&Check>,
    events: &[EventReport],
) -> Verdict {
    let secret = secrets.iter().find(|s| s.name == first.secret);
    let credential = secret.and_then(|s| s.credential.as_ref());
    if let Some(c) = credential
        && let Some(ready) = c.ready.as_ref().filter(|r| r.status != "True")
    {
        let summary = format!(
            "Secret {} is managed by {} {}, which is not Ready ({}: {})",
            first.secret, c.kind, c.name, ready.reason, ready.message
        );
        let fixes = vec![format!("fix {} {}: {}", c.kind, c.name, ready.message), describe(facts, &c.kind, &c.name)];
        return failed(Cause::CredentialNotReady, summary, fixes);
    }
    if let Some(check) = check.filter(|c| c.reason != "Verified") {
        return check_failed(facts, image, check, credential);
    }
    if check.is_none()
        && let Some(refused) = credential.and_then(|c| refused_by_registry(c, first))
    {
        return check_failed(facts, image, &refused, credential);
    }
    let mut summary = format!("Secret {} entry {} matches {}", first.secret, first.server, image.repository());
    match check {
        Some(_) => summary.push_str("; the registry accepts it: can pull now"),
        None => {
            // The newest pull result (not a back-off), when it was a failure.
            let last = events.iter().find(|e| e.reason == "Failed" || e.reason == "Pulled");
            if let Some(cause) = last.and_then(|e| e.cause.as_deref()) {
                summary.push_str(&format!(
                    "; the kubelet's last pull Event says {cause}: if it is newer than the Secret, run with --verify"
                ));
            }
        }
    }
    Verdict { ok: true, cause: Cause::Ok, summary, fixes: vec![] }
}

/// The credential's own last registry check, when it says the registry refuses the login:
/// what `--verify` would find, without sending it.
fn refused_by_registry(c: &CredentialReport, first: &Match) -> Option<Check> {
    let verified = c.verified.as_ref().filter(|v| v.status == "False")?;
    ["Unauthorized", "Forbidden"].contains(&verified.reason.as_str()).then(|| Check {
        secret: first.secret.clone(),
        server: first.server.clone(),
        reason: verified.reason.clone(),
        message: format!("the credential's Verified condition: {}", verified.message),
    })
}

fn describe(facts: &Facts, kind: &str, name: &str) -> String {
    match kind {
        "ClusterRegistryCredential" => format!("kubectl describe clusterregistrycredential {name}"),
        _ => format!("kubectl describe registrycredential {name} -n {}", facts.namespace),
    }
}

fn check_failed(facts: &Facts, image: &ImageRef, check: &Check, credential: Option<&CredentialReport>) -> Verdict {
    let (cause, what) = match check.reason.as_str() {
        "Unauthorized" => (Cause::Unauthorized, "the registry refuses the login (wrong or revoked password or token)"),
        "Forbidden" => (Cause::Forbidden, "the login has no pull access to this repository"),
        _ if check.message.contains("does not exist") => (Cause::NotFound, "the image does not exist"),
        _ => (Cause::RegistryError, "the registry check failed"),
    };
    let summary = format!(
        "Secret {} entry {} matches, but {}: {}: {}",
        check.secret, check.server, what, check.reason, check.message
    );
    let login = match credential {
        Some(c) => format!("the login of {} {}", c.kind, c.name),
        None => format!("the login for {} in Secret {}", check.server, check.secret),
    };
    let source = match cause {
        Cause::Forbidden => format!("grant {login} pull on {} at the registry, or use a login that has it", image.path),
        _ => format!("fix {login}: the password or token in its source"),
    };
    let mut fixes = vec![source];
    if cause == Cause::NotFound {
        fixes = vec![format!("check the image name and tag: {}:{}", image.repository(), image.reference)];
    }
    if let Some(c) = credential {
        fixes.push(describe(facts, &c.kind, &c.name));
    }
    failed(cause, summary, fixes)
}

fn unmatched_verdict(facts: &Facts, image: &ImageRef, secrets: &[SecretReport]) -> Verdict {
    if secrets.is_empty() {
        return no_pull_secrets(facts, image);
    }
    if let Some(v) = wrong_spelling(facts, image, secrets) {
        return v;
    }
    let missing: Vec<&str> = secrets.iter().filter(|s| s.state == "missing").map(|s| s.name.as_str()).collect();
    if !missing.is_empty() {
        return secret_missing(facts, image, &missing);
    }
    if let Some(s) = secrets.iter().find(|s| s.state == "forbidden" && s.entries.is_empty()) {
        let fixes =
            vec![format!("ask for get on Secret {} in {}, or for the list of credentials", s.name, facts.namespace)];
        return failed(Cause::SecretForbidden, s.problem.clone().unwrap_or_default(), fixes);
    }
    if let Some(s) = secrets.iter().find(|s| s.type_.as_deref().is_some_and(|t| !is_pull_type(t))) {
        let fixes = covering_fixes(facts, image);
        return failed(
            Cause::WrongSecretType,
            format!("Secret {}: {}", s.name, s.problem.clone().unwrap_or_default()),
            fixes,
        );
    }
    if let Some(s) = secrets.iter().find(|s| s.state == "present" && s.problem.is_some()) {
        let fixes = vec![format!("rewrite Secret {} (or let a RegistryCredential write it)", s.name)];
        return failed(
            Cause::InvalidSecret,
            format!("Secret {}: {}", s.name, s.problem.clone().unwrap_or_default()),
            fixes,
        );
    }
    let names: Vec<&str> = secrets.iter().map(|s| s.name.as_str()).collect();
    let summary = format!("no entry of Secret(s) {} matches registry {}", names.join(", "), image.domain);
    failed(Cause::NoEntryForRegistry, summary, covering_fixes(facts, image))
}

fn no_pull_secrets(facts: &Facts, image: &ImageRef) -> Verdict {
    let account = &facts.service_account;
    let summary = match (facts.is_pod, &account.pull_secrets) {
        (true, Some(list)) if !list.is_empty() => format!(
            "the Pod has no imagePullSecrets; its ServiceAccount {} lists {} now, but admission adds them only when a Pod is created",
            account.name,
            list.join(", ")
        ),
        _ => format!(
            "no imagePullSecrets: neither the {} nor its ServiceAccount {} names a pull Secret for {}",
            if facts.is_pod { "Pod" } else { "template" },
            account.name,
            image.domain
        ),
    };
    let mut fixes = covering_fixes(facts, image);
    if facts.is_pod && account.pull_secrets.as_ref().is_some_and(|l| !l.is_empty()) {
        fixes.insert(
            0,
            "delete the Pod so that its owner creates it again with the ServiceAccount's imagePullSecrets".into(),
        );
    }
    failed(Cause::NoPullSecrets, summary, fixes)
}

/// An entry for the image's registry host under another spelling (a port, a path).
fn wrong_spelling(facts: &Facts, image: &ImageRef, secrets: &[SecretReport]) -> Option<Verdict> {
    let wanted = host_name(&image.domain);
    let (secret, entry) = secrets
        .iter()
        .flat_map(|s| s.entries.iter().map(move |e| (s, e)))
        .find(|(_, e)| keyring::entry_key(&e.server).is_some_and(|k| host_name(&k) == wanted))?;
    let summary = format!(
        "Secret {} has an entry {} but the image names registry {}: the kubelet matches host, port and path exactly, so it is not sent",
        secret.name, entry.server, image.domain
    );
    let fixes = match &secret.credential {
        Some(c) => vec![
            format!("set spec.registry: {} on {} {}", image.domain, c.kind, c.name),
            describe(facts, &c.kind, &c.name),
        ],
        None => vec![format!("rename the auths entry {} of Secret {} to {}", entry.server, secret.name, image.domain)],
    };
    Some(failed(Cause::WrongSpelling, summary, fixes))
}

/// `ghcr.io` for `ghcr.io:443`, `https://GHCR.io/v2/`, `ghcr.io/org`.
fn host_name(key: &str) -> String {
    let host = key.split('/').next().unwrap_or(key);
    let host = match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(']') => {
            name
        }
        _ => host,
    };
    let host = host.to_ascii_lowercase();
    if host == "index.docker.io" || host == "registry-1.docker.io" { "docker.io".into() } else { host }
}

fn secret_missing(facts: &Facts, image: &ImageRef, missing: &[&str]) -> Verdict {
    if let Some(v) = not_written_yet(facts, missing) {
        return v;
    }
    let summary = format!("pull Secret(s) {} do not exist in namespace {}", missing.join(", "), facts.namespace);
    let mut fixes = Vec::new();
    if let Some(c) = covering(facts, image).first()
        && let Some(secret) = &c.secret_name
    {
        fixes.push(format!("name the Secret {} {} writes: imagePullSecrets: [{{name: {secret}}}]", c.kind, c.name));
    }
    fixes.push(format!(
        "or create a RegistryCredential in {} with spec.registry: {} and spec.secret.name: {}",
        facts.namespace, image.domain, missing[0]
    ));
    failed(Cause::SecretMissing, summary, fixes)
}

/// A missing Secret that a credential is to write, but has not: that credential's failure.
fn not_written_yet(facts: &Facts, missing: &[&str]) -> Option<Verdict> {
    let c = credentials(facts).iter().find(|c| missing.contains(&c.writes.as_str()))?;
    let (reason, message) = match &c.ready {
        Some(ready) if ready.status != "True" => (ready.reason.clone(), ready.message.clone()),
        Some(_) => ("Ready".to_string(), "Ready, but its Secret is not in this namespace".to_string()),
        None => ("NotReconciled".to_string(), "no status yet: is the controller running?".to_string()),
    };
    let summary = format!(
        "Secret {} does not exist: {} {}, which writes it, has not ({reason}: {message})",
        c.writes, c.kind, c.name
    );
    let fixes = vec![format!("fix {} {}: {message}", c.kind, c.name), describe(facts, &c.kind, &c.name)];
    Some(failed(Cause::CredentialNotReady, summary, fixes))
}

/// The credentials whose Secret holds an entry the kubelet would send for the image.
fn covering<'a>(facts: &'a Facts, image: &ImageRef) -> Vec<&'a CredentialFacts> {
    let repository = image.repository();
    credentials(facts)
        .iter()
        .filter(|c| {
            let entries: Vec<Entry> = c.registries.iter().map(|r| Entry { secret: &c.name, server: r }).collect();
            !keyring::lookup(&entries, &repository).is_empty()
        })
        .collect()
}

/// How to give the image a credential: an existing one's Secret, or a new credential.
fn covering_fixes(facts: &Facts, image: &ImageRef) -> Vec<String> {
    let template = if facts.is_pod { "the Pod's owner's template" } else { "the Pod template" };
    let Some(c) = covering(facts, image).into_iter().next() else {
        return vec![
            format!(
                "create a RegistryCredential in {} with spec.registry: {} (see examples/), and spec.serviceAccounts: [{}]",
                facts.namespace, image.domain, facts.service_account.name
            ),
            format!("or add imagePullSecrets: [{{name: <its Secret>}}] to {template}"),
            "or nothing, if the image is public or the node has its own credentials for it (a kubelet credential provider)".into(),
        ];
    };
    let secret = c.secret_name.clone().unwrap_or_else(|| c.name.clone());
    let mut fixes = vec![format!("add to {template}: imagePullSecrets: [{{name: {secret}}}]")];
    if c.kind == "RegistryCredential" {
        fixes.push(format!(
            "or list ServiceAccount {} in spec.serviceAccounts of RegistryCredential {} (new Pods get the Secret)",
            facts.service_account.name, c.name
        ));
    } else {
        // Whether its selection includes this namespace takes the Namespace's labels, which a
        // tenant may not read: the fix says what to check.
        fixes[0].push_str(&format!(
            " (ClusterRegistryCredential {} writes it only into the namespaces it selects: kubectl get secret {secret} -n {})",
            c.name, facts.namespace
        ));
    }
    fixes
}

#[cfg(test)]
mod tests;
