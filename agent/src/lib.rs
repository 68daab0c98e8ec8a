//! shoal: the agent that turns a set of machines into one container platform, and the CLI
//! that talks to it. One module per box of ARCHITECTURE.md's diagram; `node` composes the
//! sans-IO parts, `daemon` is the tokio shell around them, `sim` runs them in virtual time.

pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod discovery;
pub mod executor;
pub mod identity;
pub mod membership;
pub mod node;
pub mod scheduler;
pub mod sim;
pub mod spec;
pub mod store;
pub mod sync;
pub mod tls;
