//! What the admission webhook adds to a Pod: pure decisions, no I/O. The caches
//! (`webhook::cache`) turn the credentials that target the Pod's namespace into [`Offer`]s;
//! [`secrets_to_add`] picks the Secrets the Pod needs and [`patch`] appends them.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{LocalObjectReference, Pod};
use kube::core::{Selector, SelectorExt};

use crate::doctor::keyring::{self, Entry};

/// One credential's Secret in the Pod's namespace, and which Pods get it.
#[derive(Clone, Debug)]
pub struct Offer {
    /// The Secret's name.
    pub secret: String,
    /// The `.dockerconfigjson` server keys the Secret holds (or will hold).
    pub servers: Vec<String>,
    pub pods: PodMatch,
}

/// Which Pods an [`Offer`] is for.
#[derive(Clone, Debug)]
pub enum PodMatch {
    /// Pods with an image the Secret's servers match, by the kubelet's keyring rules.
    Images,
    /// Pods whose labels match (an empty selector matches every Pod).
    Labels(Selector),
}

/// The parts of a Pod the decision reads.
#[derive(Debug, Default)]
pub struct PodView {
    pub labels: BTreeMap<String, String>,
    /// Images of its init, ephemeral and regular containers.
    pub images: Vec<String>,
    /// The names already in its `imagePullSecrets`.
    pub pull_secrets: Vec<String>,
}

impl PodView {
    pub fn of(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        let mut images: Vec<String> = Vec::new();
        if let Some(spec) = spec {
            let containers = spec.init_containers.iter().flatten().chain(&spec.containers);
            images.extend(containers.filter_map(|c| c.image.clone()));
            images.extend(spec.ephemeral_containers.iter().flatten().filter_map(|c| c.image.clone()));
        }
        let pull_secrets = spec.and_then(|s| s.image_pull_secrets.as_ref()).into_iter().flatten();
        PodView {
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            images,
            pull_secrets: pull_secrets.map(|r| r.name.clone()).collect(),
        }
    }
}

/// The Secrets to append to the Pod's `imagePullSecrets`, in a stable order (by name): those
/// whose offer selects the Pod by its labels, and those the kubelet would send for one of its
/// images, minus those it lists already.
pub fn secrets_to_add(pod: &PodView, offers: &[Offer]) -> Vec<String> {
    let mut wanted = BTreeSet::new();
    let entries: Vec<Entry<'_>> = offers
        .iter()
        .filter(|o| matches!(o.pods, PodMatch::Images))
        .flat_map(|o| o.servers.iter().map(|server| Entry { secret: &o.secret, server }))
        .collect();
    for image in &pod.images {
        // An image the kubelet cannot parse is never pulled: nothing to add for it.
        let Ok(image) = keyring::parse_image(image) else { continue };
        wanted.extend(keyring::lookup(&entries, &image.repository()).into_iter().map(|e| e.secret));
    }
    for offer in offers {
        if let PodMatch::Labels(selector) = &offer.pods
            && selector.matches(&pod.labels)
        {
            wanted.insert(&offer.secret);
        }
    }
    wanted.into_iter().filter(|name| !pod.pull_secrets.iter().any(|listed| listed == name)).map(String::from).collect()
}

/// The JSON patch appending `add` after what the Pod lists (nothing removed or reordered).
pub fn patch(pod: &PodView, add: &[String]) -> json_patch::Patch {
    use json_patch::{AddOperation, PatchOperation, jsonptr::PointerBuf};
    let reference = |name: &String| LocalObjectReference { name: name.clone() };
    let operations = match pod.pull_secrets.is_empty() {
        // The list may be absent, or present and empty: either way it is replaced whole.
        true => vec![PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["spec", "imagePullSecrets"]),
            value: serde_json::to_value(add.iter().map(reference).collect::<Vec<_>>()).unwrap_or_default(),
        })],
        false => add
            .iter()
            .map(|name| {
                PatchOperation::Add(AddOperation {
                    path: PointerBuf::from_tokens(["spec", "imagePullSecrets", "-"]),
                    value: serde_json::to_value(reference(name)).unwrap_or_default(),
                })
            })
            .collect(),
    };
    json_patch::Patch(operations)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn offer(secret: &str, servers: &[&str]) -> Offer {
        Offer {
            secret: secret.into(),
            servers: servers.iter().map(|s| s.to_string()).collect(),
            pods: PodMatch::Images,
        }
    }

    fn pod(images: &[&str], listed: &[&str]) -> PodView {
        PodView {
            images: images.iter().map(|s| s.to_string()).collect(),
            pull_secrets: listed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn hub() -> Offer {
        offer("hub", &["https://index.docker.io/v1/", "registry-1.docker.io"])
    }

    #[test]
    fn images_from_two_registries_get_both_secrets_and_no_third() {
        let offers = [offer("ghcr", &["ghcr.io"]), offer("corp", &["registry.corp:5000"]), offer("quay", &["quay.io"])];
        let view = pod(&["ghcr.io/org/app:1", "registry.corp:5000/team/tool@sha256:abc"], &[]);
        assert_eq!(secrets_to_add(&view, &offers), ["corp", "ghcr"]);
    }

    #[test]
    fn every_docker_hub_spelling_gets_the_hub_credential() {
        for image in [
            "nginx",
            "library/nginx:1.27",
            "docker.io/library/nginx",
            "index.docker.io/library/nginx",
            "registry-1.docker.io/library/nginx",
        ] {
            assert_eq!(secrets_to_add(&pod(&[image], &[]), &[hub(), offer("ghcr", &["ghcr.io"])]), ["hub"], "{image}");
        }
    }

    #[test]
    fn an_unmanaged_registry_or_an_unparsable_image_gets_nothing() {
        let offers = [hub(), offer("ghcr", &["ghcr.io"])];
        assert!(secrets_to_add(&pod(&["quay.io/org/app"], &[]), &offers).is_empty());
        assert!(secrets_to_add(&pod(&["Not An Image"], &[]), &offers).is_empty());
        assert!(secrets_to_add(&pod(&[], &[]), &offers).is_empty());
    }

    #[test]
    fn a_secret_already_listed_is_not_added_again() {
        let view = pod(&["ghcr.io/org/app", "nginx"], &["ghcr", "own"]);
        assert_eq!(secrets_to_add(&view, &[hub(), offer("ghcr", &["ghcr.io"])]), ["hub"]);
        assert!(secrets_to_add(&pod(&["ghcr.io/a/b"], &["ghcr"]), &[offer("ghcr", &["ghcr.io"])]).is_empty());
    }

    #[test]
    fn keyring_rules_apply_ports_globs_and_paths() {
        let offers = [offer("glob", &["*.corp.example"]), offer("path", &["quay.io/team"])];
        assert_eq!(secrets_to_add(&pod(&["a.corp.example/x"], &[]), &offers), ["glob"]);
        assert!(secrets_to_add(&pod(&["a.corp.example:5000/x"], &[]), &offers).is_empty(), "another port");
        assert!(secrets_to_add(&pod(&["a.b.corp.example/x"], &[]), &offers).is_empty(), "more labels");
        assert_eq!(secrets_to_add(&pod(&["quay.io/team/app"], &[]), &offers), ["path"]);
        assert!(secrets_to_add(&pod(&["quay.io/other/app"], &[]), &offers).is_empty());
    }

    #[test]
    fn a_label_selector_picks_pods_whatever_their_images() {
        let all = Offer { pods: PodMatch::Labels(Selector::default()), ..offer("all", &["ghcr.io"]) };
        let selector: Selector =
            serde_json::from_value::<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>(
                json!({"matchLabels": {"app": "web"}}),
            )
            .unwrap()
            .try_into()
            .unwrap();
        let web = Offer { pods: PodMatch::Labels(selector), ..offer("web", &["ghcr.io"]) };
        let mut view = pod(&["quay.io/x/y"], &[]);
        assert_eq!(secrets_to_add(&view, &[all.clone(), web.clone()]), ["all"]);
        view.labels.insert("app".into(), "web".into());
        assert_eq!(secrets_to_add(&view, &[all, web]), ["all", "web"]);
    }

    #[test]
    fn the_patch_appends_after_what_the_pod_lists() {
        let add = ["a".to_string(), "b".to_string()];
        let mut document = json!({"spec": {"containers": [], "imagePullSecrets": [{"name": "own"}]}});
        json_patch::patch(&mut document, &patch(&pod(&[], &["own"]), &add)).unwrap();
        assert_eq!(document["spec"]["imagePullSecrets"], json!([{"name": "own"}, {"name": "a"}, {"name": "b"}]));
        for mut document in [json!({"spec": {"containers": []}}), json!({"spec": {"imagePullSecrets": []}})] {
            json_patch::patch(&mut document, &patch(&pod(&[], &[]), &add)).unwrap();
            assert_eq!(document["spec"]["imagePullSecrets"], json!([{"name": "a"}, {"name": "b"}]));
        }
    }

    #[test]
    fn every_container_kind_counts() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"labels": {"app": "x"}},
            "spec": {"initContainers": [{"name": "i", "image": "ghcr.io/a/init"}],
                     "containers": [{"name": "c", "image": "nginx"}],
                     "ephemeralContainers": [{"name": "e", "image": "quay.io/a/debug"}],
                     "imagePullSecrets": [{"name": "own"}]},
        }))
        .unwrap();
        let view = PodView::of(&pod);
        assert_eq!(view.images, ["ghcr.io/a/init", "nginx", "quay.io/a/debug"]);
        assert_eq!(view.pull_secrets, ["own"]);
        assert_eq!(view.labels["app"], "x");
    }
}
