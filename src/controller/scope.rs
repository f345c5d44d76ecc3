//! Watches over the controller's scope: every namespace (one cluster-wide watch), or only the
//! namespaces of `--namespaces` (one watch each, merged into one stream), where RBAC grants
//! Secrets and ServiceAccounts through Roles in those namespaces alone.

use std::collections::{BTreeSet, HashMap, HashSet};

use futures::{Stream, StreamExt, stream::BoxStream};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};

/// The namespaces the controller serves; `None`: all of them.
pub type Namespaces = Option<BTreeSet<String>>;

/// A watch of `K` in `scope`, with the event sequence of one watch (see [`merge`]). `prune`
/// drops what the controller does not use from each object as it arrives, before anything
/// (the merge included) keeps it.
pub(super) fn watch<K>(
    client: &Client,
    scope: &Namespaces,
    config: watcher::Config,
    prune: fn(&mut K),
) -> BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
{
    let one = |api: Api<K>| watcher(api, config.clone()).modify(prune);
    match scope {
        None => one(Api::all(client.clone())).boxed(),
        Some(namespaces) => {
            merge(namespaces.iter().map(|ns| one(Api::namespaced(client.clone(), ns))).collect()).boxed()
        }
    }
}

/// What every watched object can lose: its managedFields.
pub(super) fn without_managed_fields<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// Merges several watches into the event sequence of one, which a reflector store and the
/// delete hooks expect: a single `Init … InitDone` once every watch has listed (each watch's
/// first listing is held until then, so the store never swaps in a partial list), and
/// afterwards a relist of one watch as `Apply` of what it lists and `Delete` of what it no
/// longer does (a store swap would drop the other watches' objects).
pub(super) fn merge<K, S>(watches: Vec<S>) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send
where
    K: Resource + Clone + Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let merger = Merger::new(watches.len());
    let tagged = watches.into_iter().enumerate().map(|(i, w)| w.map(move |e| (i, e)).boxed());
    futures::stream::select_all(tagged)
        .scan(merger, |merger, (i, event)| {
            let out: Vec<_> = match event {
                Ok(event) => merger.apply(i, event).into_iter().map(Ok).collect(),
                Err(error) => {
                    let mut out: Vec<_> = match namespace_unreachable(&error) {
                        true => merger.listed_empty(i).into_iter().map(Ok).collect(),
                        false => Vec::new(),
                    };
                    out.push(Err(error));
                    out
                }
            };
            futures::future::ready(Some(futures::stream::iter(out)))
        })
        .flatten()
}

/// Whether a watch's first listing failed because its namespace cannot be read at all: gone
/// (404), or its Role gone with it (403). Such a namespace holds nothing for the controller.
fn namespace_unreachable(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::InitialListFailed(kube::Error::Api(status)) if matches!(status.code, 403 | 404))
}

/// The state of [`merge`]: what each watch holds now, and what it is relisting.
struct Merger<K> {
    watches: Vec<Watch<K>>,
    /// Watches that have not finished their first listing; `None` once all have.
    listing: Option<HashSet<usize>>,
}

struct Watch<K> {
    known: HashMap<String, K>,
    relisting: Option<HashMap<String, K>>,
}

impl<K: Resource + Clone> Merger<K> {
    fn new(count: usize) -> Self {
        let watches = (0..count).map(|_| Watch { known: HashMap::new(), relisting: None }).collect();
        Self { watches, listing: Some((0..count).collect()) }
    }

    /// Watch `i` could not list its namespace: until it can, it counts as having listed
    /// nothing, so the other namespaces' first listing is not held up by it (its own watch
    /// keeps retrying, and lists as a relist once it can).
    fn listed_empty(&mut self, i: usize) -> Vec<watcher::Event<K>> {
        match self.listing.as_ref().is_some_and(|l| l.contains(&i)) {
            true => {
                let mut out = self.apply(i, watcher::Event::Init);
                out.extend(self.apply(i, watcher::Event::InitDone));
                out
            }
            false => Vec::new(),
        }
    }

    /// The merged events that watch `i`'s `event` makes.
    fn apply(&mut self, i: usize, event: watcher::Event<K>) -> Vec<watcher::Event<K>> {
        let live = self.listing.is_none();
        let Some(watch) = self.watches.get_mut(i) else { return Vec::new() };
        let mut out = Vec::new();
        match event {
            watcher::Event::Init => watch.relisting = Some(HashMap::new()),
            watcher::Event::InitApply(object) => {
                if live {
                    out.push(watcher::Event::Apply(object.clone()));
                }
                watch.relisting.get_or_insert_with(HashMap::new).insert(object.name_any(), object);
            }
            watcher::Event::InitDone => {
                let relisted = watch.relisting.take().unwrap_or_default();
                let known = std::mem::replace(&mut watch.known, relisted);
                if live {
                    let gone = known.into_iter().filter(|(name, _)| !watch.known.contains_key(name));
                    out.extend(gone.map(|(_, object)| watcher::Event::Delete(object)));
                } else if let Some(listing) = &mut self.listing {
                    listing.remove(&i);
                    if listing.is_empty() {
                        self.listing = None;
                        out.push(watcher::Event::Init);
                        let all = self.watches.iter().flat_map(|w| w.known.values().cloned());
                        out.extend(all.map(watcher::Event::InitApply));
                        out.push(watcher::Event::InitDone);
                    }
                }
            }
            watcher::Event::Apply(object) => {
                watch.known.insert(object.name_any(), object.clone());
                if live {
                    out.push(watcher::Event::Apply(object));
                }
            }
            watcher::Event::Delete(object) => {
                watch.known.remove(&object.name_any());
                if live {
                    out.push(watcher::Event::Delete(object));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;
    use watcher::Event;

    fn object(namespace: &str, name: &str, version: &str) -> ConfigMap {
        let metadata = ObjectMeta {
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            resource_version: Some(version.into()),
            ..Default::default()
        };
        ConfigMap { metadata, ..Default::default() }
    }

    /// The events as (kind, "namespace/name@version") for comparison.
    fn shown(events: Vec<Event<ConfigMap>>) -> Vec<(&'static str, String)> {
        let id = |o: &ConfigMap| {
            format!(
                "{}/{}@{}",
                o.namespace().unwrap_or_default(),
                o.name_any(),
                o.resource_version().unwrap_or_default()
            )
        };
        events
            .into_iter()
            .map(|e| match e {
                Event::Init => ("Init", String::new()),
                Event::InitApply(o) => ("InitApply", id(&o)),
                Event::InitDone => ("InitDone", String::new()),
                Event::Apply(o) => ("Apply", id(&o)),
                Event::Delete(o) => ("Delete", id(&o)),
            })
            .collect()
    }

    #[test]
    fn one_initial_listing_once_every_watch_has_listed() {
        let mut merger = Merger::new(2);
        assert!(merger.apply(0, Event::Init).is_empty());
        assert!(merger.apply(0, Event::InitApply(object("a", "x", "1"))).is_empty());
        assert!(merger.apply(0, Event::InitDone).is_empty());
        // An update in the first namespace while the second still lists is held, not lost.
        assert!(merger.apply(0, Event::Apply(object("a", "x", "2"))).is_empty());
        assert!(merger.apply(1, Event::Init).is_empty());
        assert!(merger.apply(1, Event::InitApply(object("b", "y", "1"))).is_empty());
        let mut listed = shown(merger.apply(1, Event::InitDone));
        listed[1..3].sort();
        assert_eq!(
            listed,
            [
                ("Init", String::new()),
                ("InitApply", "a/x@2".into()),
                ("InitApply", "b/y@1".into()),
                ("InitDone", String::new())
            ]
        );
    }

    #[test]
    fn a_relist_applies_what_it_lists_and_deletes_what_it_lost_in_its_namespace_only() {
        let mut merger = Merger::new(2);
        for (i, ns) in [(0, "a"), (1, "b")] {
            merger.apply(i, Event::Init);
            merger.apply(i, Event::InitApply(object(ns, "keep", "1")));
            merger.apply(i, Event::InitApply(object(ns, "gone", "1")));
            merger.apply(i, Event::InitDone);
        }
        // Watch 0 loses its connection and relists: "gone" was deleted meanwhile.
        assert!(merger.apply(0, Event::Init).is_empty());
        assert_eq!(shown(merger.apply(0, Event::InitApply(object("a", "keep", "3")))), [("Apply", "a/keep@3".into())]);
        assert_eq!(shown(merger.apply(0, Event::InitDone)), [("Delete", "a/gone@1".into())]);
        // The other namespace's objects are untouched, and live events pass through.
        assert_eq!(shown(merger.apply(1, Event::Delete(object("b", "gone", "2")))), [("Delete", "b/gone@2".into())]);
        assert_eq!(shown(merger.apply(1, Event::Apply(object("b", "new", "4")))), [("Apply", "b/new@4".into())]);
        assert!(merger.apply(7, Event::Init).is_empty(), "an unknown watch is ignored");
    }

    /// Issue 20, item 9: a served namespace that is gone (its list refused) does not hold up
    /// the first listing of the others; when it can list again, that is a relist.
    #[test]
    fn a_namespace_that_cannot_be_listed_counts_as_empty() {
        let refused = |code: u16| {
            let status = kube::core::Status::failure("refused", "Refused").with_code(code);
            watcher::Error::InitialListFailed(kube::Error::Api(Box::new(status)))
        };
        assert!(namespace_unreachable(&refused(403)) && namespace_unreachable(&refused(404)));
        assert!(!namespace_unreachable(&refused(500)), "a failing apiserver is no empty namespace");
        let mut merger = Merger::new(2);
        merger.apply(0, Event::Init);
        merger.apply(0, Event::InitApply(object("a", "x", "1")));
        assert!(merger.listed_empty(1).is_empty(), "the first namespace is still listing");
        let listed = shown(merger.apply(0, Event::InitDone));
        assert_eq!(listed, [("Init", String::new()), ("InitApply", "a/x@1".into()), ("InitDone", String::new())]);
        assert!(merger.listed_empty(1).is_empty(), "counted once");
        merger.apply(1, Event::Init);
        assert_eq!(shown(merger.apply(1, Event::InitApply(object("gone", "y", "2")))), [("Apply", "gone/y@2".into())]);
    }

    #[tokio::test]
    async fn merged_streams_keep_errors_and_order_per_watch() {
        let a = futures::stream::iter(vec![
            Ok(Event::Init),
            Ok(Event::InitApply(object("a", "x", "1"))),
            Ok(Event::InitDone),
            Err(watcher::Error::NoResourceVersion),
            Ok(Event::Apply(object("a", "x", "2"))),
        ]);
        let b = futures::stream::iter(vec![Ok(Event::Init), Ok(Event::InitDone)]);
        let events: Vec<_> = merge(vec![a.boxed(), b.boxed()]).collect().await;
        let errors = events.iter().filter(|e| e.is_err()).count();
        let ok: Vec<_> = events.into_iter().filter_map(Result::ok).collect();
        assert_eq!(errors, 1);
        let ok = shown(ok);
        let init_done = ok.iter().position(|e| e.0 == "InitDone").expect("one listing");
        assert_eq!(ok[..=init_done].iter().filter(|e| e.0 == "InitApply").count(), 1);
        // a/x@2 comes after the listing, as an Apply, or inside it, if it came first.
        assert!(ok.iter().any(|e| e.1 == "a/x@2"));
    }
}
