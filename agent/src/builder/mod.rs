//! From a git push to an image (issue 16, in progress): `hooks` checks and reads GitHub's
//! webhook deliveries; `source` fetches a ref's tree. Building, testing and scanning come next, each
//! build owned by the live node ranking highest by rendezvous hash of (app, source hash).

pub mod context;
pub mod hooks;
pub mod source;
