//! shoal: the agent that turns a set of machines into one container platform, and the CLI
//! that talks to it. One module per box of ARCHITECTURE.md's diagram; `node` composes the
//! sans-IO parts, `state` is what the other modules hold of a running node, `daemon` is the
//! composition root and the tokio shell around them, `sim` runs them in virtual time. The
//! repository's ARCHITECTURE.md has the code map and the invariants.

pub mod api;
pub mod autoscale;
pub mod builder;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod discovery;
pub mod executor;
pub mod http;
pub mod identity;
pub mod ingress;
pub mod membership;
pub mod node;
pub mod peer;
pub mod rollout;
pub mod scheduler;
pub mod sim;
pub mod spec;
pub mod state;
pub mod store;
pub mod sync;
pub mod tls;

/// This build's version, as `/v1/status`, `/metrics` and the CLI show it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// An error and its sources on one line ("client error (Connect): invalid peer certificate:
/// UnknownIssuer"), so a refused handshake says why in the log.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
