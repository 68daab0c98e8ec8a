//! A fetched source as a Docker build context: its own Dockerfile, or one written for what the
//! source is — Python (`requirements.txt`), Node (`package.json`), Rust (`Cargo.toml`), Go
//! (`go.mod`) or a static site (`index.html`) — on base images the cluster chooses (tests use
//! images built here), packed as the tar the engine's build API takes.
//!
//! The pack never follows a link out of the source (links go in as links), leaves `.git`
//! out, and stops at the source's own limits.

use crate::spec;
use serde::{Deserialize, Serialize};
use std::path::{Component, Path};

/// The name a written Dockerfile takes in the context (a source's own file of that name is
/// replaced, which a source has no reason to hold).
pub const GENERATED: &str = ".shoal.Dockerfile";

/// Base images of written Dockerfiles (to be read from the agent config with the builder).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Bases {
    pub python: String,
    pub node: String,
    /// Compiles Rust; the program then runs on `runtime`.
    pub rust: String,
    /// Compiles Go; the program then runs on `runtime`.
    pub go: String,
    pub runtime: String,
    /// Serves a static site with busybox's `httpd` on port 8080.
    pub statics: String,
}

impl Default for Bases {
    fn default() -> Self {
        Bases {
            python: "python:3.12-slim".into(),
            node: "node:22-slim".into(),
            rust: "rust:1-slim".into(),
            go: "golang:1".into(),
            runtime: "debian:bookworm-slim".into(),
            statics: "busybox:stable".into(),
        }
    }
}

/// What a source is, as far as building it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// The source's own Dockerfile, by its path in the source.
    Dockerfile(String),
    Python,
    Node,
    /// A Rust package and the binary it builds.
    Rust(String),
    Go,
    Static,
}

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Dockerfile(_) => "dockerfile",
            Kind::Python => "python",
            Kind::Node => "node",
            Kind::Rust(_) => "rust",
            Kind::Go => "go",
            Kind::Static => "static",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContextError {
    #[error("build.dockerfile {0:?} is not a file in the source")]
    NoDockerfile(String),
    #[error("build.dockerfile {0:?}: a relative path inside the source, please")]
    BadDockerfile(String),
    #[error(
        "the source has no Dockerfile, and none of requirements.txt, package.json, Cargo.toml, go.mod or index.html to write one for"
    )]
    Unknown,
    #[error(
        "{0}: nothing says how to start it: set [run] command, or add a Procfile with a web: line"
    )]
    NoCommand(&'static str),
    #[error("Cargo.toml: {0}")]
    Cargo(String),
    #[error("packing the source: {0}")]
    Pack(String),
}

fn is_file(dir: &Path, name: &str) -> bool {
    std::fs::symlink_metadata(dir.join(name)).is_ok_and(|m| m.is_file())
}

/// A relative path that stays inside the source.
fn inside(p: &str) -> bool {
    let p = Path::new(p);
    !p.as_os_str().is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Sorts a source. `[build] dockerfile` wins; then a `Dockerfile` at the root; then the
/// first of the languages' marker files, in the order above.
pub fn detect(dir: &Path, build: &spec::Build) -> Result<Kind, ContextError> {
    if let Some(d) = &build.dockerfile {
        if !inside(d) {
            return Err(ContextError::BadDockerfile(d.clone()));
        }
        return if is_file(dir, d) {
            Ok(Kind::Dockerfile(d.clone()))
        } else {
            Err(ContextError::NoDockerfile(d.clone()))
        };
    }
    if is_file(dir, "Dockerfile") {
        return Ok(Kind::Dockerfile("Dockerfile".into()));
    }
    if is_file(dir, "requirements.txt") {
        return Ok(Kind::Python);
    }
    if is_file(dir, "package.json") {
        return Ok(Kind::Node);
    }
    if is_file(dir, "Cargo.toml") {
        return rust_binary(dir).map(Kind::Rust);
    }
    if is_file(dir, "go.mod") {
        return Ok(Kind::Go);
    }
    if is_file(dir, "index.html") {
        return Ok(Kind::Static);
    }
    Err(ContextError::Unknown)
}

/// The binary a Rust package builds: its first `[[bin]]`, else the package's name.
fn rust_binary(dir: &Path) -> Result<String, ContextError> {
    let text = std::fs::read_to_string(dir.join("Cargo.toml"))
        .map_err(|e| ContextError::Cargo(e.to_string()))?;
    let doc: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ContextError::Cargo(e.message().to_string()))?;
    let bin = doc
        .get("bin")
        .and_then(|b| b.as_array())
        .and_then(|b| b.first())
        .and_then(|b| b.get("name"))
        .and_then(|n| n.as_str());
    let package = doc
        .get("package")
        .and_then(|p| p.get("name"))
        .and_then(|n| n.as_str());
    let name = bin.or(package).ok_or_else(|| {
        ContextError::Cargo("no [package] name (a workspace root needs its own Dockerfile)".into())
    })?;
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(name.to_string())
    } else {
        Err(ContextError::Cargo(format!(
            "{name:?} is not a binary name"
        )))
    }
}

/// The start command of a Procfile's `web:` line (Heroku's convention).
fn procfile_web(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("Procfile")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("web:"))
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
}

/// A JSON string, for Dockerfile exec form.
fn q(s: &str) -> String {
    serde_json::Value::String(s.into()).to_string()
}

/// `CMD` for a written Dockerfile: none when `[run] command` is set (it is given at start),
/// else the Procfile's `web:`, else the language's convention (`fallback`).
fn cmd(
    dir: &Path,
    run: &spec::Run,
    kind: &'static str,
    fallback: Option<Vec<String>>,
) -> Result<String, ContextError> {
    if !run.command.is_empty() {
        return Ok(String::new());
    }
    if let Some(web) = procfile_web(dir) {
        return Ok(format!("CMD [\"/bin/sh\", \"-c\", {}]\n", q(&web)));
    }
    match fallback {
        Some(args) => Ok(format!(
            "CMD [{}]\n",
            args.iter().map(|a| q(a)).collect::<Vec<_>>().join(", ")
        )),
        None => Err(ContextError::NoCommand(kind)),
    }
}

/// The Dockerfile written for `kind`; `None` for a source that has its own.
pub fn dockerfile(
    dir: &Path,
    kind: &Kind,
    bases: &Bases,
    run: &spec::Run,
) -> Result<Option<String>, ContextError> {
    let text = match kind {
        Kind::Dockerfile(_) => return Ok(None),
        Kind::Python => {
            let entry = ["app.py", "main.py", "server.py"]
                .into_iter()
                .find(|f| is_file(dir, f))
                .map(|f| vec!["python".to_string(), f.to_string()]);
            format!(
                "FROM {base}\nWORKDIR /app\nENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1\nCOPY requirements.txt ./\nRUN pip install -r requirements.txt\nCOPY . ./\n{cmd}",
                base = bases.python,
                cmd = cmd(dir, run, "python", entry)?,
            )
        }
        Kind::Node => {
            let install = if is_file(dir, "package-lock.json") {
                "npm ci --omit=dev"
            } else {
                "npm install --omit=dev"
            };
            let lock = if is_file(dir, "package-lock.json") {
                " package-lock.json"
            } else {
                ""
            };
            format!(
                "FROM {base}\nWORKDIR /app\nENV NODE_ENV=production\nCOPY package.json{lock} ./\nRUN {install}\nCOPY . ./\n{cmd}",
                base = bases.node,
                cmd = cmd(dir, run, "node", Some(vec!["npm".into(), "start".into()]))?,
            )
        }
        Kind::Rust(bin) => {
            let locked = if is_file(dir, "Cargo.lock") {
                " --locked"
            } else {
                ""
            };
            format!(
                "FROM {build} AS build\nWORKDIR /src\nCOPY . ./\nRUN cargo build --release{locked} --bin {bin} && cp target/release/{bin} /{bin}\nFROM {runtime}\nCOPY --from=build /{bin} /usr/local/bin/{bin}\n{cmd}",
                build = bases.rust,
                runtime = bases.runtime,
                cmd = cmd(dir, run, "rust", Some(vec![format!("/usr/local/bin/{bin}")]))?,
            )
        }
        Kind::Go => format!(
            "FROM {build} AS build\nWORKDIR /src\nCOPY . ./\nRUN CGO_ENABLED=0 go build -o /app .\nFROM {runtime}\nCOPY --from=build /app /usr/local/bin/app\n{cmd}",
            build = bases.go,
            runtime = bases.runtime,
            cmd = cmd(dir, run, "go", Some(vec!["/usr/local/bin/app".into()]))?,
        ),
        Kind::Static => format!(
            "FROM {base}\nCOPY . /site/\n{cmd}",
            base = bases.statics,
            cmd = cmd(
                dir,
                run,
                "static",
                Some(
                    ["httpd", "-f", "-p", "8080", "-h", "/site"]
                        .map(String::from)
                        .to_vec()
                )
            )?,
        ),
    };
    Ok(Some(text))
}

/// The build context: the source's files (links as links, no `.git`), and a written
/// Dockerfile as `GENERATED` when there is one. `max_bytes` bounds the archive.
pub fn pack(dir: &Path, generated: Option<&str>, max_bytes: u64) -> Result<Vec<u8>, ContextError> {
    let err = |e: &dyn std::fmt::Display| ContextError::Pack(e.to_string());
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    tar.mode(tar::HeaderMode::Deterministic);
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .map_err(|e| err(&e))?
            .collect::<Result<_, _>>()
            .map_err(|e| err(&e))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let rel = path.strip_prefix(dir).map_err(|e| err(&e))?;
            if rel == Path::new(".git") || rel == Path::new(GENERATED) {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).map_err(|e| err(&e))?;
            total += meta.len().min(u64::MAX / 2) + 512;
            if total > max_bytes {
                return Err(ContextError::Pack(format!(
                    "the context passes {max_bytes} bytes"
                )));
            }
            if meta.is_dir() {
                tar.append_dir(rel, &path).map_err(|e| err(&e))?;
                stack.push(path);
            } else if meta.is_file() || meta.file_type().is_symlink() {
                tar.append_path_with_name(&path, rel).map_err(|e| err(&e))?;
            }
        }
    }
    if let Some(text) = generated {
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, GENERATED, text.as_bytes())
            .map_err(|e| err(&e))?;
    }
    tar.into_inner().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn src(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let p = d.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        d
    }

    fn build(dockerfile: Option<&str>) -> spec::Build {
        spec::Build {
            dockerfile: dockerfile.map(String::from),
            test: vec![],
        }
    }

    #[test]
    fn each_kind_of_source_is_told_apart_and_gets_its_dockerfile() {
        let bases = Bases {
            python: "local/python".into(),
            ..Bases::default()
        };
        let run = spec::Run::default();
        let py = src(&[("requirements.txt", "flask\n"), ("app.py", "")]);
        let k = detect(py.path(), &build(None)).unwrap();
        assert_eq!(k, Kind::Python);
        let d = dockerfile(py.path(), &k, &bases, &run).unwrap().unwrap();
        assert!(d.starts_with("FROM local/python\n"), "{d}");
        assert!(d.contains("RUN pip install -r requirements.txt"), "{d}");
        assert!(d.ends_with("CMD [\"python\", \"app.py\"]\n"), "{d}");

        let node = src(&[("package.json", "{}"), ("package-lock.json", "{}")]);
        let k = detect(node.path(), &build(None)).unwrap();
        let d = dockerfile(node.path(), &k, &bases, &run).unwrap().unwrap();
        assert!(
            d.contains("COPY package.json package-lock.json ./\nRUN npm ci --omit=dev"),
            "{d}"
        );
        assert!(d.ends_with("CMD [\"npm\", \"start\"]\n"), "{d}");

        let rust = src(&[
            ("Cargo.toml", "[package]\nname = \"web-api\"\n"),
            ("Cargo.lock", ""),
        ]);
        let k = detect(rust.path(), &build(None)).unwrap();
        assert_eq!(k, Kind::Rust("web-api".into()));
        let d = dockerfile(rust.path(), &k, &bases, &run).unwrap().unwrap();
        assert!(
            d.contains("cargo build --release --locked --bin web-api"),
            "{d}"
        );
        assert!(
            d.contains(
                "FROM debian:bookworm-slim\nCOPY --from=build /web-api /usr/local/bin/web-api"
            ),
            "{d}"
        );

        let go = src(&[("go.mod", "module x\n"), ("main.go", "")]);
        assert_eq!(detect(go.path(), &build(None)).unwrap(), Kind::Go);
        let site = src(&[("index.html", "<p>hi</p>")]);
        let k = detect(site.path(), &build(None)).unwrap();
        let d = dockerfile(site.path(), &k, &bases, &run).unwrap().unwrap();
        assert!(
            d.ends_with("CMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/site\"]\n"),
            "{d}"
        );

        // A source's own Dockerfile wins over every marker; `[build] dockerfile` over that.
        let own = src(&[
            ("Dockerfile", "FROM x"),
            ("requirements.txt", ""),
            ("deploy/Dockerfile.prod", "FROM y"),
        ]);
        let k = detect(own.path(), &build(None)).unwrap();
        assert_eq!(k, Kind::Dockerfile("Dockerfile".into()));
        assert_eq!(dockerfile(own.path(), &k, &bases, &run).unwrap(), None);
        assert_eq!(
            detect(own.path(), &build(Some("deploy/Dockerfile.prod"))).unwrap(),
            Kind::Dockerfile("deploy/Dockerfile.prod".into())
        );
    }

    #[test]
    fn the_start_command_comes_from_run_then_procfile_then_convention_else_a_plain_error() {
        let bases = Bases::default();
        let py = src(&[
            ("requirements.txt", ""),
            (
                "Procfile",
                "worker: x\nweb: gunicorn -b 0.0.0.0:8080 \"app:make()\"\n",
            ),
        ]);
        let d = dockerfile(py.path(), &Kind::Python, &bases, &spec::Run::default())
            .unwrap()
            .unwrap();
        assert!(
            d.ends_with(
                "CMD [\"/bin/sh\", \"-c\", \"gunicorn -b 0.0.0.0:8080 \\\"app:make()\\\"\"]\n"
            ),
            "{d}"
        );
        let run = spec::Run {
            command: vec!["python".into(), "serve.py".into()],
            port: Some(8080),
            env: BTreeMap::new(),
            ..spec::Run::default()
        };
        let d = dockerfile(py.path(), &Kind::Python, &bases, &run)
            .unwrap()
            .unwrap();
        assert!(!d.contains("CMD"), "{d}");
        let bare = src(&[("requirements.txt", "")]);
        assert_eq!(
            dockerfile(bare.path(), &Kind::Python, &bases, &spec::Run::default()),
            Err(ContextError::NoCommand("python"))
        );
    }

    #[test]
    fn bad_sources_and_paths_are_refused_plainly() {
        let empty = src(&[("README.md", "")]);
        assert_eq!(
            detect(empty.path(), &build(None)),
            Err(ContextError::Unknown)
        );
        for bad in ["../Dockerfile", "/etc/passwd", "", "a/../../b"] {
            assert_eq!(
                detect(empty.path(), &build(Some(bad))),
                Err(ContextError::BadDockerfile(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            detect(empty.path(), &build(Some("Dockerfile"))),
            Err(ContextError::NoDockerfile("Dockerfile".into()))
        );
        let ws = src(&[("Cargo.toml", "[workspace]\nmembers = [\"a\"]\n")]);
        assert!(matches!(
            detect(ws.path(), &build(None)),
            Err(ContextError::Cargo(_))
        ));
        let evil = src(&[("Cargo.toml", "[package]\nname = \"a; rm -rf /\"\n")]);
        assert!(matches!(
            detect(evil.path(), &build(None)),
            Err(ContextError::Cargo(_))
        ));
        let broken = src(&[("Cargo.toml", "[package\n")]);
        assert!(matches!(
            detect(broken.path(), &build(None)),
            Err(ContextError::Cargo(_))
        ));
    }

    #[test]
    fn the_pack_holds_the_files_and_links_as_links_without_git_and_within_its_bound() {
        let d = src(&[
            ("app.py", "print(1)\n"),
            ("lib/util.py", "x = 1\n"),
            (".git/HEAD", "ref"),
            (GENERATED, "FROM evil"),
        ]);
        std::os::unix::fs::symlink("/etc/shadow", d.path().join("leak")).unwrap();
        let bytes = pack(d.path(), Some("FROM base\n"), 1 << 20).unwrap();
        let mut seen = BTreeMap::new();
        let mut a = tar::Archive::new(&bytes[..]);
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let kind = e.header().entry_type();
            let mut body = String::new();
            if kind.is_file() {
                std::io::Read::read_to_string(&mut e, &mut body).unwrap();
            } else if kind.is_symlink() {
                body = e
                    .link_name()
                    .unwrap()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
            }
            seen.insert(path.trim_end_matches('/').to_string(), body);
        }
        assert_eq!(seen.get("app.py").map(String::as_str), Some("print(1)\n"));
        assert_eq!(seen.get("lib/util.py").map(String::as_str), Some("x = 1\n"));
        assert_eq!(
            seen.get("leak").map(String::as_str),
            Some("/etc/shadow"),
            "the link was followed"
        );
        assert_eq!(seen.get(GENERATED).map(String::as_str), Some("FROM base\n"));
        assert!(!seen.keys().any(|k| k.starts_with(".git")), "{seen:?}");
        assert!(matches!(
            pack(d.path(), None, 100),
            Err(ContextError::Pack(_))
        ));
    }
}
