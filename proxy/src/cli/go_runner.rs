//! `/go-runner`: the small wrapper of Kubernetes' images that kops and other
//! installers put in front of kube-proxy (`/go-runner --log-file=F
//! --also-stdout /usr/local/bin/kube-proxy ...`). The kproxy image installs
//! this binary under that name too, so such a DaemonSet works unchanged:
//! it runs the command, copies its output to the log file (and to stdout
//! with `--also-stdout`; stderr too unless `--redirect-stderr=false`),
//! forwards SIGTERM and SIGINT, and exits with the command's status.

use std::ffi::OsString;
use std::process::{ExitCode, Stdio};

use anyhow::{bail, Context};
use tokio::io::{AsyncRead, AsyncWriteExt};

use super::argv::program_name;
use super::values::parse_go_bool;

#[derive(Debug, Default, PartialEq)]
struct Options {
    log_file: Option<OsString>,
    also_stdout: bool,
    redirect_stderr: bool,
    command: Vec<OsString>,
}

/// Runs as go-runner when invoked under that name; `None` otherwise.
pub fn run_if_invoked() -> Option<ExitCode> {
    let args: Vec<OsString> = std::env::args_os().collect();
    if program_name(args.first()?) != "go-runner" {
        return None;
    }
    let result = parse(&args[1..]).and_then(|opts| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(run(opts))
    });
    Some(match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("go-runner: {err:#}");
            ExitCode::from(1)
        }
    })
}

/// Go `flag` syntax: `-name`, `--name`, `-name=value`, `-name value`;
/// flags stop at the first non-flag or at `--`.
fn parse(args: &[OsString]) -> anyhow::Result<Options> {
    let mut opts = Options {
        redirect_stderr: true,
        ..Options::default()
    };
    let mut i = 0;
    while i < args.len() {
        let Some(arg) = args[i].to_str() else { break };
        if arg == "--" {
            i += 1;
            break;
        }
        if !arg.starts_with('-') || arg == "-" {
            break;
        }
        let body = arg.trim_start_matches('-');
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        match name {
            "log-file" => {
                let v = match value {
                    Some(v) => v,
                    None => {
                        i += 1;
                        args.get(i)
                            .and_then(|a| a.to_str())
                            .context("--log-file needs a value")?
                            .to_string()
                    }
                };
                opts.log_file = (!v.is_empty()).then(|| OsString::from(v));
            }
            "also-stdout" => {
                opts.also_stdout = value
                    .map_or(Ok(true), |v| parse_go_bool(&v))
                    .map_err(anyhow::Error::msg)?
            }
            "redirect-stderr" => {
                opts.redirect_stderr = value
                    .map_or(Ok(true), |v| parse_go_bool(&v))
                    .map_err(anyhow::Error::msg)?
            }
            other => bail!(
                "unknown flag -{other} (go-runner knows -log-file, -also-stdout, -redirect-stderr)"
            ),
        }
        i += 1;
    }
    opts.command = args[i..].to_vec();
    if opts.command.is_empty() {
        bail!("no command to run");
    }
    Ok(opts)
}

async fn run(opts: Options) -> anyhow::Result<u8> {
    use tokio::signal::unix::{signal, SignalKind};

    let mut cmd = tokio::process::Command::new(&opts.command[0]);
    cmd.args(&opts.command[1..]).stdin(Stdio::inherit());
    let log = match &opts.log_file {
        Some(path) => Some(
            tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await
                .with_context(|| format!("opening --log-file {}", path.to_string_lossy()))?,
        ),
        None => None,
    };
    if log.is_some() {
        cmd.stdout(Stdio::piped());
        if opts.redirect_stderr {
            cmd.stderr(Stdio::piped());
        }
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", opts.command[0].to_string_lossy()))?;
    let pid = child.id();

    let mut copies = Vec::new();
    if let Some(log) = log {
        let sink = std::sync::Arc::new(tokio::sync::Mutex::new(log));
        if let Some(out) = child.stdout.take() {
            copies.push(tokio::spawn(copy(out, sink.clone(), opts.also_stdout)));
        }
        if let Some(err) = child.stderr.take() {
            copies.push(tokio::spawn(copy(err, sink, opts.also_stdout)));
        }
    }

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let status = loop {
        let sig = tokio::select! {
            status = child.wait() => break status?,
            _ = term.recv() => libc::SIGTERM,
            _ = int.recv() => libc::SIGINT,
        };
        if let Some(pid) = pid {
            // SAFETY: signalling the child we started and have not reaped.
            unsafe { libc::kill(pid as i32, sig) };
        }
    };
    for c in copies {
        let _ = c.await;
    }
    Ok(status.code().map(|c| c.clamp(0, 255) as u8).unwrap_or(1))
}

async fn copy(
    mut from: impl AsyncRead + Unpin,
    to: std::sync::Arc<tokio::sync::Mutex<tokio::fs::File>>,
    also_stdout: bool,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    let mut stdout = tokio::io::stdout();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                // tokio's File completes writes in the background: flush
                // so the log is complete when the command's exit is reported.
                let _ = to.lock().await.flush().await;
                return;
            }
            Ok(n) => n,
        };
        let mut file = to.lock().await;
        let _ = file.write_all(&buf[..n]).await;
        // Written through at once: a log file is read while the command runs.
        let _ = file.flush().await;
        drop(file);
        if also_stdout {
            let _ = stdout.write_all(&buf[..n]).await;
            let _ = stdout.flush().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn parses_go_runner_flags() {
        let o = parse(&args(&[
            "--log-file=/var/log/kube-proxy.log",
            "--also-stdout",
            "--",
            "/usr/local/bin/kube-proxy",
            "--v=2",
        ]))
        .unwrap();
        assert_eq!(o.log_file, Some(OsString::from("/var/log/kube-proxy.log")));
        assert!(o.also_stdout && o.redirect_stderr);
        assert_eq!(o.command, args(&["/usr/local/bin/kube-proxy", "--v=2"]));
        let o = parse(&args(&[
            "-log-file",
            "/l",
            "-redirect-stderr=false",
            "kube-proxy",
        ]))
        .unwrap();
        assert!(!o.redirect_stderr && !o.also_stdout);
        assert_eq!(o.command, args(&["kube-proxy"]));
        assert!(parse(&args(&["--log-file=/l"])).is_err());
        assert!(parse(&args(&["--bogus", "x"])).is_err());
    }

    #[tokio::test]
    async fn copies_output_to_the_log_file_and_returns_the_status() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("out.log");
        let code = run(Options {
            log_file: Some(log.clone().into_os_string()),
            also_stdout: false,
            redirect_stderr: true,
            command: args(&["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"]),
        })
        .await
        .unwrap();
        assert_eq!(code, 3);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("to-stdout") && text.contains("to-stderr"),
            "{text}"
        );
    }
}
