//! The app spec (`shoal.toml`): what a user declares about an app. Parsed from text, strictly:
//! unknown keys are errors naming the key.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    pub name: String,
    #[serde(default)]
    pub source: Source,
    #[serde(default)]
    pub build: Build,
    #[serde(default)]
    pub run: Run,
    #[serde(default)]
    pub health: Health,
    #[serde(default)]
    pub scale: Scale,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub expose: Expose,
    #[serde(default)]
    pub volumes: Vec<Volume>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub git: Option<String>,
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    pub image: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Build {
    pub dockerfile: Option<String>,
    #[serde(default)]
    pub test: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    #[serde(default)]
    pub command: Vec<String>,
    pub port: Option<u16>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub secrets: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub http: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scale {
    pub replicas: Option<u32>,
    pub min: Option<u32>,
    pub max: Option<u32>,
    pub target_rps: Option<f64>,
    /// `"every-node"` runs one replica per node.
    pub placement: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub cpu: Option<f64>,
    pub memory: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expose {
    #[serde(default)]
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub name: String,
    pub path: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("invalid app spec: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("invalid app spec: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid app spec: {0}")]
    Invalid(String),
}

/// App names are DNS labels: they become host names and container names.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

impl AppSpec {
    /// Parses TOML, or JSON when the text starts with `{`.
    pub fn parse(text: &str) -> Result<AppSpec, SpecError> {
        let spec: AppSpec = if text.trim_start().starts_with('{') {
            serde_json::from_str(text)?
        } else {
            toml::from_str(text)?
        };
        spec.validate()?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |m: String| Err(SpecError::Invalid(m));
        if !valid_name(&self.name) {
            return bad(format!(
                "name {:?}: use 1-63 lowercase letters, digits and '-'",
                self.name
            ));
        }
        if self.source.git.is_some() && self.source.image.is_some() {
            return bad("source: give git or image, not both".into());
        }
        if let (Some(min), Some(max)) = (self.scale.min, self.scale.max) {
            if min > max {
                return bad(format!("scale: min {min} is above max {max}"));
            }
        }
        if let Some(p) = &self.scale.placement {
            if p != "every-node" {
                return bad(format!(
                    "scale.placement {p:?}: the only placement is \"every-node\""
                ));
            }
        }
        if self
            .resources
            .cpu
            .is_some_and(|c| !(c > 0.0 && c <= 1024.0))
        {
            return bad("resources.cpu must be above 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_spec_parses() {
        let s = AppSpec::parse(
            r#"
name = "hello"
[source]
git = "https://github.com/acme/hello.git"
ref = "main"
[build]
dockerfile = "Dockerfile"
test = ["python", "-m", "pytest", "-q"]
[run]
command = ["python", "app.py"]
port = 8080
env = { GREETING = "hi" }
secrets = ["API_KEY"]
[health]
http = "/ready"
[scale]
replicas = 2
[resources]
cpu = 0.5
memory = "256Mi"
[expose]
hosts = ["hello.example.com"]
[[volumes]]
name = "data"
path = "/data"
"#,
        )
        .unwrap();
        assert_eq!(s.run.port, Some(8080));
        assert_eq!(s.source.git_ref.as_deref(), Some("main"));
        assert_eq!(s.volumes.len(), 1);
    }

    #[test]
    fn bad_specs_are_refused_with_the_reason() {
        let e = AppSpec::parse("name = \"x\"\nreplicas = 3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("replicas"), "{e}");
        assert!(AppSpec::parse("name = \"Hello World\"").is_err());
        assert!(AppSpec::parse("name = \"a\"\n[source]\ngit = \"x\"\nimage = \"y\"").is_err());
        assert!(AppSpec::parse("{\"name\": \"ok\"}").is_ok());
    }
}
