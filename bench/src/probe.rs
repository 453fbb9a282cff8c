//! The workload, run as child processes of the bench (`kproxy-bench serve`
//! and `kproxy-bench probe ...`) so each can be placed in a pod's network
//! namespace and cgroup (the socket hooks of ebpf mode act per cgroup).
//!
//! Every connection: connect, read the backend's one-line name, close. By
//! default the backend waits for the client's close, so TIME_WAIT stays on
//! the client, which reuses it (`tcp_tw_reuse`, set in the pods); with
//! `--backend-closes-first` the backend closes first (as an HTTP/1.0
//! server does) and TIME_WAIT sits on the backend.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// CLOCK_MONOTONIC in ns: comparable between the bench and its children
/// (Rust's `Instant` is the same clock but cannot cross a process).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The backend: answers every connection with `NAME\n`, then closes it (or,
/// with `client_closes`, waits for the client to close). A fixed pool of
/// threads accepts on one socket.
pub fn serve(name: &str, port: u16, client_closes: bool) -> Result<()> {
    let listener =
        TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("binding port {port}"))?;
    let listener = Arc::new(listener);
    let reply = Arc::new(format!("{name}\n"));
    println!("ready");
    std::io::stdout().flush().ok();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (l, reply) = (listener.clone(), reply.clone());
            std::thread::spawn(move || loop {
                let Ok((mut c, _)) = l.accept() else { continue };
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                if c.write_all(reply.as_bytes()).is_ok() && client_closes {
                    let mut sink = [0u8; 64];
                    while matches!(c.read(&mut sink), Ok(n) if n > 0) {}
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}

/// One connection: (connect time in µs, backend name).
fn exchange(target: SocketAddr, timeout: Duration) -> std::result::Result<(f64, String), String> {
    let t0 = Instant::now();
    let c = TcpStream::connect_timeout(&target, timeout).map_err(|e| classify(&e))?;
    let connect_us = t0.elapsed().as_secs_f64() * 1e6;
    c.set_read_timeout(Some(timeout))
        .map_err(|e| classify(&e))?;
    let mut line = String::new();
    let mut r = BufReader::new(&c);
    match r.read_line(&mut line) {
        Ok(0) => return Err("closed".into()),
        Ok(_) => {}
        Err(e) => return Err(classify(&e)),
    }
    let _ = c.shutdown(Shutdown::Both);
    Ok((connect_us, line.trim().to_string()))
}

fn classify(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "refused".into(),
        TimedOut | WouldBlock => "timeout".into(),
        ConnectionReset => "reset".into(),
        AddrNotAvailable => "no local port".into(),
        _ => match e.raw_os_error() {
            Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) => "unreachable".into(),
            _ => format!("other: {e}"),
        },
    }
}

/// `probe connect` output: per target, the connect times of its answers.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ConnectSamples {
    pub target: String,
    /// µs from connect() to an established connection, one per answer.
    pub connect_us: Vec<f64>,
    /// Answers from another backend than `expect` (a wrong translation).
    pub wrong_backend: usize,
    pub errors: std::collections::BTreeMap<String, usize>,
}

/// `count` connections to each target, in alternating blocks of `block`
/// (so drift in the machine's load hits every target alike); every answer
/// must come from `expect`. Bounded by `count` and `deadline`.
pub fn connect_latency(
    targets: &[SocketAddr],
    expect: &str,
    count: usize,
    block: usize,
    deadline: Duration,
) -> Vec<ConnectSamples> {
    let mut out: Vec<ConnectSamples> = targets
        .iter()
        .map(|t| ConnectSamples {
            target: t.to_string(),
            ..Default::default()
        })
        .collect();
    let end = Instant::now() + deadline;
    let mut done = 0;
    while done < count && Instant::now() < end {
        let n = block.min(count - done);
        for (t, series) in targets.iter().zip(out.iter_mut()) {
            for _ in 0..n {
                match exchange(*t, Duration::from_secs(1)) {
                    Ok((us, name)) => {
                        if name == expect {
                            series.connect_us.push(us);
                        } else {
                            series.wrong_backend += 1;
                        }
                    }
                    Err(e) => *series.errors.entry(e).or_default() += 1,
                }
            }
        }
        done += n;
    }
    out
}

/// `probe flood` output.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct FloodResult {
    pub ok: u64,
    pub failed: u64,
    pub secs: f64,
    /// Answers from another backend than `expect`.
    #[serde(default)]
    pub wrong_backend: u64,
    /// Failures by kind (refused, timeout, reset, no local port, ...).
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
}

/// `threads` loops of connections to `target` for `secs` seconds (at most
/// `max` connections in all): how many new connections per second, and
/// how many failed and why.
pub fn flood(target: SocketAddr, expect: &str, threads: usize, secs: f64, max: u64) -> FloodResult {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let done = done.clone();
            let expect = expect.to_string();
            std::thread::spawn(move || {
                let mut r = FloodResult::default();
                while Instant::now() < end && done.fetch_add(1, Ordering::Relaxed) < max {
                    match exchange(target, Duration::from_secs(1)) {
                        Ok((_, name)) if name == expect => r.ok += 1,
                        Ok(_) => r.wrong_backend += 1,
                        Err(e) => {
                            r.failed += 1;
                            *r.errors.entry(e).or_default() += 1;
                        }
                    }
                }
                r
            })
        })
        .collect();
    let mut total = FloodResult::default();
    for h in handles {
        if let Ok(r) = h.join() {
            total.ok += r.ok;
            total.failed += r.failed;
            total.wrong_backend += r.wrong_backend;
            for (k, v) in r.errors {
                *total.errors.entry(k).or_default() += v;
            }
        }
    }
    total.secs = start.elapsed().as_secs_f64();
    total
}

/// Loops on `target` (about one connection per ms) printing
/// `<monotonic ns> <backend name or !error>` per attempt, until stdin
/// closes (the bench is done with it) or `max_secs` pass.
pub fn follow(target: SocketAddr, max_secs: f64) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            stop.store(true, Ordering::Relaxed);
        });
    }
    let end = Instant::now() + Duration::from_secs_f64(max_secs);
    let mut out = std::io::stdout().lock();
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        let what = match exchange(target, Duration::from_millis(500)) {
            Ok((_, name)) => name,
            Err(e) => format!("!{e}"),
        };
        if writeln!(out, "{} {what}", monotonic_ns()).is_err() || out.flush().is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// One line of `probe follow`: (monotonic ns, answer or error).
pub fn parse_follow_line(line: &str) -> Option<(u64, std::result::Result<&str, &str>)> {
    let (t, what) = line.split_once(' ')?;
    let t = t.parse().ok()?;
    Some((
        t,
        match what.strip_prefix('!') {
            Some(err) => Err(err),
            None => Ok(what),
        },
    ))
}

/// `probe` subcommand arguments, parsed by clap in main.
pub fn run(kind: &str, targets: &[SocketAddr], args: &ProbeArgs) -> Result<()> {
    match kind {
        "connect" => {
            let r = connect_latency(
                targets,
                &args.expect,
                args.count,
                100,
                Duration::from_secs_f64(args.secs),
            );
            println!("{}", serde_json::to_string(&r)?);
        }
        "flood" => {
            let r = flood(
                targets[0],
                &args.expect,
                args.threads,
                args.secs,
                args.count as u64,
            );
            println!("{}", serde_json::to_string(&r)?);
        }
        "follow" => follow(targets[0], args.secs)?,
        other => bail!("unknown probe {other}: connect, flood or follow"),
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct ProbeArgs {
    pub expect: String,
    pub count: usize,
    pub secs: f64,
    pub threads: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follow_lines() {
        assert_eq!(parse_follow_line("123 A"), Some((123, Ok("A"))));
        assert_eq!(parse_follow_line("7 !refused"), Some((7, Err("refused"))));
        assert_eq!(parse_follow_line("x A"), None);
        assert_eq!(parse_follow_line(""), None);
    }

    #[test]
    fn monotonic_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a && a > 0);
    }
}
