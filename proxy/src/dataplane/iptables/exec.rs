//! Running the iptables tools: `*-save` to read, `*-restore --noflush` to
//! write, and backend detection. Commands run in the caller's network
//! namespace (the one of the calling thread).

use std::io::Write;
use std::process::{Command, Stdio};

use tracing::debug;

use crate::dataplane::DataplaneError;

/// `--iptables-backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Whichever backend already holds rules here, else the system default.
    Auto,
    /// iptables-nft (nf_tables kernel API).
    Nft,
    /// iptables-legacy (x_tables kernel API).
    Legacy,
}

impl Backend {
    /// Resolves `Auto` the way kube's iptables-wrapper does: the backend whose
    /// `*-save` shows more rules in this network namespace wins; if neither
    /// has any, the one `iptables --version` reports. `Nft`/`Legacy` are
    /// returned unchanged.
    pub fn resolve(self) -> Result<Backend, DataplaneError> {
        if self != Backend::Auto {
            return Ok(self);
        }
        let legacy = count_rules("iptables-legacy-save");
        let nft = count_rules("iptables-nft-save");
        debug!(legacy, nft, "iptables rules per backend");
        if legacy > nft {
            return Ok(Backend::Legacy);
        }
        if nft > legacy {
            return Ok(Backend::Nft);
        }
        let out = Command::new("iptables")
            .arg("--version")
            .output()
            .map_err(|e| DataplaneError::Command {
                tool: "iptables --version".into(),
                message: format!("{e}; is the iptables package installed?"),
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(if text.contains("legacy") {
            Backend::Legacy
        } else {
            // iptables >= 1.8 prints "(nf_tables)"; nft is the modern default.
            Backend::Nft
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    pub(crate) fn save_cmd(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy-save",
            _ => "iptables-nft-save",
        }
    }

    pub(crate) fn restore_cmd(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy-restore",
            _ => "iptables-nft-restore",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Rules (`-A` lines) the given save tool shows; 0 when it cannot run.
fn count_rules(save: &str) -> usize {
    match Command::new(save).output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count(),
        _ => 0,
    }
}

/// `*-save -t TABLE`.
pub fn save(backend: Backend, table: &str) -> Result<String, DataplaneError> {
    let tool = backend.save_cmd();
    let out = Command::new(tool)
        .args(["-t", table])
        .output()
        .map_err(|e| DataplaneError::Command {
            tool: tool.into(),
            message: format!("cannot run: {e}"),
        })?;
    if !out.status.success() {
        return Err(DataplaneError::Command {
            tool: format!("{tool} -t {table}"),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    String::from_utf8(out.stdout).map_err(|_| DataplaneError::Command {
        tool: tool.into(),
        message: "output is not UTF-8".into(),
    })
}

/// `*-restore --noflush --wait` with `payload` on stdin. On failure the error
/// names the rejected line of the payload when the tool says which it was.
pub fn restore(backend: Backend, payload: &str) -> Result<(), DataplaneError> {
    let tool = backend.restore_cmd();
    let mut child = Command::new(tool)
        .args(["--noflush", "--wait=10"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| DataplaneError::Command {
            tool: tool.into(),
            message: format!("cannot run: {e}"),
        })?;
    let write_result = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(payload.as_bytes());
    let out = child.wait_with_output()?;
    if out.status.success() {
        write_result?;
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let mut message = if stderr.is_empty() {
        format!("exited with {}", out.status)
    } else {
        stderr.clone()
    };
    if let Some(n) = failed_line(&stderr) {
        if let Some(line) = payload.lines().nth(n.saturating_sub(1)) {
            message.push_str(&format!(" (payload line {n}: {line})"));
        }
    }
    Err(DataplaneError::Command {
        tool: format!("{tool} --noflush"),
        message,
    })
}

/// The line number in `iptables-restore: line 12 failed`.
fn failed_line(stderr: &str) -> Option<usize> {
    let idx = stderr.find("line ")?;
    let rest = &stderr[idx + 5..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_line_is_parsed() {
        assert_eq!(failed_line("iptables-restore: line 12 failed"), Some(12));
        assert_eq!(failed_line("Bad argument"), None);
    }
}
