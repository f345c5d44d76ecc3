//! The report as text for a person (and `-o json` for scripts, serde as is). No value of any
//! Secret is in the report, so none can be printed.

use std::fmt::Write;

use super::report::{CredentialReport, ImageReport, Report, SecretReport};

/// The report as JSON.
pub fn json(report: &Report) -> String {
    serde_json::to_string_pretty(report).unwrap_or_default()
}

/// The report as text.
pub fn text(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} in namespace {} (ServiceAccount {})",
        report.subject, report.namespace, report.service_account
    );
    for note in &report.notes {
        let _ = writeln!(out, "note: {note}");
    }
    for image in &report.images {
        out.push('\n');
        image_text(&mut out, image, &report.subject, &report.service_account);
    }
    let verdict =
        if report.ok { "OK: every image has a matching pull credential" } else { "FAILING: see the fixes above" };
    let _ = writeln!(out, "\n{verdict}");
    out
}

fn image_text(out: &mut String, image: &ImageReport, subject: &str, account: &str) {
    let who =
        if image.container.is_empty() { image.role.clone() } else { format!("{} {}", image.role, image.container) };
    let _ = writeln!(out, "{who}: {}", image.image);
    if !image.registry.is_empty() {
        let _ = writeln!(out, "  registry:  {} (the kubelet looks up {})", image.registry, image.repository);
    }
    if image.secrets.is_empty() && !image.registry.is_empty() {
        let _ = writeln!(out, "  pull Secrets: none");
    }
    for secret in &image.secrets {
        let from = match secret.from.as_str() {
            "serviceAccount" => format!("added by ServiceAccount {account}"),
            _ => format!("listed by {subject}"),
        };
        secret_text(out, secret, &from);
    }
    for event in &image.events {
        let _ = writeln!(out, "  event:     {} (x{}): {}", event.reason, event.count, event.message);
    }
    if let Some(check) = &image.check {
        let answer = if check.reason == "Verified" { "can pull now" } else { check.reason.as_str() };
        let _ = writeln!(out, "  --verify:  {answer} with {} entry {}: {}", check.secret, check.server, check.message);
    }
    let status = if image.verdict.ok { "OK" } else { "FAIL" };
    let cause = serde_json::to_value(image.verdict.cause).ok().and_then(|v| v.as_str().map(str::to_string));
    let _ = writeln!(out, "  verdict:   {status} ({}): {}", cause.unwrap_or_default(), image.verdict.summary);
    for fix in &image.verdict.fixes {
        let _ = writeln!(out, "  fix:       {fix}");
    }
}

fn secret_text(out: &mut String, secret: &SecretReport, from: &str) {
    let type_ = secret.type_.as_deref().map(|t| format!(", {t}")).unwrap_or_default();
    let _ = writeln!(out, "  Secret {} ({from}): {}{type_}", secret.name, secret.state);
    if let Some(problem) = &secret.problem {
        let _ = writeln!(out, "    {problem}");
    }
    for entry in &secret.entries {
        let verdict = if entry.matches { "matches" } else { "does not match" };
        let source = entry.source.as_deref().map(|s| format!(" (from the {s})")).unwrap_or_default();
        let _ = writeln!(out, "    entry {}: {verdict}{source}", entry.server);
    }
    if let Some(c) = &secret.credential {
        let _ = writeln!(out, "    managed by {}", credential_text(c));
    }
}

fn credential_text(c: &CredentialReport) -> String {
    let condition = |name: &str, c: &Option<super::facts::Condition>| match c {
        Some(c) => format!("{name}={} {}", c.status, c.reason),
        None => format!("no {name} condition"),
    };
    let mut text =
        format!("{} {}: {}, {}", c.kind, c.name, condition("Ready", &c.ready), condition("Verified", &c.verified));
    if let Some(expires) = &c.expires_at {
        let _ = write!(text, ", token expires {expires}");
    }
    if let Some(ready) = c.ready.as_ref().filter(|r| r.status != "True") {
        let _ = write!(text, " ({})", ready.message);
    }
    text
}
