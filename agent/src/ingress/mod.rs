//! The ingress: every node a front door for every app (`listen.http`, `listen.https`).
//! `routes` decides which app answers a Host and where its ready replicas are, from the
//! replicated state alone.

pub mod routes;
