//! Images a node is handed (`POST /v1/images`: a `docker save` archive, no registry), loaded
//! into its runtime safely: the archive is capped in size as it streams, and a load that would
//! move a name this cluster's running replicas use to another image is undone and refused.
//! The runtime side is the `Images` trait (Docker's in `docker`, a fake in tests); the policy
//! is `load_checked`.

use super::ExecutorError;
use crate::state::records::HeldImage;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{BoxStream, StreamExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Image names in use, each with the image id it runs and an app that runs it.
pub type InUse = HashMap<String, (String, String)>;

/// An image archive as it arrives.
pub type Archive = BoxStream<'static, Result<Bytes, BoxError>>;

/// What a container runtime does with images. Object safe, so the API holds one without
/// knowing which runtime it is.
pub trait Images: Send + Sync {
    /// The most bytes one archive may have.
    fn max_image_bytes(&self) -> u64;
    /// Loads an archive; the names (or ids) loaded.
    fn load(&self, archive: Archive) -> BoxFuture<'_, Result<Vec<String>, ExecutorError>>;
    /// The image names `cluster`'s running containers were made from (`:latest` added where
    /// no tag is named), each with the image id it runs and an app that runs it.
    fn images_in_use<'a>(&'a self, cluster: &'a str)
        -> BoxFuture<'a, Result<InUse, ExecutorError>>;
    /// The id `name` points at now, if it names an image.
    fn image_id<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, ExecutorError>>;
    /// Points `name` (`repo:tag`) at image `id`.
    fn tag<'a>(&'a self, id: &'a str, name: &'a str) -> BoxFuture<'a, Result<(), ExecutorError>>;
    /// Every image the runtime holds, content addressed.
    fn held(&self) -> BoxFuture<'_, Result<Vec<HeldImage>, ExecutorError>>;
    /// Image `id` as a `docker save` archive (no names in it: the receiver names it).
    fn save<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Archive, ExecutorError>>;
    /// What `reference` names in its registry now, as `repo@sha256:<digest>`; `None` when
    /// the registry does not know it or cannot be reached.
    fn resolve<'a>(
        &'a self,
        reference: &'a str,
        auth: Option<super::RegistryAuth>,
    ) -> BoxFuture<'a, Option<String>>;
    /// Removes image `id` and its names, unless a container uses it.
    fn remove_image<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), ExecutorError>>;
}

/// Why a load was refused.
#[derive(Debug)]
pub enum LoadError {
    /// Over `max_image_bytes` (the cap).
    TooLarge(u64),
    /// Not an image archive.
    Bad(ExecutorError),
    /// The runtime does not answer.
    Unavailable(ExecutorError),
    /// Names running replicas use, each with the app: put back where they were.
    InUse(Vec<(String, String)>),
}

pub use crate::spec::tagged as full_name;

/// Loads `archive` (at most `declared` bytes, when the client said) for `cluster`; the names
/// loaded and the bytes read.
pub async fn load_checked(
    images: &dyn Images,
    cluster: &str,
    declared: Option<u64>,
    archive: BoxStream<'static, Result<Bytes, BoxError>>,
) -> Result<(Vec<String>, u64), LoadError> {
    let cap = images.max_image_bytes();
    if declared.is_some_and(|n| n > cap) {
        return Err(LoadError::TooLarge(cap));
    }
    let in_use = images
        .images_in_use(cluster)
        .await
        .map_err(LoadError::Unavailable)?;
    let seen = Arc::new(AtomicU64::new(0));
    let over = Arc::new(AtomicBool::new(false));
    let (seen2, over2) = (seen.clone(), over.clone());
    let capped = archive
        .map(move |item| {
            let d = item?;
            let total = seen2.fetch_add(d.len() as u64, Ordering::Relaxed) + d.len() as u64;
            if total > cap {
                over2.store(true, Ordering::Relaxed);
                return Err(BoxError::from("the archive is over the image size cap"));
            }
            Ok(d)
        })
        .boxed();
    let loaded = match images.load(capped).await {
        Ok(l) => l,
        Err(_) if over.load(Ordering::Relaxed) => return Err(LoadError::TooLarge(cap)),
        Err(e @ ExecutorError::Load(_)) => return Err(LoadError::Bad(e)),
        Err(e) => return Err(LoadError::Unavailable(e)),
    };
    let mut clashes = Vec::new();
    for name in &loaded {
        let Some((was, app)) = in_use.get(&full_name(name)) else {
            continue;
        };
        match images.image_id(name).await {
            Ok(Some(now)) if now != *was => {
                if let Err(e) = images.tag(was, name).await {
                    tracing::error!(image = %name, err = %e, "cannot put an image name back");
                }
                clashes.push((name.clone(), app.clone()));
            }
            _ => {}
        }
    }
    if !clashes.is_empty() {
        return Err(LoadError::InUse(clashes));
    }
    Ok((loaded, seen.load(Ordering::Relaxed)))
}

/// `archive` in chunks of at least `min` bytes (the last may be smaller): a stream read off a
/// socket comes in pieces of a few KiB, and every piece costs a frame or a chunk downstream.
pub fn coalesce(archive: Archive, min: usize) -> Archive {
    use bytes::BytesMut;
    futures_util::stream::unfold((archive, false), move |(mut archive, done)| async move {
        if done {
            return None;
        }
        let mut buf = BytesMut::new();
        loop {
            match archive.next().await {
                Some(Ok(d)) => {
                    buf.extend_from_slice(&d);
                    if buf.len() >= min {
                        return Some((Ok(buf.freeze()), (archive, false)));
                    }
                }
                Some(Err(e)) => return Some((Err(e), (archive, true))),
                None if buf.is_empty() => return None,
                None => return Some((Ok(buf.freeze()), (archive, true))),
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn coalesced_chunks_keep_every_byte_in_order() {
        let pieces: Vec<Result<Bytes, BoxError>> =
            (0u8..10).map(|i| Ok(Bytes::from(vec![i; 3]))).collect();
        let out: Vec<Bytes> = coalesce(futures_util::stream::iter(pieces).boxed(), 7)
            .map(|c| c.unwrap())
            .collect()
            .await;
        assert_eq!(
            out.iter().map(|c| c.len()).collect::<Vec<_>>(),
            [9, 9, 9, 3]
        );
        let all: Vec<u8> = out.concat();
        let want: Vec<u8> = (0u8..10).flat_map(|i| [i; 3]).collect();
        assert_eq!(all, want);
        // An error ends the stream after it.
        let failing: Vec<Result<Bytes, BoxError>> =
            vec![Ok(Bytes::from_static(b"ab")), Err("cut".into())];
        let out: Vec<_> = coalesce(futures_util::stream::iter(failing).boxed(), 7)
            .collect()
            .await;
        assert_eq!(out.len(), 1);
        assert!(out[0].is_err());
    }
}
