//! Images between nodes, with no registry: each node records the images it holds
//! (`images/<id>`, content addressed); a node that lacks one a replica needs fetches it from a
//! live peer that holds it, over the mutual-TLS API (`GET /peer/v1/images/<id>`), and keeps it
//! only if the image id is the one asked for; else, or when no peer has it, it pulls from the
//! registry. Images a node brought itself (pulled or fetched) are removed once no version of
//! any app (the specs and their histories) needs them, after a grace period.
//!
//! `locate` and `needed` are pure; `Keeper` is the executor's side of it.

use super::images::{Archive, Images};
use super::ContainerRuntime;
use crate::spec::AppSpec;
use crate::state::records::{HeldImage, ImagesRecord, MAX_HELD_IMAGES};
use crate::state::Handle;
use crate::store::{keys, Bytes};
use futures_util::future::BoxFuture;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Where a missing image comes from: a peer, by id.
pub trait Fetch: Send + Sync {
    /// Image `id` from the node whose API is at `addr`.
    fn fetch<'a>(&'a self, addr: &'a str, id: &'a str) -> BoxFuture<'a, Result<Archive, String>>;
}

impl Fetch for crate::peer::PeerClient {
    fn fetch<'a>(&'a self, addr: &'a str, id: &'a str) -> BoxFuture<'a, Result<Archive, String>> {
        Box::pin(async move { self.image(addr, id).await.map_err(|e| e.to_string()) })
    }
}

/// What a reference names in the cluster: one image id and the live peers that hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub id: String,
    /// Live nodes other than this one that hold it, with their API addresses.
    pub holders: Vec<(String, String)>,
}

/// The image `reference` names by the nodes' records. An id names itself; a digest or a tag
/// names the image the most nodes hold under it (nodes may disagree on a tag; the smaller id
/// breaks a tie). `None` when no node holds it.
pub fn locate(
    reference: &str,
    held: &BTreeMap<String, Vec<HeldImage>>,
    addrs: &BTreeMap<String, String>,
    me: &str,
    live: impl Fn(&str) -> bool,
) -> Option<Located> {
    let mut by_id: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (node, images) in held {
        for i in images.iter().filter(|i| i.answers_to(reference)) {
            by_id.entry(&i.id).or_default().push(node);
        }
    }
    let (id, nodes) = if crate::spec::is_image_id(reference) {
        (reference, by_id.remove(reference).unwrap_or_default())
    } else {
        by_id
            .into_iter()
            .max_by(|a, b| a.1.len().cmp(&b.1.len()).then(b.0.cmp(a.0)))?
    };
    let mut holders: Vec<(String, String)> = nodes
        .into_iter()
        .filter(|n| *n != me && live(n))
        .filter_map(|n| Some((n.to_string(), addrs.get(n)?.clone())))
        .collect();
    // Spread fetches of one image over its holders: each node starts at its own place.
    if !holders.is_empty() {
        let start = crate::scheduler::rank(id, 0, me) as usize % holders.len();
        holders.rotate_left(start);
    }
    Some(Located {
        id: id.to_string(),
        holders,
    })
}

/// The image ids (of those held here) that some version of some app needs: its pinned image
/// or its image as named, in the specs and in their histories.
pub fn needed<'a>(
    specs: impl Iterator<Item = &'a AppSpec>,
    held: &[HeldImage],
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for s in specs {
        for r in [s.source.pinned.as_deref(), s.source.image.as_deref()]
            .into_iter()
            .flatten()
        {
            out.extend(
                held.iter()
                    .filter(|i| i.answers_to(r))
                    .map(|i| i.id.clone()),
            );
        }
    }
    out
}

/// Fetches image `id` from the first holder that sends it, loads it (capped as uploads are)
/// and keeps it only if the runtime now holds that very id; names it `tag` when the replica
/// asked by tag. The holder it came from.
pub async fn fetch<R: ContainerRuntime>(
    rt: &R,
    peers: &dyn Fetch,
    cluster: &str,
    id: &str,
    holders: &[(String, String)],
    tag: Option<&str>,
) -> Result<String, String> {
    let mut why = Vec::new();
    for (node, addr) in holders.iter().take(3) {
        let archive = match peers.fetch(addr, id).await {
            Ok(a) => a,
            Err(e) => {
                why.push(format!("{node}: {e}"));
                continue;
            }
        };
        // HTTP/2 delivers 16 KiB frames; Docker takes its upload better in larger pieces.
        let archive = super::images::coalesce(archive, 256 * 1024);
        match super::images::load_checked(rt, cluster, None, archive).await {
            Ok(_) => {}
            Err(e) => {
                why.push(format!("{node}: {}", describe(e)));
                continue;
            }
        }
        match rt.image_id(id).await {
            Ok(Some(got)) if got == id => {}
            _ => {
                // What it sent is not what was asked for: not kept, not used.
                tracing::warn!(peer = %node, image = %id, "a peer sent another image than the one asked for");
                why.push(format!("{node}: sent another image"));
                continue;
            }
        }
        if let Some(t) = tag {
            if let Err(e) = rt.tag(id, &crate::spec::tagged(t)).await {
                why.push(format!("cannot name it {t}: {e}"));
                continue;
            }
        }
        return Ok(node.clone());
    }
    Err(if why.is_empty() {
        "no live node holds it".into()
    } else {
        why.join("; ")
    })
}

fn describe(e: super::images::LoadError) -> String {
    use super::images::LoadError;
    match e {
        LoadError::TooLarge(cap) => format!("over the image size cap ({cap} bytes)"),
        LoadError::Bad(e) | LoadError::Unavailable(e) => crate::error_chain(&e),
        LoadError::InUse(_) => "it would rename images running replicas use".into(),
    }
}

/// How often the node's image record is brought up to date (and at once after a pull or a
/// fetch).
const PUBLISH_EVERY: Duration = Duration::from_secs(10);
/// How often images are considered for removal.
const COLLECT_EVERY: Duration = Duration::from_secs(30);

/// The executor's image bookkeeping: the record it last wrote, the images it brought, and
/// since when each is needed by no app.
pub struct Keeper {
    written: Option<ImagesRecord>,
    published: Option<Instant>,
    collected: Option<Instant>,
    /// Images this node pulled or fetched (ids): the only ones it removes.
    brought: BTreeSet<String>,
    unneeded_since: HashMap<String, Instant>,
    /// How long an image this node brought stays once nothing needs it.
    grace: Duration,
    pub peers: Option<Arc<dyn Fetch>>,
}

impl Keeper {
    /// Picks up where the node's record left off (the images it brought).
    pub fn new(h: &Handle, grace: Duration) -> Keeper {
        let mine = crate::state::records::held_images_record(&h.store, h.me.id.as_str());
        Keeper {
            brought: mine
                .map(|r| r.brought.into_iter().collect())
                .unwrap_or_default(),
            written: None,
            published: None,
            collected: None,
            unneeded_since: HashMap::new(),
            grace,
            peers: None,
        }
    }

    /// An image this node brought: it may remove it later.
    pub fn brought(&mut self, id: String) {
        self.brought.insert(id);
        self.published = None;
    }

    /// Writes the node's image record when it changed (at most every `PUBLISH_EVERY`,
    /// unless `brought` asked for it sooner).
    pub async fn publish<R: Images>(&mut self, rt: &R, h: &Handle, now: Instant) {
        if self
            .published
            .is_some_and(|t| now.duration_since(t) < PUBLISH_EVERY)
        {
            return;
        }
        self.published = Some(now);
        let Ok(held) = rt.held().await else {
            return;
        };
        let held_ids: BTreeSet<&str> = held.iter().map(|i| i.id.as_str()).collect();
        self.brought.retain(|id| held_ids.contains(id.as_str()));
        let record = record_of(held, &self.brought);
        if self.written.as_ref() == Some(&record) {
            return;
        }
        match write(h, &record).await {
            Ok(()) => self.written = Some(record),
            Err(e) => tracing::warn!(err = %e, "cannot record the images this node holds"),
        }
    }

    /// Removes images this node brought that no version of any app has needed for `grace`.
    pub async fn collect<R: ContainerRuntime>(&mut self, rt: &R, specs: &[&AppSpec], now: Instant) {
        if self
            .collected
            .is_some_and(|t| now.duration_since(t) < COLLECT_EVERY.min(self.grace))
        {
            return;
        }
        self.collected = Some(now);
        let Ok(held) = rt.held().await else {
            return;
        };
        let needed = needed(specs.iter().copied(), &held);
        self.unneeded_since.retain(|id, _| !needed.contains(id));
        let mut removed = Vec::new();
        for id in self.brought.iter().filter(|id| !needed.contains(*id)) {
            let since = *self.unneeded_since.entry(id.clone()).or_insert(now);
            if now.duration_since(since) < self.grace {
                continue;
            }
            match rt.remove_image(id).await {
                Ok(()) => {
                    tracing::info!(image = %id, "removed an image no version of any app needs");
                    removed.push(id.clone());
                }
                Err(e) => tracing::debug!(image = %id, err = %e, "image not removed"),
            }
        }
        for id in removed {
            self.brought.remove(&id);
            self.unneeded_since.remove(&id);
            self.published = None;
        }
    }
}

/// A node's image record from what its runtime holds: sorted, capped.
fn record_of(mut held: Vec<HeldImage>, brought: &BTreeSet<String>) -> ImagesRecord {
    held.sort_by(|a, b| a.id.cmp(&b.id));
    for i in &mut held {
        i.tags.sort();
        i.digests.sort();
    }
    held.truncate(MAX_HELD_IMAGES);
    ImagesRecord {
        images: held,
        brought: brought.iter().take(MAX_HELD_IMAGES).cloned().collect(),
    }
}

async fn write(h: &Handle, record: &ImagesRecord) -> Result<(), String> {
    let key = keys::images(h.me.id.as_str()).map_err(|e| e.to_string())?;
    let mut record = record.clone();
    let mut value = serde_json::to_vec(&record).unwrap_or_default();
    // One store value: a node with very many names keeps the first ones.
    while value.len() > crate::store::entry::MAX_VALUE_LEN / 2 && !record.images.is_empty() {
        let keep = record.images.len() * 3 / 4;
        record.images.truncate(keep);
        value = serde_json::to_vec(&record).unwrap_or_default();
    }
    h.write(vec![(key, Some(Bytes::from(value)))])
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Writes the node's image record now, from what the runtime holds (after an upload).
/// Keeps the list of images the node brought as the record has it.
pub async fn publish_now(h: &Handle, rt: &dyn Images) {
    let Ok(held) = rt.held().await else {
        return;
    };
    let brought: BTreeSet<String> =
        crate::state::records::held_images_record(&h.store, h.me.id.as_str())
            .map(|r| r.brought.into_iter().collect())
            .unwrap_or_default();
    if let Err(e) = write(h, &record_of(held, &brought)).await {
        tracing::warn!(err = %e, "cannot record the images this node holds");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(id: &str, tags: &[&str]) -> HeldImage {
        HeldImage {
            id: id.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            digests: Vec::new(),
            size: 1,
        }
    }

    fn id(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn a_reference_is_found_on_live_peers() {
        let (a, b) = (id('a'), id('b'));
        let mut with_digest = img(&a, &["app:1"]);
        with_digest.digests = vec![format!("reg/app@{b}")];
        let held = BTreeMap::from([
            ("n1".to_string(), vec![img(&a, &["app:1"])]),
            ("n2".to_string(), vec![with_digest]),
            ("n3".to_string(), vec![img(&b, &["app:1"])]),
            ("n4".to_string(), vec![img(&a, &["app:1"])]),
        ]);
        let addrs: BTreeMap<String, String> = ["n1", "n2", "n3", "n4"]
            .iter()
            .map(|n| (n.to_string(), format!("{n}:7443")))
            .collect();
        let live = |n: &str| n != "n4";
        // A tag most nodes hold as `a`; this node and dead n4 are not asked.
        let l = locate("app:1", &held, &addrs, "n1", live).unwrap();
        assert_eq!(l.id, a);
        let mut holders: Vec<_> = l.holders.iter().map(|h| h.0.as_str()).collect();
        holders.sort();
        assert_eq!(holders, ["n2"]);
        // By id, whoever holds that id.
        let l = locate(&b, &held, &addrs, "n1", live).unwrap();
        assert_eq!(l.holders, vec![("n3".to_string(), "n3:7443".to_string())]);
        // By registry digest: the id the holder of that digest has.
        let l = locate(&format!("reg/app@{b}"), &held, &addrs, "n1", live).unwrap();
        assert_eq!(l.id, a);
        // `app` alone is `app:latest`, which nobody holds.
        assert!(locate("app", &held, &addrs, "n1", live).is_none());
        // Held only here: located, nobody to fetch from.
        let l = locate(&a, &held, &addrs, "n2", |_| false).unwrap();
        assert!(l.holders.is_empty());
    }

    #[test]
    fn needed_images_are_those_of_any_version() {
        let (a, b, c) = (id('a'), id('b'), id('c'));
        let held = vec![img(&a, &["app:1"]), img(&b, &["app:2"]), img(&c, &[])];
        let spec = |toml: &str| AppSpec::parse(toml).unwrap();
        let now = spec("name = \"x\"\n[source]\nimage = \"app:2\"");
        let earlier = spec(&format!(
            "name = \"x\"\n[source]\nimage = \"app:9\"\npinned = \"{a}\""
        ));
        let n = needed([&now, &earlier].into_iter(), &held);
        assert_eq!(n, BTreeSet::from([a, b]));
    }

    /// Peers that send what the fake runtime's archives hold: the id asked for, or another.
    struct Sends(BTreeMap<String, String>);

    impl Fetch for Sends {
        fn fetch<'a>(
            &'a self,
            addr: &'a str,
            id: &'a str,
        ) -> BoxFuture<'a, Result<Archive, String>> {
            Box::pin(async move {
                use futures_util::StreamExt;
                let sent = match self.0.get(addr) {
                    Some(s) if s == "asked" => id.to_string(),
                    Some(s) => s.clone(),
                    None => return Err("connection refused".into()),
                };
                Ok(futures_util::stream::iter([Ok(Bytes::from(sent))]).boxed())
            })
        }
    }

    #[tokio::test]
    async fn a_fetched_image_is_kept_only_if_it_is_the_one_asked_for() {
        let rt = super::super::fake::FakeRuntime::default();
        let (a, b) = (id('a'), id('b'));
        let peers = Sends(BTreeMap::from([
            ("liar:1".to_string(), b.clone()),
            ("honest:1".to_string(), "asked".to_string()),
        ]));
        let holders = |names: &[&str]| -> Vec<(String, String)> {
            names
                .iter()
                .map(|n| (n.to_string(), format!("{n}:1")))
                .collect()
        };
        // Down, then lying: neither is used.
        let e = fetch(&rt, &peers, "c", &a, &holders(&["down", "liar"]), None)
            .await
            .unwrap_err();
        assert!(
            e.contains("down: connection refused") && e.contains("liar: sent another image"),
            "{e}"
        );
        assert!(!rt.has_image(&a).await.unwrap());
        // The next holder sends it: kept, and named as the replica asked.
        let from = fetch(
            &rt,
            &peers,
            "c",
            &a,
            &holders(&["liar", "honest"]),
            Some("app:1"),
        )
        .await
        .unwrap();
        assert_eq!(from, "honest");
        assert_eq!(rt.image_id(&a).await.unwrap(), Some(a.clone()));
    }
}
