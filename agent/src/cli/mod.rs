//! The command line: `shoal agent` runs the daemon; the other verbs of ARCHITECTURE.md talk
//! to a running cluster (`client`) and arrive with the issues that own them.

pub mod client;

use crate::config::AgentConfig;
use crate::daemon;
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// Where init leaves the node's config on a shoal machine.
pub const NODE_JSON: &str = "/run/shoal/node.json";

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "A container platform for when Kubernetes is too much"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Verb,
    #[command(flatten)]
    pub connect: client::Connect,
    /// Output: text for people, json for scripts.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Verb {
    /// Generate cluster material.
    #[command(subcommand)]
    Gen(Gen),
    /// The cluster's nodes.
    #[command(subcommand)]
    Nodes(Nodes),
    /// Cluster-wide settings.
    #[command(subcommand)]
    Cluster(ClusterVerb),
    /// Run the agent (normally started by shoal-init).
    Agent {
        /// Config file (TOML, or JSON if it ends in .json). Default: /run/shoal/node.json if
        /// present, else built-in defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum Nodes {
    /// Evict a node: its identity is revoked cluster-wide, its connections and entries are
    /// refused within seconds, and its id can never join again.
    #[command(after_help = "Example:\n  shoal --bundle ./prod nodes rm node3")]
    Rm { id: String },
}

#[derive(Subcommand)]
pub enum ClusterVerb {
    /// Put a new join secret in force: the bundle (--bundle, required) gets the new secret,
    /// the data key re-wrapped for it and new user-data; every node then admits only holders
    /// of the new secret. Nodes already in keep running; sealed secrets stay readable.
    #[command(
        after_help = "Example:\n  shoal --bundle ./prod --addr 10.0.0.5:7443 cluster rotate-join-secret"
    )]
    RotateJoinSecret,
}

#[derive(Subcommand)]
pub enum Gen {
    /// Write a new cluster bundle: CA, join secret, admin token, and user-data for member
    /// nodes (user-data.yaml) and for signing nodes (user-data-signer.yaml).
    Cluster {
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
        /// Peers to put in user-data (host:port), for clouds without multicast.
        #[arg(long = "peer")]
        peers: Vec<String>,
        /// Replace a bundle already in OUT.
        #[arg(long)]
        force: bool,
        /// Also print the admin token (it is always in OUT/admin.token).
        #[arg(long)]
        print_token: bool,
    },
    /// Print a new random token.
    Token,
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Verb::Agent { config } => agent(config),
        Verb::Nodes(Nodes::Rm { id }) => {
            let path = format!("/v1/nodes/{id}");
            let a = cli.connect.client()?.request("DELETE", &path, Vec::new())?;
            if !a.status.is_success() {
                anyhow::bail!("cannot evict {id}: {}", a.message());
            }
            let v = a.json();
            match cli.output {
                Output::Json => println!("{v}"),
                Output::Text if v["already"] == true => println!("node {id} was already evicted"),
                Output::Text => println!(
                    "node {id} evicted: every node refuses its connections and its id from now on"
                ),
            }
            Ok(())
        }
        Verb::Cluster(ClusterVerb::RotateJoinSecret) => {
            rotate_join_secret(&cli.connect, cli.output)
        }
        Verb::Gen(Gen::Token) => {
            println!("{}", crate::identity::random_secret());
            Ok(())
        }
        Verb::Gen(Gen::Cluster {
            name,
            out,
            peers,
            force,
            print_token,
        }) => {
            let b = crate::identity::Bundle::generate(&name, crate::clock::wall_ms())?;
            b.write(&out, &peers, force)?;
            println!(
                "cluster {} ({}): bundle written to {}",
                b.cluster.name,
                b.cluster.id,
                out.display()
            );
            println!("  admin token: {}/admin.token", out.display());
            println!(
                "  user-data:   {}/user-data.yaml for member nodes (join secret, no CA key, no admin token)",
                out.display()
            );
            println!(
                "               {}/user-data-signer.yaml for the nodes that admit new ones (adds the CA key)",
                out.display()
            );
            if print_token {
                println!("{}", b.admin_token);
            }
            Ok(())
        }
    }
}

/// Rotates the join secret: the new secret is kept beside the bundle until the cluster took
/// it, so a failure on either side loses nothing.
fn rotate_join_secret(connect: &client::Connect, output: Output) -> anyhow::Result<()> {
    use crate::identity::{self, Bundle};
    let Some(dir) = connect.bundle.clone() else {
        anyhow::bail!("rotating the join secret needs the cluster's bundle: pass --bundle DIR");
    };
    let old = Bundle::load(&dir)?;
    let new = old.rotate_join().map_err(|e| {
        anyhow::anyhow!("cannot open the data key with the bundle's join secret: {e}")
    })?;
    let peers = std::fs::read_to_string(dir.join("user-data.yaml"))
        .ok()
        .and_then(|t| identity::parse_user_data(&t).ok())
        .map(|u| u.peers)
        .unwrap_or_default();
    let pending = "join.secret.new";
    identity::write_file(&dir, pending, &(new.join_secret.clone() + "\n"), true)?;
    let a = connect.client()?.request(
        "PUT",
        "/v1/cluster/join-secret",
        new.join_secret.clone().into_bytes(),
    );
    let a = match a {
        Ok(a) if a.status.is_success() => a,
        other => {
            let _ = std::fs::remove_file(dir.join(pending));
            return Err(match other {
                Ok(a) => {
                    anyhow::anyhow!("the cluster refused the new join secret: {}", a.message())
                }
                Err(e) => e.context("the cluster was not told; nothing changed"),
            });
        }
    };
    new.write(&dir, &peers, true)?;
    let _ = std::fs::remove_file(dir.join(pending));
    let fingerprint = identity::join::fingerprint(&new.join_secret, &new.cluster.id);
    match output {
        Output::Json => println!("{}", a.json()),
        Output::Text => {
            println!(
                "join secret rotated (fingerprint {fingerprint}); {} updated:",
                dir.display()
            );
            println!(
                "  join.secret, {}, user-data.yaml, user-data-signer.yaml",
                identity::DATA_KEY_FILE
            );
            println!("  new nodes need the new user-data; nodes already in keep running");
        }
    }
    Ok(())
}

fn load_config(path: Option<PathBuf>) -> anyhow::Result<AgentConfig> {
    let path = path.or_else(|| {
        let p = PathBuf::from(NODE_JSON);
        p.exists().then_some(p)
    });
    match path {
        Some(p) => AgentConfig::load(&p).with_context(|| format!("loading {}", p.display())),
        None => Ok(AgentConfig::default()),
    }
}

fn agent(config: Option<PathBuf>) -> anyhow::Result<()> {
    let cfg = load_config(config)?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal; init's log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested");
            stop.cancel();
        });
        daemon::agent::run(cfg, shutdown).await
    })?;
    Ok(())
}

/// Every connection costs a descriptor: the open-file limit (1024 soft, 4096 hard for a
/// service of PID 1) goes up to 65 536 where the agent may (as root, in the image), else to
/// the hard limit, so idle or hostile clients meet the listeners' caps, not the process's.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    const WANT: u64 = 65_536;
    let lim = getrlimit(Resource::Nofile);
    let (soft, hard) = (lim.current, lim.maximum);
    if soft.is_some_and(|s| s >= WANT) || soft.is_none() {
        return;
    }
    let wide = hard.map_or(WANT, |h| h.max(WANT));
    let raised = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(wide),
            maximum: Some(wide),
        },
    )
    .map(|()| wide)
    .or_else(|_| {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: hard,
                maximum: hard,
            },
        )
        .map(|()| hard.unwrap_or(WANT))
    });
    match raised {
        Ok(to) => tracing::info!(from = ?soft, to, "raised the open-file limit"),
        Err(e) => tracing::warn!(err = %e, "cannot raise the open-file limit"),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
