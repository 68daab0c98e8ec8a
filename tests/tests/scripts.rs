//! The shell scripts a user runs first (`qemu/run`, `tests/run`, `image/build`, ...): their
//! shared stage runner says what failed and where its log is, and exits non-zero; no script
//! can die of SIGPIPE without a word (the `apt-cache madison | head -1` bug that made
//! `qemu/run` exit 141 silently on a machine without QEMU); bad arguments get a usage line.

use shoal_e2e::free_port;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs `script` with tools/stages.sh sourced as log NAME, from a scratch copy of the
/// repository's top (so the test's logs land in a temporary build/log).
fn with_stages(name: &str, script: &str) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tools")).unwrap();
    std::fs::copy(
        repo().join("tools/stages.sh"),
        dir.path().join("tools/stages.sh"),
    )
    .unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(". tools/stages.sh {name}\n{script}"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    (out, dir)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn a_stage_prints_one_line_with_its_time_and_keeps_its_output_in_the_log() {
    let (out, dir) = with_stages(
        "t",
        "stage 'saying hello' echo hello-from-the-stage\necho after",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let first = stdout.lines().next().unwrap();
    assert!(first.starts_with("  saying hello"), "{stdout}");
    assert!(first.trim_end().ends_with(" s"), "no time: {first}");
    assert!(
        !stdout.contains("hello-from-the-stage"),
        "the stage's output reached the terminal: {stdout}"
    );
    let log = std::fs::read_to_string(dir.path().join("build/log/t.log")).unwrap();
    assert!(log.contains("## saying hello"), "{log}");
    assert!(log.contains("hello-from-the-stage"), "{log}");
    assert!(stdout.contains("after"));
}

#[test]
fn a_failing_stage_names_itself_shows_its_last_lines_and_exits_1() {
    let script = "broken() { echo first line; echo the-reason >&2; false; echo not-reached; }\n\
                  stage 'doing a thing' broken\necho not-reached-either";
    let (out, dir) = with_stages("t", script);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(stdout.contains("doing a thing") && stdout.contains("failed after"));
    assert!(!stdout.contains("not-reached"), "{stdout}");
    assert!(stderr.contains("doing a thing failed"), "{stderr}");
    assert!(stderr.contains("| the-reason"), "no log tail: {stderr}");
    // The failing command and its line, from the stage's ERR trap.
    assert!(stderr.contains("`false` failed"), "{stderr}");
    let log = dir.path().join("build/log/t.log");
    assert!(stderr.contains(&format!("full log: {}", log.display())));
}

#[test]
fn a_command_failing_outside_a_stage_is_named_with_its_line() {
    let (out, _dir) = with_stages("t", "true\nls /nonexistent-dir-for-the-test\necho no");
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("\"ls /nonexistent-dir-for-the-test\" failed (exit 2)"),
        "{stderr}"
    );
    assert!(!text(&out.stdout).contains("no"));
}

#[test]
fn a_pipe_cut_short_is_reported_not_silent() {
    // The class of the original bug: the writer of `| head -1` dies of SIGPIPE (141) and
    // pipefail fails the pipe. Even so the script says where.
    let (out, _dir) = with_stages("t", "v=$(yes | head -1)\necho \"got $v\"");
    assert_eq!(out.status.code(), Some(141));
    assert!(text(&out.stderr).contains("failed (exit 141)"));
}

#[test]
fn at_exit_runs_on_failure_too() {
    let (out, dir) = with_stages(
        "t",
        "cleanup() { touch cleaned; }\nat_exit cleanup\nstage 'failing' false",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(dir.path().join("cleaned").exists());
}

/// Every bash script in the repository, by its first line.
fn scripts() -> Vec<PathBuf> {
    let ls = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(repo())
        .output()
        .unwrap();
    let mut out: Vec<PathBuf> = text(&ls.stdout)
        .split('\0')
        .filter(|f| !f.is_empty())
        .map(|f| repo().join(f))
        .filter(|p| {
            std::fs::read(p)
                .map(|b| {
                    b.starts_with(b"#!")
                        && b.split(|c| *c == b'\n')
                            .next()
                            .is_some_and(|l| l.ends_with(b"bash"))
                })
                .unwrap_or(false)
        })
        .collect();
    out.push(repo().join("tools/stages.sh"));
    out.push(repo().join("image/mkosi-env"));
    out
}

#[test]
fn no_script_pipes_into_a_reader_that_stops_early() {
    let scripts = scripts();
    assert!(scripts.len() >= 8, "{scripts:?}");
    let early = ["| head", "|head", "| grep -q", "| grep -m", "| sed q"];
    let mut found = Vec::new();
    for s in &scripts {
        for (n, line) in std::fs::read_to_string(s).unwrap().lines().enumerate() {
            let code = line.split(" #").next().unwrap_or_default();
            if code.trim_start().starts_with('#') {
                continue;
            }
            if let Some(p) = early.iter().find(|p| code.contains(*p)) {
                found.push(format!("{}:{}: {p}: {line}", s.display(), n + 1));
            }
        }
    }
    assert!(
        found.is_empty(),
        "a writer piped into a reader that stops early dies of SIGPIPE under pipefail:\n{}",
        found.join("\n")
    );
}

#[test]
fn every_script_runs_under_errexit_nounset_and_pipefail() {
    for s in scripts() {
        let body = std::fs::read_to_string(&s).unwrap();
        if body.starts_with("#!") {
            assert!(
                body.contains("set -euo pipefail") || body.contains("set -Eeuo pipefail"),
                "{} lacks set -euo pipefail",
                s.display()
            );
        }
    }
}

#[test]
fn bad_arguments_get_a_usage_line_and_a_non_zero_exit() {
    for (script, args) in [
        ("qemu/run", vec!["frobnicate"]),
        ("image/build", vec!["--fast"]),
        ("qemu/cluster", vec!["eleven"]),
    ] {
        let out = Command::new(repo().join(script))
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{script} {args:?} succeeded");
        let stderr = text(&out.stderr);
        assert!(stderr.contains("usage"), "{script} {args:?}: {stderr}");
    }
}

#[test]
fn http_ok_tells_a_200_from_an_error_and_from_a_closed_port() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        for status in ["200 OK", "503 Service Unavailable"] {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 512];
            while !req.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "the request ended early: {}", text(&req));
                req.extend_from_slice(&buf[..n]);
            }
            assert!(text(&req).starts_with("GET /healthz HTTP/1.0\r\n"));
            write!(s, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").unwrap();
        }
    });
    // A server that closes without reading (QEMU's forwarding before the guest listens).
    let rude = TcpListener::bind("127.0.0.1:0").unwrap();
    let rude_port = rude.local_addr().unwrap().port();
    let rude_server = std::thread::spawn(move || {
        for _ in 0..3 {
            drop(rude.accept().unwrap());
        }
    });
    let closed = free_port();
    let (out, _dir) = with_stages(
        "t",
        &format!(
            "http_ok {port} /healthz && echo first-ok\n\
             http_ok {port} /healthz || echo second-refused\n\
             http_ok {closed} /healthz || echo closed-refused\n\
             for i in 1 2 3; do http_ok {rude_port} /healthz || echo rude-refused-$i; done"
        ),
    );
    server.join().unwrap();
    rude_server.join().unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("first-ok"), "{stdout}");
    assert!(stdout.contains("second-refused"), "{stdout}");
    assert!(stdout.contains("closed-refused"), "{stdout}");
    assert!(stdout.contains("rude-refused-3"), "{stdout}");
}
