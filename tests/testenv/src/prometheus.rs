//! A Prometheus server ([`Prometheus`]), built from its Go module by `tests/testbin/build.sh`,
//! for tests that load regcred's alerting rules and dashboard queries and scrape a controller.

use std::{process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{
    free_port, http_get,
    process::{Process, temp_dir},
    testbin, wait_until,
};

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A Prometheus process on a loopback port with a configuration of the test's, storing in a
/// temporary directory; stopped, and its directory removed, on drop.
pub struct Prometheus {
    // Field order is drop order: the process stops before its directory goes.
    process: Process,
    port: u16,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts `prometheus` with the configuration `config` (YAML: scrape configs, `rule_files`
    /// by absolute path, intervals) and returns once it answers `/-/ready`, that is once it
    /// has loaded the configuration and its rule files (a file that does not load makes it
    /// exit, and this fail with its log).
    pub fn start(config: &str) -> Result<Prometheus> {
        let dir = temp_dir("prometheus")?;
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let port = free_port();
        let mut cmd = Command::new(testbin("prometheus")?);
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn");
        let mut process = Process::spawn("prometheus", cmd, &dir.path().join("prometheus.log"))?;
        let ready = wait_until(
            "prometheus /-/ready",
            READY_TIMEOUT,
            || process.check_alive(),
            || match http_get(port, "/-/ready")? {
                (200, _) => Ok(()),
                (code, body) => bail!("/-/ready: {code} {body}"),
            },
        );
        if let Err(error) = ready {
            return Err(error.context(process.log_tail()));
        }
        Ok(Prometheus { process, port, dir })
    }

    /// Its log file (warnings and errors: a rule that fails to evaluate, a failed scrape).
    pub fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("prometheus.log")
    }

    /// Err (with the end of its log) if it has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        self.process.check_alive()
    }

    /// `GET /api/v1/<path>`: the `data` of a successful answer.
    pub fn api(&self, path: &str) -> Result<Value> {
        let (code, body) = http_get(self.port, &format!("/api/v1/{path}"))?;
        let answer: Value =
            serde_json::from_str(&body).with_context(|| format!("/api/v1/{path}: {code}, not JSON: {body}"))?;
        if code != 200 || answer["status"] != "success" {
            bail!("/api/v1/{path}: {code} {body}");
        }
        Ok(answer["data"].clone())
    }

    /// An instant query now: the `data` of the answer (`resultType`, `result`).
    pub fn query(&self, expr: &str) -> Result<Value> {
        self.api(&format!("query?query={}", url_encode(expr)))
    }

    /// The rule groups as loaded, with each rule's state and active alerts
    /// (`/api/v1/rules`).
    pub fn rule_groups(&self) -> Result<Vec<Value>> {
        let data = self.api("rules")?;
        Ok(data["groups"].as_array().cloned().unwrap_or_default())
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn url_encoding_keeps_only_unreserved_characters() {
        assert_eq!(super::url_encode(r#"up{job="a b"}[1m]"#), "up%7Bjob%3D%22a%20b%22%7D%5B1m%5D");
    }
}
