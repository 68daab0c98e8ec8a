//! shoal: the agent that turns a set of machines into one container platform, and the CLI
//! that talks to it. One module per box of ARCHITECTURE.md's diagram.

pub mod membership;
pub mod node;
pub mod sim;
pub mod store;
pub mod sync;
