//! A contender running as its own process: the `im-ingest` binary itself (`run`, or
//! `bench-contender …`), with the trial's settings in its environment.
//!
//! Guarantee: a contender that exits by itself is an error that carries the tail of its
//! log; every process is killed when its handle is dropped, so a failed trial leaves no
//! process behind.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;

pub struct ContenderProcess {
    child: Child,
    name: String,
    log: PathBuf,
    /// The admin server's address (`im-ingest run` only).
    pub admin: Option<String>,
}

impl ContenderProcess {
    /// Starts `exe args…` with `env` added to this process's environment, its output
    /// in `<log_dir>/<name>.log`.
    pub fn spawn(
        exe: &Path,
        config: Option<&Path>,
        args: &[String],
        env: &[(String, String)],
        log_dir: &Path,
        name: &str,
        admin: Option<String>,
    ) -> anyhow::Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(exe);
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        command
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = command
            .spawn()
            .with_context(|| format!("starting contender {name}"))?;
        Ok(Self {
            child,
            name: name.to_string(),
            log,
            admin,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error with the log's tail if the process has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            anyhow::bail!(
                "contender {} exited ({status}); last lines of its log:\n{}",
                self.name,
                tail.join("\n")
            );
        }
        Ok(())
    }
}

impl Drop for ContenderProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address with a port that was free a moment ago (for a worker's admin
/// server).
pub fn free_loopback_address() -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.to_string())
}

/// The sum of the counters `names` in a Prometheus text exposition.
pub fn counter_sum(metrics: &str, names: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let name = series.split('{').next()?;
            names.contains(&name).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// GET `http://<address>/metrics` (loopback, bounded), for the worker's counters, with
/// the admin token when one is configured; any answer but 200 is an error.
pub async fn scrape_metrics(
    address: &str,
    token: Option<&crate::secret::Secret>,
) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authorization = token
        .map(|token| format!("Authorization: Bearer {}\r\n", token.expose()))
        .unwrap_or_default();
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream
            .write_all(
                format!(
                    "GET /metrics HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\
                     {authorization}\r\n"
                )
                .as_bytes(),
            )
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(std::time::Duration::from_secs(5), exchange)
        .await
        .context("scraping worker metrics timed out")??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed metrics response")?;
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    anyhow::ensure!(
        status == "200",
        "the worker's /metrics answered {status} (is `admin.token` set for the bench too?)"
    );
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_summed_by_name_across_labels() {
        let text = "# TYPE a counter\na{x=\"1\"} 2\na{x=\"2\"} 3\nb 5\nab 7\n";
        assert_eq!(counter_sum(text, &["a"]), 5.0);
        assert_eq!(counter_sum(text, &["a", "b"]), 10.0);
        assert_eq!(counter_sum(text, &["c"]), 0.0);
    }
}
