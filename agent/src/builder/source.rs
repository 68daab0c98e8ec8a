//! An app's source, fetched: a git repository (`https://`, `http://`, `git://` or a local
//! path) at a ref, shallow where the remote allows it, its tree written into a fresh directory,
//! and the commit it was. Through gix, in process: the image carries neither git nor Perl.
//!
//! Blocking (gix's network client is); run it off the async threads. A hostile repository is
//! bounded: its tree is measured from the object headers before a byte is written, and
//! `interrupt` stops a fetch or checkout in progress (the caller's deadline sets it).

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// What a checkout may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_files: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 512 << 20,
            max_files: 100_000,
        }
    }
}

/// A source written out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The commit's full id (hex).
    pub commit: String,
    pub files: usize,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0:?} is not a source shoal fetches: use https://, http://, git:// or a local path")]
    Address(String),
    #[error("{0:?} is not a ref: use a branch, a tag or a full commit id")]
    Ref(String),
    #[error("fetching {url}: {msg}")]
    Fetch { url: String, msg: String },
    #[error("{url} has no {reference:?}")]
    NoSuchRef { url: String, reference: String },
    #[error("writing out {commit}: {msg}")]
    Checkout { commit: String, msg: String },
    #[error("the source at {commit} holds {what}, over the limit of {limit}")]
    TooLarge {
        commit: String,
        what: String,
        limit: String,
    },
}

/// How an address is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Over the network, through gix's transports.
    Remote(String),
    /// A repository on this node's file system, read in place.
    Local(PathBuf),
}

/// Sorts an address. SSH is refused plainly: there is no key to use and no ssh to run.
pub fn origin(git: &str) -> Result<Origin, SourceError> {
    let bad = || SourceError::Address(git.to_string());
    if git.is_empty() || git.len() > 2048 || git.chars().any(|c| c.is_control()) {
        return Err(bad());
    }
    if let Some(path) = git.strip_prefix("file://") {
        return Ok(Origin::Local(PathBuf::from(path)));
    }
    if git.starts_with('/') {
        return Ok(Origin::Local(PathBuf::from(git)));
    }
    let url = gix::url::parse(gix::bstr::BStr::new(git)).map_err(|_| bad())?;
    match url.scheme {
        gix::url::Scheme::Http | gix::url::Scheme::Https | gix::url::Scheme::Git
            if url.host().is_some() =>
        {
            Ok(Origin::Remote(git.to_string()))
        }
        _ => Err(bad()),
    }
}

/// A ref as given: a full commit id, or a name (a branch, a tag, `refs/...`).
fn is_commit_id(reference: &str) -> bool {
    reference.len() == 40 && reference.bytes().all(|b| b.is_ascii_hexdigit())
}

fn check_ref(reference: &str) -> Result<(), SourceError> {
    let ok = !reference.is_empty()
        && reference.len() <= 255
        && (is_commit_id(reference)
            || gix::refs::PartialName::try_from(reference).is_ok()
                && !reference.starts_with('-')
                && !reference.contains(".."));
    if ok {
        Ok(())
    } else {
        Err(SourceError::Ref(reference.to_string()))
    }
}

/// Fetches `reference` of `git` and writes its tree into `dest` (created; must not exist or be
/// empty). `scratch` holds the fetched objects while it runs (a fresh directory, removed after).
pub fn fetch(
    git: &str,
    reference: &str,
    scratch: &Path,
    dest: &Path,
    limits: &Limits,
    interrupt: &AtomicBool,
) -> Result<Fetched, SourceError> {
    check_ref(reference)?;
    let origin = origin(git)?;
    let fetch_err = |e: &dyn std::fmt::Display| SourceError::Fetch {
        url: git.to_string(),
        msg: e.to_string(),
    };
    match origin {
        Origin::Local(path) => {
            let repo =
                gix::open_opts(&path, gix::open::Options::isolated()).map_err(|e| fetch_err(&e))?;
            let commit = resolve(&repo, git, reference)?;
            write_tree(&repo, commit, dest, limits, interrupt)
        }
        Origin::Remote(url) => {
            let _ = std::fs::remove_dir_all(scratch);
            let result = (|| {
                std::fs::create_dir_all(scratch).map_err(|e| fetch_err(&e))?;
                let mut prep = gix::clone::PrepareFetch::new(
                    url.as_str(),
                    scratch,
                    gix::create::Kind::Bare,
                    gix::create::Options::default(),
                    gix::open::Options::isolated(),
                )
                .map_err(|e| fetch_err(&e))?
                .with_shallow(gix::remote::fetch::Shallow::DepthAtRemote(NonZeroU32::MIN));
                prep = if is_commit_id(reference) {
                    prep.with_revision(Some(reference))
                } else {
                    prep.with_ref_name(Some(reference))
                }
                .map_err(|e| fetch_err(&e))?;
                let (repo, _) =
                    prep.fetch_only(gix::progress::Discard, interrupt)
                        .map_err(|e| {
                            let msg = e.to_string();
                            if msg.contains("didn't have any ref")
                                || msg.contains("could not be found")
                            {
                                SourceError::NoSuchRef {
                                    url: git.to_string(),
                                    reference: reference.to_string(),
                                }
                            } else {
                                fetch_err(&e)
                            }
                        })?;
                let commit = repo
                    .head_id()
                    .map_err(|_| SourceError::NoSuchRef {
                        url: git.to_string(),
                        reference: reference.to_string(),
                    })?
                    .detach();
                write_tree(&repo, commit, dest, limits, interrupt)
            })();
            let _ = std::fs::remove_dir_all(scratch);
            result
        }
    }
}

/// The commit `reference` names in a repository opened in place.
fn resolve(
    repo: &gix::Repository,
    git: &str,
    reference: &str,
) -> Result<gix::ObjectId, SourceError> {
    let none = || SourceError::NoSuchRef {
        url: git.to_string(),
        reference: reference.to_string(),
    };
    let id = repo.rev_parse_single(reference).map_err(|_| none())?;
    let commit = id
        .object()
        .map_err(|_| none())?
        .peel_to_commit()
        .map_err(|_| none())?;
    Ok(commit.id)
}

/// Writes the tree of `commit` into `dest`, after measuring it against `limits`.
fn write_tree(
    repo: &gix::Repository,
    commit: gix::ObjectId,
    dest: &Path,
    limits: &Limits,
    interrupt: &AtomicBool,
) -> Result<Fetched, SourceError> {
    let hex = commit.to_string();
    let err = |e: &dyn std::fmt::Display| SourceError::Checkout {
        commit: hex.clone(),
        msg: e.to_string(),
    };
    let tree = repo
        .find_object(commit)
        .map_err(|e| err(&e))?
        .peel_to_tree()
        .map_err(|e| err(&e))?
        .id;
    // Git's own path checks (no `.git`, no `..`, no names Windows or macOS would alias).
    let protect = gix::validate::path::component::Options::default();
    let state = gix::index::State::from_tree(&tree, &repo.objects, protect).map_err(|e| err(&e))?;
    let files = state.entries().len();
    if files > limits.max_files {
        return Err(SourceError::TooLarge {
            commit: hex,
            what: format!("{files} files"),
            limit: limits.max_files.to_string(),
        });
    }
    let mut bytes = 0u64;
    for e in state.entries() {
        if e.mode.is_submodule() {
            continue;
        }
        let header = repo.find_header(e.id).map_err(|e| err(&e))?;
        bytes += header.size();
        if bytes > limits.max_bytes {
            return Err(SourceError::TooLarge {
                commit: hex,
                what: format!("more than {bytes} bytes"),
                limit: format!("{} bytes", limits.max_bytes),
            });
        }
    }
    std::fs::create_dir_all(dest).map_err(|e| err(&e))?;
    let mut index = gix::index::File::from_state(state, dest.join(".shoal-index"));
    let mut opts = repo
        .checkout_options(gix::worktree::stack::state::attributes::Source::IdMapping)
        .map_err(|e| err(&e))?;
    opts.destination_is_initially_empty = true;
    // What the destination's file system does (a bare or isolated repository says nothing of
    // it): scripts keep their executable bit, links stay links.
    opts.fs = gix::fs::Capabilities::probe_dir(dest);
    let objects = repo.objects.clone().into_arc().map_err(|e| err(&e))?;
    let outcome = gix::worktree::state::checkout(
        &mut index,
        dest,
        objects,
        &gix::progress::Discard,
        &gix::progress::Discard,
        interrupt,
        opts,
    )
    .map_err(|e| err(&e))?;
    if let Some(e) = outcome.errors.first() {
        return Err(err(&format!("{}: {}", e.path, e.error)));
    }
    Ok(Fetched {
        commit: hex,
        files,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .output()
            .expect("git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A repository with two commits on main (the second adds `app.py` and a script) and a
    /// tag on the first; its commit ids.
    fn repo(dir: &Path) -> (String, String) {
        std::fs::create_dir_all(dir).unwrap();
        git(dir, &["init", "-q"]);
        std::fs::write(dir.join("requirements.txt"), "flask==3.0.0\n").unwrap();
        git(dir, &["add", "."]);
        git(dir, &["commit", "-q", "-m", "one"]);
        git(dir, &["tag", "v1"]);
        let one = git(dir, &["rev-parse", "HEAD"]);
        std::fs::write(dir.join("app.py"), "print('hi')\n").unwrap();
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("bin/run"), "#!/bin/sh\nexec python app.py\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("bin/run"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        git(dir, &["add", "."]);
        git(dir, &["commit", "-q", "-m", "two"]);
        (one, git(dir, &["rev-parse", "HEAD"]))
    }

    struct Daemon(Child);
    impl Drop for Daemon {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A real `git daemon` serving `base` on loopback; its port.
    fn daemon(base: &Path) -> (Daemon, u16) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("git")
            .args([
                "daemon",
                "--reuseaddr",
                "--export-all",
                "--listen=127.0.0.1",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(base)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("git daemon");
        // Polled for up to 20 s (1000 tries, 20 ms apart).
        let mut tries = 0;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            tries += 1;
            assert!(tries < 1000, "git daemon did not listen");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        (Daemon(child), port)
    }

    fn go(
        git: &str,
        reference: &str,
        work: &Path,
        limits: &Limits,
    ) -> Result<Fetched, SourceError> {
        let dest = work.join(format!("out-{}", rand::random::<u32>()));
        let r = fetch(
            git,
            reference,
            &work.join("scratch"),
            &dest,
            limits,
            &AtomicBool::new(false),
        );
        if let Ok(f) = &r {
            assert!(f.files == 1 || f.files == 3, "{f:?}");
            assert!(
                !work.join("scratch").exists(),
                "the fetched objects stay behind"
            );
            assert!(!dest.join(".git").exists());
            if f.files == 3 {
                assert_eq!(
                    std::fs::read_to_string(dest.join("app.py")).unwrap(),
                    "print('hi')\n"
                );
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(dest.join("bin/run"))
                    .unwrap()
                    .permissions()
                    .mode();
                assert!(
                    mode & 0o111 != 0,
                    "the script lost its executable bit: {mode:o}"
                );
            } else {
                assert!(!dest.join("app.py").exists());
            }
        }
        r
    }

    #[test]
    fn a_branch_a_tag_and_a_commit_come_out_with_their_commit_over_git_and_from_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = repo(&dir.path().join("srv/app"));
        let (_d, port) = daemon(&dir.path().join("srv"));
        let work = dir.path().join("work");
        let lim = Limits::default();
        let remote = format!("git://127.0.0.1:{port}/app");
        // Over the network, shallow: a branch, a tag, a full commit id.
        assert_eq!(go(&remote, "main", &work, &lim).unwrap().commit, two);
        assert_eq!(
            go(&remote, "refs/heads/main", &work, &lim).unwrap().commit,
            two
        );
        assert_eq!(go(&remote, "v1", &work, &lim).unwrap().commit, one);
        assert_eq!(go(&remote, &one, &work, &lim).unwrap().commit, one);
        // In place, from a path on this node.
        let path = dir.path().join("srv/app");
        let local = path.to_str().unwrap();
        assert_eq!(go(local, "main", &work, &lim).unwrap().commit, two);
        assert_eq!(go(local, "v1", &work, &lim).unwrap().commit, one);
        assert_eq!(
            go(&format!("file://{local}"), &two, &work, &lim)
                .unwrap()
                .commit,
            two
        );
        assert_eq!(go(local, &one, &work, &lim).unwrap().commit, one);
    }

    #[test]
    fn a_missing_ref_a_bad_address_and_an_oversized_tree_are_refused_plainly() {
        let dir = tempfile::tempdir().unwrap();
        repo(&dir.path().join("srv/app"));
        let (_d, port) = daemon(&dir.path().join("srv"));
        let work = dir.path().join("work");
        let lim = Limits::default();
        let remote = format!("git://127.0.0.1:{port}/app");
        let local = dir.path().join("srv/app");
        let local = local.to_str().unwrap();
        for (git, r) in [(remote.as_str(), "nope"), (local, "nope")] {
            match go(git, r, &work, &lim) {
                Err(SourceError::NoSuchRef { .. }) => {}
                other => panic!("{git} {r}: {other:?}"),
            }
        }
        // A repository that is not there.
        let e = go(&format!("git://127.0.0.1:{port}/gone"), "main", &work, &lim).unwrap_err();
        assert!(
            matches!(e, SourceError::Fetch { .. } | SourceError::NoSuchRef { .. }),
            "{e}"
        );
        for bad in [
            "git@github.com:o/r.git",
            "ssh://h/r",
            "ftp://h/r",
            "",
            "relative/path",
            "https://",
        ] {
            assert!(
                matches!(go(bad, "main", &work, &lim), Err(SourceError::Address(_))),
                "{bad}"
            );
        }
        for bad in ["", "-x", "a..b", "with space", &"x".repeat(300)] {
            assert!(
                matches!(go(local, bad, &work, &lim), Err(SourceError::Ref(_))),
                "{bad:?}"
            );
        }
        let small = Limits {
            max_bytes: 10,
            max_files: 10,
        };
        let e = go(&remote, "main", &work, &small).unwrap_err();
        assert!(matches!(e, SourceError::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("over the limit of 10 bytes"), "{e}");
        let few = Limits {
            max_bytes: 1 << 20,
            max_files: 2,
        };
        assert!(matches!(
            go(local, "main", &work, &few),
            Err(SourceError::TooLarge { .. })
        ));
    }
}
