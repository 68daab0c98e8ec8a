//! The boot report, `/run/shoal/init.json`: every stage with its times and outcome, and every
//! service with its state, pid, restarts and last exit. Rewritten atomically on each change.

use serde::Serialize;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Degraded,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub name: String,
    pub started_ms: u64,
    pub ended_ms: u64,
    pub outcome: Outcome,
    pub detail: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceReport {
    pub name: String,
    pub state: String,
    pub pid: Option<i32>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub started_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub version: &'static str,
    pub started_ms: u64,
    /// Milliseconds since the kernel started, read once this init has mounted /proc.
    pub uptime_at_start_ms: u64,
    pub test_mode: bool,
    /// What the initramfs stage did (root slot, device, its time), when there was one.
    pub initrd: serde_json::Value,
    pub stages: Vec<Stage>,
    pub services: Vec<ServiceReport>,
    pub network: serde_json::Value,
    pub metadata: serde_json::Value,
    /// The clock keeper's last check (SNTP at boot, then every 15 minutes).
    pub clock: crate::clock::Kept,
    pub orphans_reaped: u64,
    pub panics: u64,
    pub shutdown: Option<String>,
}

/// Runs one stage, timing it and saying on the console how it went; `f` says how it went
/// and what to record. A stage that panics fails; the boot goes on with the next one.
pub fn run_stage(name: &str, f: impl FnOnce(&mut Vec<String>) -> Outcome) -> Stage {
    let started_ms = now_ms();
    let mut detail = Vec::new();
    let outcome = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut detail))) {
        Ok(o) => o,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            detail.push(format!("panicked: {what}"));
            Outcome::Failed
        }
    };
    let ended_ms = now_ms();
    let word = match outcome {
        Outcome::Ok => "ok",
        Outcome::Degraded => "DEGRADED",
        Outcome::Failed => "FAILED",
    };
    crate::console(&format!(
        "stage {name}: {word} in {} ms{}",
        ended_ms - started_ms,
        if detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", detail.join("; "))
        }
    ));
    Stage {
        name: name.into(),
        started_ms,
        ended_ms,
        outcome,
        detail,
    }
}

impl Report {
    /// Runs one stage (`run_stage`) into the report.
    pub fn stage(&mut self, name: &str, f: impl FnOnce(&mut Vec<String>) -> Outcome) {
        self.stages.push(run_stage(name, f));
    }

    /// Writes the report to `path` atomically (0644; it holds no secret).
    pub fn write(&self, path: &Path) {
        let Ok(body) = serde_json::to_vec_pretty(self) else {
            return;
        };
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = path.with_extension("json.tmp");
        if std::fs::write(&tmp, body).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_stage_fails_and_the_next_one_runs() {
        let mut report = Report::default();
        report.stage("boom", |_| panic!("bad seed"));
        report.stage("after", |_| Outcome::Ok);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["stages"][0]["outcome"], "failed");
        assert!(json["stages"][0]["detail"][0]
            .as_str()
            .unwrap()
            .contains("panicked: bad seed"));
        assert_eq!(json["stages"][1]["outcome"], "ok");
    }
}
