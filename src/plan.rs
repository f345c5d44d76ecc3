//! The pure half of a reconcile: from what was observed (targets, this credential's live
//! Secrets, what it remembers) to the writes that make the cluster right. No I/O here; the
//! executor in `controller::core` performs the plan, and every decision is unit-tested below.
//!
//! Both kinds go through this one planner: a RegistryCredential is a fan-out to exactly its
//! own namespace.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    api::ObjectMeta,
    core::{PartialObjectMeta, Selector, SelectorExt},
};

use crate::{
    Error,
    crd::{NamespaceSelection, SecretTemplate},
    state::Content,
};

/// Label keys regcred sets itself; a template may not set them (nor anything under
/// `regcred.dev/`), or a tenant could make another credential list their Secret as its own.
pub const RESERVED_LABEL_PREFIX: &str = "regcred.dev/";

/// One of this credential's Secrets, as the Secret watch's record shows it (namespace, name,
/// resourceVersion), and what is known of its content: remembered for this resourceVersion,
/// or computed from a fresh read. Nothing else of it is kept.
#[derive(Clone, Debug)]
pub struct LiveSecret {
    pub namespace: String,
    pub name: String,
    pub resource_version: Option<String>,
    /// Its data hash and the `secret::owned_metadata_digest` of the metadata regcred owns on
    /// it (current when they are the desired ones), shared with every Secret known to hold
    /// the same; `None` when unknown.
    pub content: Option<Arc<Content>>,
}

impl LiveSecret {
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// What the planner is given.
pub struct Observed<'a> {
    /// Namespaces that should hold the Secret, sorted.
    pub targets: &'a [String],
    /// Namespaces being deleted: their Secrets go with them, nothing is removed there.
    pub terminating: &'a BTreeSet<String>,
    /// Name of the Secret to write.
    pub secret_name: &'a str,
    /// A name written before (from the last status), for Secrets regcred wrote before it
    /// labelled them with the credential's uid.
    pub previous_name: Option<&'a str>,
    /// The Secrets this credential **controls** (by their controller owner reference; a label
    /// proves nothing, anyone can set it).
    pub own: &'a [LiveSecret],
    /// Namespaces where the last attempt found a Secret this credential may not take.
    pub contested: &'a BTreeSet<String>,
    /// The hash of the data the Secret should hold.
    pub desired_hash: &'a str,
    /// `secret::metadata_digest` of the metadata it should have.
    pub desired_meta_digest: &'a str,
}

/// What to do about the Secret in one target namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretStep {
    /// It is there and current.
    Unchanged,
    /// None of ours is there: POST (a Secret of someone else's makes it fail, never merge).
    Create,
    /// Ours, but out of date: apply, valid only against this resourceVersion.
    Apply { resource_version: String },
    /// Someone else held it last time: read it and decide before writing anything.
    Inspect,
}

/// A Secret of this credential to delete, valid only against its resourceVersion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retire {
    pub name: String,
    /// `None` for a Secret written before uid labels: read it first.
    pub resource_version: Option<String>,
}

/// Everything for one target namespace. `retire` happens only once `secret` succeeded, so a
/// rename never leaves a namespace without a pull Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceStep {
    pub namespace: String,
    pub secret: SecretStep,
    pub retire: Vec<Retire>,
}

/// This credential's Secret in a namespace it no longer targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removal {
    pub namespace: String,
    pub retire: Retire,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<NamespaceStep>,
    pub removals: Vec<Removal>,
}

impl Plan {
    /// Whether carrying it out writes nothing.
    #[cfg(test)]
    fn is_quiet(&self) -> bool {
        self.removals.is_empty() && self.steps.iter().all(|s| s.secret == SecretStep::Unchanged && s.retire.is_empty())
    }
}

/// Turns observed state into the writes that make it right.
pub fn plan(observed: &Observed<'_>) -> Plan {
    let mut own: BTreeMap<(&str, &str), &LiveSecret> =
        observed.own.iter().map(|s| ((s.namespace(), s.name()), s)).collect();
    let targets: BTreeSet<&str> = observed.targets.iter().map(String::as_str).collect();
    let mut steps = Vec::with_capacity(observed.targets.len());
    for namespace in observed.targets {
        let secret = match own.remove(&(namespace.as_str(), observed.secret_name)) {
            Some(live) if is_current(live, observed) => SecretStep::Unchanged,
            Some(live) => SecretStep::Apply { resource_version: live.resource_version.clone().unwrap_or_default() },
            None if observed.contested.contains(namespace) => SecretStep::Inspect,
            None => SecretStep::Create,
        };
        // The namespace's other Secrets, found by range (not by a pass over all of them: a
        // fan-out to 10,000 namespaces would make that 10,000² comparisons).
        let others: Vec<(&str, &str)> = own
            .range((namespace.as_str(), "")..)
            .take_while(|((ns, _), _)| ns == namespace)
            .map(|(key, _)| *key)
            .collect();
        let mut retire: Vec<Retire> = others
            .iter()
            .filter_map(|key| own.remove(key))
            .map(|live| Retire { name: live.name().into(), resource_version: live.resource_version.clone() })
            .collect();
        // Written before Secrets carried the uid label: the list cannot show it.
        if let Some(previous) = observed.previous_name
            && previous != observed.secret_name
            && !retire.iter().any(|r| r.name == previous)
        {
            retire.push(Retire { name: previous.into(), resource_version: None });
        }
        steps.push(NamespaceStep { namespace: namespace.clone(), secret, retire });
    }
    let removals = own
        .into_iter()
        .filter(|((namespace, _), _)| !targets.contains(namespace) && !observed.terminating.contains(*namespace))
        .map(|((namespace, _), live)| Removal {
            namespace: namespace.into(),
            retire: Retire { name: live.name().into(), resource_version: live.resource_version.clone() },
        })
        .collect();
    Plan { steps, removals }
}

/// Whether a live Secret already holds what regcred would write.
fn is_current(live: &LiveSecret, observed: &Observed<'_>) -> bool {
    live.content
        .as_ref()
        .is_some_and(|c| c.data_hash == observed.desired_hash && c.meta_digest == observed.desired_meta_digest)
}

/// Keys a Secret template may not set, first one found.
pub fn reserved_template_key(template: &SecretTemplate) -> Option<&str> {
    let reserved =
        |key: &&String| key.starts_with(RESERVED_LABEL_PREFIX) || key.as_str() == crate::secret::MANAGED_BY_LABEL;
    template.labels.keys().chain(template.annotations.keys()).find(reserved).map(String::as_str)
}

/// The namespaces a selection picks, by name: listed or matching the selector, not
/// excluded, not terminating. No selector and no names: all.
pub fn select<'a>(
    selection: &NamespaceSelection,
    namespaces: impl IntoIterator<Item = &'a ObjectMeta>,
) -> Result<Vec<String>, Error> {
    let matcher = NamespaceMatcher::new(selection)?;
    let mut names: Vec<String> = namespaces
        .into_iter()
        .filter(|n| n.deletion_timestamp.is_none() && matcher.matches(n))
        .filter_map(|n| n.name.clone())
        .collect();
    names.sort();
    Ok(names)
}

/// A parsed namespace selection, to test one namespace at a time (the index does, per
/// Namespace event).
pub struct NamespaceMatcher<'a> {
    selection: &'a NamespaceSelection,
    selector: Option<Selector>,
}

impl<'a> NamespaceMatcher<'a> {
    pub fn new(selection: &'a NamespaceSelection) -> Result<Self, Error> {
        let selector = match &selection.selector {
            Some(selector) => {
                Some(Selector::try_from(selector.clone()).map_err(|e| Error::InvalidNamespaceSelector(e.to_string()))?)
            }
            None => None,
        };
        Ok(Self { selection, selector })
    }

    /// Whether a live namespace is selected (its deletion is not considered here).
    pub fn matches(&self, namespace: &ObjectMeta) -> bool {
        let name = namespace.name.as_deref().unwrap_or_default();
        if self.selection.exclude.iter().any(|e| e == name) {
            return false;
        }
        let everything = self.selector.is_none() && self.selection.names.is_empty();
        let empty = BTreeMap::new();
        let labels = namespace.labels.as_ref().unwrap_or(&empty);
        everything
            || self.selection.names.iter().any(|listed| listed == name)
            || self.selector.as_ref().is_some_and(|s| s.matches(labels))
    }
}

/// Whether a namespace's membership in a selection differs from what the last reconcile
/// saw: the only Namespace events that concern a cluster credential.
pub fn namespace_concerns(
    matcher: &NamespaceMatcher<'_>,
    namespace: &PartialObjectMeta<Namespace>,
    was_target: bool,
) -> bool {
    let live = namespace.metadata.deletion_timestamp.is_none();
    (live && matcher.matches(&namespace.metadata)) != was_target
}

/// Splits selected namespaces into those the controller serves (all, without `--namespaces`)
/// and those it may not write.
pub fn within(selected: Vec<String>, served: Option<&BTreeSet<String>>) -> (Vec<String>, Vec<String>) {
    match served {
        None => (selected, Vec::new()),
        Some(served) => selected.into_iter().partition(|ns| served.contains(ns)),
    }
}

/// How many listed in a note before "…".
const LISTED_OUTSIDE: usize = 10;

/// The Ready message's note on selected namespaces outside `--namespaces`, if any.
pub fn outside_scope_note(outside: &[String]) -> Option<String> {
    let (first, more) = match outside.len() {
        0 => return None,
        n if n > LISTED_OUTSIDE => (&outside[..LISTED_OUTSIDE], ", …"),
        _ => (outside, ""),
    };
    Some(format!(
        "{} selected namespaces are outside the controller's --namespaces and get no Secret: {}{more}",
        outside.len(),
        first.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};

    use super::*;

    fn live(namespace: &str, name: &str, hash: Option<&str>) -> LiveSecret {
        LiveSecret {
            namespace: namespace.into(),
            name: name.into(),
            resource_version: Some(format!("rv-{namespace}-{name}")),
            content: hash.map(|hash| content(hash, "m1")),
        }
    }

    fn content(data_hash: &str, meta_digest: &str) -> Arc<Content> {
        Arc::new(Content { data_hash: data_hash.into(), meta_digest: meta_digest.into() })
    }

    struct Case {
        targets: Vec<String>,
        own: Vec<LiveSecret>,
        contested: BTreeSet<String>,
        terminating: BTreeSet<String>,
        previous: Option<&'static str>,
    }

    impl Case {
        fn new(targets: &[&str]) -> Self {
            Case {
                targets: targets.iter().map(|t| t.to_string()).collect(),
                own: Vec::new(),
                contested: BTreeSet::new(),
                terminating: BTreeSet::new(),
                previous: None,
            }
        }

        fn plan(&self) -> Plan {
            plan(&Observed {
                targets: &self.targets,
                terminating: &self.terminating,
                secret_name: "pull",
                previous_name: self.previous,
                own: &self.own,
                contested: &self.contested,
                desired_hash: "h1",
                desired_meta_digest: "m1",
            })
        }
    }

    fn step(namespace: &str, secret: SecretStep, retire: Vec<Retire>) -> NamespaceStep {
        NamespaceStep { namespace: namespace.into(), secret, retire }
    }

    #[test]
    fn missing_secrets_are_created_current_ones_left_alone_stale_ones_applied() {
        let mut case = Case::new(&["a", "b", "c"]);
        case.own = vec![live("a", "pull", Some("h1")), live("b", "pull", Some("old")), live("c", "pull", None)];
        case.targets.push("d".into());
        let plan = case.plan();
        assert_eq!(
            plan.steps,
            [
                step("a", SecretStep::Unchanged, vec![]),
                step("b", SecretStep::Apply { resource_version: "rv-b-pull".into() }, vec![]),
                step("c", SecretStep::Apply { resource_version: "rv-c-pull".into() }, vec![]),
                step("d", SecretStep::Create, vec![]),
            ]
        );
        assert!(plan.removals.is_empty());
    }

    #[test]
    fn an_unchanged_fan_out_plans_no_write() {
        let mut case = Case::new(&["a", "b"]);
        case.own = vec![live("a", "pull", Some("h1")), live("b", "pull", Some("h1"))];
        assert!(case.plan().is_quiet());
    }

    /// Item 1 of the one-core issue: the old name goes only together with the new one's
    /// write in the same namespace (the executor retires only after the step succeeded).
    #[test]
    fn a_rename_retires_the_old_secret_per_namespace_after_the_new_one() {
        let mut case = Case::new(&["a", "b"]);
        case.own = vec![live("a", "old", Some("h1")), live("b", "old", Some("h1"))];
        let plan = case.plan();
        let retire = |ns: &str| vec![Retire { name: "old".into(), resource_version: Some(format!("rv-{ns}-old")) }];
        assert_eq!(
            plan.steps,
            [step("a", SecretStep::Create, retire("a")), step("b", SecretStep::Create, retire("b"))]
        );
        assert!(plan.removals.is_empty(), "nothing is deleted outside the namespace's own step");
    }

    #[test]
    fn a_rename_of_an_unlabelled_secret_uses_the_status_name() {
        let mut case = Case::new(&["a"]);
        case.previous = Some("old");
        assert_eq!(
            case.plan().steps,
            [step("a", SecretStep::Create, vec![Retire { name: "old".into(), resource_version: None }])]
        );
    }

    /// Item 17: a namespace lost to an older credential is read, never written blindly.
    #[test]
    fn a_contested_namespace_is_inspected_not_created() {
        let mut case = Case::new(&["a", "b"]);
        case.contested.insert("a".into());
        assert_eq!(case.plan().steps, [step("a", SecretStep::Inspect, vec![]), step("b", SecretStep::Create, vec![])]);
    }

    #[test]
    fn secrets_in_namespaces_no_longer_selected_are_removed_unless_terminating() {
        let mut case = Case::new(&["a"]);
        case.own = vec![live("a", "pull", Some("h1")), live("gone", "pull", Some("h1")), live("dying", "pull", None)];
        case.terminating.insert("dying".into());
        let plan = case.plan();
        assert_eq!(
            plan.removals,
            [Removal {
                namespace: "gone".into(),
                retire: Retire { name: "pull".into(), resource_version: Some("rv-gone-pull".into()) }
            }]
        );
    }

    #[test]
    fn changed_template_metadata_needs_a_write() {
        let mut case = Case::new(&["a"]);
        let mut stale = live("a", "pull", Some("h1"));
        stale.content = Some(content("h1", "m-before-the-template-changed"));
        case.own = vec![stale];
        assert_eq!(case.plan().steps[0].secret, SecretStep::Apply { resource_version: "rv-a-pull".into() });
    }

    /// A Secret known only by its resourceVersion (not read) is current when it was seen
    /// current for the same desired metadata; for other metadata it is written.
    #[test]
    fn a_secret_seen_current_needs_no_metadata_for_the_same_desired_metadata() {
        let mut case = Case::new(&["a"]);
        let mut known = live("a", "pull", Some("h1"));
        known.content = Some(content("h1", "m1"));
        case.own = vec![known.clone()];
        assert_eq!(case.plan().steps[0].secret, SecretStep::Unchanged);
        known.content = Some(content("h1", "m0"));
        case.own = vec![known];
        assert_eq!(case.plan().steps[0].secret, SecretStep::Apply { resource_version: "rv-a-pull".into() });
    }

    /// Item 2: reserved keys are refused in the controller too (CEL refuses them at admission).
    #[test]
    fn reserved_label_and_annotation_keys_are_found() {
        let mut template = SecretTemplate::default();
        assert_eq!(reserved_template_key(&template), None);
        template.labels.insert("team".into(), "a".into());
        assert_eq!(reserved_template_key(&template), None);
        template.labels.insert("regcred.dev/credential-uid".into(), "x".into());
        assert_eq!(reserved_template_key(&template), Some("regcred.dev/credential-uid"));
        let mut template = SecretTemplate::default();
        template.annotations.insert("app.kubernetes.io/managed-by".into(), "me".into());
        assert_eq!(reserved_template_key(&template), Some("app.kubernetes.io/managed-by"));
    }

    fn ns(name: &str, labels: &[(&str, &str)], terminating: bool) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            deletion_timestamp: terminating.then(|| Time(k8s_openapi::jiff::Timestamp::now())),
            ..Default::default()
        }
    }

    fn cluster() -> Vec<ObjectMeta> {
        vec![
            ns("a1", &[("team", "a")], false),
            ns("a2", &[("team", "a")], true),
            ns("b1", &[("team", "b")], false),
            ns("kube-system", &[], false),
            ns("build", &[], false),
        ]
    }

    #[test]
    fn selector_names_and_exclusions_combine() {
        let selection = NamespaceSelection {
            selector: Some(LabelSelector {
                match_labels: Some([("team".to_string(), "a".to_string())].into()),
                ..Default::default()
            }),
            names: vec!["build".into(), "missing".into()],
            exclude: vec!["kube-system".into()],
        };
        assert_eq!(select(&selection, &cluster()).unwrap(), ["a1", "build"]);
    }

    #[test]
    fn nothing_given_or_an_empty_selector_selects_all_live_namespaces() {
        let all = ["a1", "b1", "build", "kube-system"];
        assert_eq!(select(&NamespaceSelection::default(), &cluster()).unwrap(), all);
        let empty = NamespaceSelection { selector: Some(LabelSelector::default()), ..Default::default() };
        assert_eq!(select(&empty, &cluster()).unwrap(), all);
    }

    #[test]
    fn names_alone_select_only_those() {
        let selection = NamespaceSelection { names: vec!["b1".into()], ..Default::default() };
        assert_eq!(select(&selection, &cluster()).unwrap(), ["b1"]);
    }

    /// Item 12: a Namespace event concerns a credential only when it changes membership.
    #[test]
    fn only_membership_changes_concern_a_cluster_credential() {
        let selection = NamespaceSelection { names: vec!["a1".into()], ..Default::default() };
        let matcher = NamespaceMatcher::new(&selection).unwrap();
        let event = |meta: ObjectMeta| PartialObjectMeta::<Namespace> { metadata: meta, ..Default::default() };
        assert!(!namespace_concerns(&matcher, &event(ns("b1", &[], false)), false), "unrelated namespace");
        assert!(namespace_concerns(&matcher, &event(ns("a1", &[], false)), false), "new target");
        assert!(!namespace_concerns(&matcher, &event(ns("a1", &[("x", "y")], false)), true), "relabelled target");
        assert!(namespace_concerns(&matcher, &event(ns("a1", &[], true)), true), "target terminating");
    }

    #[test]
    fn namespaces_outside_the_served_ones_are_split_off_and_named() {
        let selected = || vec!["a".to_string(), "b".into(), "c".into()];
        assert_eq!(within(selected(), None), (selected(), vec![]));
        let served: BTreeSet<String> = ["a".to_string(), "c".into(), "z".into()].into();
        assert_eq!(within(selected(), Some(&served)), (vec!["a".into(), "c".into()], vec!["b".to_string()]));
        assert_eq!(outside_scope_note(&[]), None);
        let note = outside_scope_note(&["b".into()]).unwrap();
        assert!(note.starts_with("1 selected namespaces are outside") && note.ends_with(": b"), "{note}");
        let many: Vec<String> = (0..12).map(|i| format!("n{i:02}")).collect();
        let note = outside_scope_note(&many).unwrap();
        assert!(
            note.starts_with("12 selected") && note.contains("n09") && !note.contains("n10") && note.ends_with(", …")
        );
    }
}
