//! GitHub webhook deliveries (`POST /v1/hooks/github`, no bearer): a delivery counts only
//! when `X-Hub-Signature-256` is the HMAC-SHA256 of the exact body under the app's webhook
//! secret (compared in constant time, as GitHub's documentation asks); then a `ping` is
//! answered and a `push` to the ref and repository an app builds from names the commit to
//! build. Everything else is ignored.

use serde::Deserialize;

/// The header carrying `sha256=<hex of the HMAC>`.
pub const SIGNATURE: &str = "x-hub-signature-256";
/// The header naming the event (`ping`, `push`, …).
pub const EVENT: &str = "x-github-event";

/// Why a delivery is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    #[error("no X-Hub-Signature-256 header")]
    Unsigned,
    #[error("X-Hub-Signature-256 is not sha256=<64 hex digits>")]
    Malformed,
    #[error("X-Hub-Signature-256 does not match the body under the app's webhook secret")]
    Mismatch,
    #[error("the body is not a GitHub {event} event: {why}")]
    Body { event: String, why: String },
}

/// Checks a delivery's signature header against `body` under `secret`.
pub fn verify(secret: &[u8], body: &[u8], header: Option<&str>) -> Result<(), HookError> {
    let header = header.ok_or(HookError::Unsigned)?.trim();
    let hex = header.strip_prefix("sha256=").ok_or(HookError::Malformed)?;
    let tag = unhex(hex).ok_or(HookError::Malformed)?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::verify(&key, body, &tag).map_err(|_| HookError::Mismatch)
}

/// 32 bytes from 64 hex digits, either case.
fn unhex(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// What a (verified) delivery says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Sent when a webhook is made: answered, nothing built.
    Ping,
    /// Commits pushed to `git_ref` (`refs/heads/main`, `refs/tags/v1`) of a repository known
    /// by `urls` (its clone, git, SSH and web addresses), now at `commit`; `deleted` when the
    /// push removed the ref.
    Push {
        git_ref: String,
        commit: String,
        urls: Vec<String>,
        deleted: bool,
    },
    /// Any other event: acknowledged and ignored.
    Other(String),
}

#[derive(Deserialize)]
struct PushBody {
    #[serde(rename = "ref")]
    git_ref: String,
    after: String,
    #[serde(default)]
    deleted: bool,
    repository: Repository,
}

#[derive(Deserialize)]
struct Repository {
    clone_url: Option<String>,
    git_url: Option<String>,
    ssh_url: Option<String>,
    html_url: Option<String>,
}

/// Reads a verified delivery of event `event`.
pub fn parse(event: &str, body: &[u8]) -> Result<Event, HookError> {
    match event {
        "ping" => Ok(Event::Ping),
        "push" => {
            let p: PushBody = serde_json::from_slice(body).map_err(|e| HookError::Body {
                event: event.into(),
                why: e.to_string(),
            })?;
            let r = p.repository;
            let urls = [r.clone_url, r.git_url, r.ssh_url, r.html_url]
                .into_iter()
                .flatten()
                .collect();
            let deleted = p.deleted || p.after.bytes().all(|b| b == b'0');
            Ok(Event::Push {
                git_ref: p.git_ref,
                commit: p.after,
                urls,
                deleted,
            })
        }
        other => Ok(Event::Other(other.into())),
    }
}

/// The commit a push asks an app to build: one that is not a deletion, to the app's
/// repository (`source.git`, matched to any of the repository's addresses) and to its ref
/// (`source.ref`, a branch or tag name or a full `refs/…`; `main` when unset).
pub fn commit_for<'a>(event: &'a Event, git: &str, git_ref: Option<&str>) -> Option<&'a str> {
    let Event::Push {
        git_ref: pushed,
        commit,
        urls,
        deleted: false,
    } = event
    else {
        return None;
    };
    let wanted = git_ref.unwrap_or("main");
    let ref_matches = pushed == wanted
        || pushed.strip_prefix("refs/heads/") == Some(wanted)
        || pushed.strip_prefix("refs/tags/") == Some(wanted);
    let repo = same_repo_key(git);
    (ref_matches && urls.iter().any(|u| same_repo_key(u) == repo)).then_some(commit.as_str())
}

/// A repository address reduced to what names the repository: host and path, lowercase,
/// without scheme, user, `.git` or trailing slash (`git@github.com:acme/hello.git` and
/// `https://github.com/acme/hello` are the same).
fn same_repo_key(url: &str) -> String {
    let u = url.trim();
    let rest = match u.split_once("://") {
        Some((_, rest)) => rest.to_string(),
        // scp-like `user@host:path`
        None => u.replacen(':', "/", 1),
    };
    // A user (`git@`) is in the host part only; an `@` further on is the path's.
    let (host, path) = rest.split_once('/').unwrap_or((rest.as_str(), ""));
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let path = path.trim_end_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    format!("{host}/{path}").to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn githubs_documented_example_verifies_and_nothing_else_does() {
        // docs.github.com, "Validating webhook deliveries": this secret, this payload.
        let secret = b"It's a Secret to Everybody";
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(verify(secret, b"Hello, World!", Some(sig)), Ok(()));
        assert_eq!(
            verify(
                secret,
                b"Hello, World!",
                Some(&sig.to_uppercase().replace("SHA256=", "sha256="))
            ),
            Ok(())
        );
        assert_eq!(
            verify(secret, b"Hello, World?", Some(sig)),
            Err(HookError::Mismatch)
        );
        assert_eq!(
            verify(b"another", b"Hello, World!", Some(sig)),
            Err(HookError::Mismatch)
        );
        assert_eq!(
            verify(secret, b"Hello, World!", None),
            Err(HookError::Unsigned)
        );
        for bad in [
            "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
            "sha1=757107ea0eb2509fc211221cce984b8a37570b6d",
            "sha256=757107ea",
            "sha256=zz7107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e1é",
        ] {
            assert_eq!(
                verify(secret, b"Hello, World!", Some(bad)),
                Err(HookError::Malformed),
                "{bad}"
            );
        }
    }

    fn push(git_ref: &str, after: &str) -> Vec<u8> {
        serde_json::json!({
            "ref": git_ref,
            "before": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
            "after": after,
            "deleted": false,
            "repository": {
                "full_name": "acme/hello",
                "clone_url": "https://github.com/acme/hello.git",
                "git_url": "git://github.com/acme/hello.git",
                "ssh_url": "git@github.com:acme/hello.git",
                "html_url": "https://github.com/acme/hello"
            },
            "commits": []
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn a_push_to_the_apps_repository_and_ref_names_its_commit_and_others_do_not() {
        let c = "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c";
        let e = parse("push", &push("refs/heads/main", c)).unwrap();
        for git in [
            "https://github.com/acme/hello.git",
            "https://github.com/Acme/hello/",
            "git@github.com:acme/hello.git",
            "ssh://git@github.com/acme/hello",
        ] {
            assert_eq!(commit_for(&e, git, Some("main")), Some(c), "{git}");
            assert_eq!(commit_for(&e, git, None), Some(c), "{git}");
        }
        assert_eq!(
            commit_for(&e, "https://github.com/acme/hello", Some("refs/heads/main")),
            Some(c)
        );
        assert_eq!(
            commit_for(&e, "https://github.com/acme/hello", Some("dev")),
            None
        );
        assert_eq!(
            commit_for(&e, "https://github.com/acme/other", Some("main")),
            None
        );
        assert_eq!(
            commit_for(&e, "https://gitlab.com/acme/hello", Some("main")),
            None
        );
        // An `@` in the path names another repository, not a user.
        assert_eq!(
            commit_for(
                &e,
                "https://example.org/x@github.com/acme/hello",
                Some("main")
            ),
            None
        );
        let tag = parse("push", &push("refs/tags/v1.2", c)).unwrap();
        assert_eq!(
            commit_for(&tag, "https://github.com/acme/hello", Some("v1.2")),
            Some(c)
        );
        assert_eq!(
            commit_for(&tag, "https://github.com/acme/hello", Some("main")),
            None
        );
        // A deleted branch builds nothing.
        let gone = parse("push", &push("refs/heads/main", &"0".repeat(40))).unwrap();
        assert!(matches!(gone, Event::Push { deleted: true, .. }));
        assert_eq!(
            commit_for(&gone, "https://github.com/acme/hello", Some("main")),
            None
        );
    }

    #[test]
    fn ping_and_other_events_are_known_and_a_broken_push_is_an_error() {
        assert_eq!(
            parse("ping", b"{\"zen\":\"Keep it logically awesome.\"}"),
            Ok(Event::Ping)
        );
        assert_eq!(parse("issues", b"{}"), Ok(Event::Other("issues".into())));
        assert!(commit_for(&Event::Ping, "https://github.com/acme/hello", None).is_none());
        let err = parse("push", b"{\"ref\": 3}").unwrap_err();
        assert!(matches!(err, HookError::Body { .. }), "{err}");
        assert!(parse("push", b"not json").is_err());
    }
}
