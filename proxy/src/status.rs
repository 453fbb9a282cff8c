//! `kproxy status`: the frontends as read back from the kernel, plus what
//! the running `kproxy run` reports (asked on its metrics address): what
//! it left out (IPv6 parts of Services are marked, never silently absent),
//! and each frontend's status (pending, applied, error) with the
//! frontends not applied listed.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::dataplane::ProgrammedFrontend;
use crate::model::Rejection;
use crate::sync::frontends::{FrontendStatus, Report, Status};

/// `path` of the kproxy whose metrics server is at `addr`, as JSON; `None`
/// when it cannot be asked (not running, metrics disabled).
fn get_json<T: serde::de::DeserializeOwned>(addr: &str, path: &str) -> Option<T> {
    let addr: SocketAddr = addr.parse().ok()?;
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    // The whole table of a large node takes a moment to encode.
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return None;
    }
    serde_json::from_str(body).ok()
}

/// The current rejections of the kproxy whose metrics server is at `addr`.
pub fn rejections(addr: &str) -> Option<Vec<Rejection>> {
    get_json(addr, "/kproxy/rejections")
}

/// Each frontend's status as the kproxy at `addr` has it: the counts and
/// the frontends not applied (`all`: every frontend).
pub fn frontends(addr: &str, all: bool) -> Option<Report> {
    get_json(
        addr,
        if all {
            "/kproxy/frontends?all=true"
        } else {
            "/kproxy/frontends"
        },
    )
}

/// Rejections that mean "this part of a Service is not programmed because
/// kproxy does not support it": IPv6.
fn unsupported(rejected: &[Rejection]) -> impl Iterator<Item = &Rejection> {
    rejected.iter().filter(|r| r.reason == "ipv6_unsupported")
}

/// `-o json`: the programmed frontends (with `status`, `attempts` and the
/// error where the running kproxy reports one that is not applied, or
/// every status with `--all`), then one entry per frontend in error that
/// the kernel does not have and per Service whose IPv6 part is not
/// programmed (`"programmed": false` and why).
pub fn json(
    frontends: &[ProgrammedFrontend],
    rejected: &[Rejection],
    status: Option<&Report>,
) -> serde_json::Value {
    let mut known: HashMap<(&str, &str, &str), &FrontendStatus> = status
        .map(|r| {
            r.frontends
                .iter()
                .map(|f| {
                    (
                        (f.service.as_str(), f.kind.as_str(), f.frontend.as_str()),
                        f,
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let annotate = |row: &mut serde_json::Value, f: &FrontendStatus| {
        row["status"] = serde_json::json!(f.status);
        row["attempts"] = serde_json::json!(f.attempts);
        if let Some(reason) = &f.reason {
            row["reason"] = serde_json::json!(reason);
        }
        if let Some(error) = &f.error {
            row["error"] = serde_json::json!(error);
        }
    };
    let mut rows: Vec<serde_json::Value> = frontends
        .iter()
        .map(|f| {
            let mut row = serde_json::to_value(f).unwrap_or_default();
            if let Some(st) =
                known.remove(&(f.service.as_str(), f.kind.as_str(), f.frontend.as_str()))
            {
                annotate(&mut row, st);
            }
            row
        })
        .collect();
    let mut missing: Vec<&FrontendStatus> = known
        .into_values()
        .filter(|f| f.status == Status::Error)
        .collect();
    missing.sort_by(|a, b| {
        (&a.service, &a.kind, &a.frontend).cmp(&(&b.service, &b.kind, &b.frontend))
    });
    for f in missing {
        let mut row = serde_json::json!({
            "service": f.service,
            "kind": f.kind,
            "frontend": f.frontend,
            "backends": [],
            "programmed": false,
        });
        annotate(&mut row, f);
        rows.push(row);
    }
    for r in unsupported(rejected) {
        rows.push(serde_json::json!({
            "service": format!("{}/{}", r.namespace, r.name),
            "kind": "IPv6",
            "frontend": r.field,
            "backends": [],
            "programmed": false,
            "reason": r.message,
        }));
    }
    serde_json::Value::Array(rows)
}

/// The table, then the parts left out by the running kproxy (`None`:
/// it could not be asked), then its frontends' status.
pub fn report(
    frontends: &[ProgrammedFrontend],
    rejected: Option<&[Rejection]>,
    status: Option<&Report>,
) -> String {
    let mut out = table(frontends);
    out.push_str(&summary(rejected, status));
    out
}

/// What the running kproxy reports: the parts it left out, then the count
/// of frontends by status and the ones not applied (all of them when the
/// report holds them: `--all`). What `kproxy status --summary` prints.
pub fn summary(rejected: Option<&[Rejection]>, status: Option<&Report>) -> String {
    let mut out = String::new();
    match rejected {
        None => out.push_str(
            "\n(the running kproxy could not be asked what it left out: is its metrics server on --metrics-bind-address?)\n",
        ),
        Some(rejected) if !rejected.is_empty() => {
            out.push_str("\nNOT PROGRAMMED (as the running kproxy reports)\n");
            for r in rejected {
                let marker = if r.reason == "ipv6_unsupported" {
                    "IPv6"
                } else {
                    r.reason.as_str()
                };
                out.push_str(&format!(
                    "{}/{}  [{marker}]  {}: {}\n",
                    r.namespace, r.name, r.field, r.message
                ));
            }
        }
        Some(_) => {}
    }
    if let Some(report) = status {
        out.push_str(&status_section(report));
    }
    out
}

/// `FRONTENDS: n applied, n pending, n error`, then the frontends the
/// report lists (the ones not applied, unless `--all`).
fn status_section(report: &Report) -> String {
    let c = report.counts;
    let mut out = format!(
        "\nFRONTENDS (as the running kproxy reports): {} applied, {} pending, {} error\n",
        c.applied, c.pending, c.error
    );
    if !report.frontends.is_empty() {
        let rows: Vec<[String; 6]> = report
            .frontends
            .iter()
            .map(|f| {
                let mut detail = f.error.clone().unwrap_or_default();
                let mut when = vec![format!("for {}", seconds(f.for_seconds))];
                if let Some(r) = f.retry_in_seconds {
                    when.push(format!("next retry in {}", seconds(r)));
                }
                if f.status != Status::Applied {
                    if !detail.is_empty() {
                        detail.push(' ');
                    }
                    detail.push_str(&format!("({})", when.join(", ")));
                }
                [
                    f.service.clone(),
                    f.kind.clone(),
                    f.frontend.clone(),
                    f.status.as_str().to_string(),
                    f.attempts.to_string(),
                    detail,
                ]
            })
            .collect();
        out.push_str(&aligned(
            ["SERVICE", "TYPE", "FRONTEND", "STATUS", "ATTEMPTS", "ERROR"],
            &rows,
        ));
    }
    let listed_applied = report
        .frontends
        .iter()
        .filter(|f| f.status == Status::Applied)
        .count();
    if c.applied > 0 && listed_applied == 0 {
        out.push_str(&format!(
            "({} applied frontends not listed: `kproxy status --all` lists every frontend)\n",
            c.applied
        ));
    }
    out
}

/// `12s`, `3m05s`.
fn seconds(s: f64) -> String {
    let s = s.round() as u64;
    if s < 60 {
        format!("{s}s")
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// A plain aligned table: SERVICE, TYPE, FRONTEND, BACKENDS (one backend per line).
pub fn table(frontends: &[ProgrammedFrontend]) -> String {
    let headers = ["SERVICE", "TYPE", "FRONTEND", "BACKENDS"];
    let rows: Vec<[String; 4]> = frontends
        .iter()
        .map(|f| {
            let backends = if f.backends.is_empty() {
                "(none: rejected)".to_string()
            } else {
                f.backends.join(", ")
            };
            [
                f.service.clone(),
                f.kind.clone(),
                f.frontend.clone(),
                backends,
            ]
        })
        .collect();
    aligned(headers, &rows)
}

/// Columns padded to their widest cell, two spaces apart.
fn aligned<const N: usize>(headers: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = headers.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; N]| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(headers);
    for row in rows {
        line(std::array::from_fn(|i| row[i].as_str()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6() -> Rejection {
        Rejection {
            kind: "Service".into(),
            namespace: "default".into(),
            name: "web6".into(),
            field: "spec.clusterIPs".into(),
            reason: "ipv6_unsupported".into(),
            message: "ClusterIP fd00::10 not programmed".into(),
            origin: None,
        }
    }

    #[test]
    fn ipv6_services_are_marked() {
        let rows = json(&[], &[v6()], None);
        assert_eq!(rows[0]["service"], "default/web6");
        assert_eq!(rows[0]["programmed"], false);
        let text = report(&[], Some(&[v6()]), None);
        assert!(text.contains("default/web6  [IPv6]"), "{text}");
        assert!(report(&[], None, None).contains("could not be asked"));
    }

    /// 10,000 applied, one in error that the kernel does not have, one
    /// pending that it has (with its old backends).
    fn agent_report() -> Report {
        use crate::sync::frontends::Counts;
        Report {
            counts: Counts {
                applied: 10_000,
                pending: 1,
                error: 1,
            },
            frontends: vec![
                FrontendStatus {
                    service: "default/big:http".into(),
                    kind: "ClusterIP".into(),
                    frontend: "10.96.0.50:80/tcp".into(),
                    status: Status::Error,
                    attempts: 3,
                    reason: Some("map_full".into()),
                    error: Some("Service default/big:http (tcp) not fully programmed: BPF map SLOTS is full (262144 entries); raise --bpf-backend-map-max".into()),
                    for_seconds: 7.2,
                    retry_in_seconds: Some(3.9),
                },
                FrontendStatus {
                    service: "default/web:http".into(),
                    kind: "ClusterIP".into(),
                    frontend: "10.96.0.10:80/tcp".into(),
                    status: Status::Pending,
                    attempts: 0,
                    reason: None,
                    error: None,
                    for_seconds: 0.0,
                    retry_in_seconds: None,
                },
            ],
        }
    }

    fn web() -> ProgrammedFrontend {
        ProgrammedFrontend {
            service: "default/web:http".into(),
            kind: "ClusterIP".into(),
            frontend: "10.96.0.10:80/tcp".into(),
            backends: vec!["10.244.1.10:8080".into()],
        }
    }

    #[test]
    fn the_frontends_not_applied_are_listed_under_the_counts() {
        let text = report(&[web()], Some(&[]), Some(&agent_report()));
        let expected = "\
SERVICE           TYPE       FRONTEND           BACKENDS
default/web:http  ClusterIP  10.96.0.10:80/tcp  10.244.1.10:8080

FRONTENDS (as the running kproxy reports): 10000 applied, 1 pending, 1 error
SERVICE           TYPE       FRONTEND           STATUS   ATTEMPTS  ERROR
default/big:http  ClusterIP  10.96.0.50:80/tcp  error    3         Service default/big:http (tcp) not fully programmed: BPF map SLOTS is full (262144 entries); raise --bpf-backend-map-max (for 7s, next retry in 4s)
default/web:http  ClusterIP  10.96.0.10:80/tcp  pending  0         (for 0s)
(10000 applied frontends not listed: `kproxy status --all` lists every frontend)
";
        assert_eq!(text, expected, "got:\n{text}");
        // Nothing wrong: one line.
        let quiet = Report {
            counts: crate::sync::frontends::Counts {
                applied: 2,
                pending: 0,
                error: 0,
            },
            frontends: vec![],
        };
        assert_eq!(
            summary(Some(&[]), Some(&quiet)),
            "\nFRONTENDS (as the running kproxy reports): 2 applied, 0 pending, 0 error\n(2 applied frontends not listed: `kproxy status --all` lists every frontend)\n"
        );
    }

    #[test]
    fn json_rows_carry_the_status_and_errors_the_kernel_lacks_are_added() {
        let rows = json(&[web()], &[], Some(&agent_report()));
        let rows = rows.as_array().unwrap();
        assert_eq!(rows.len(), 2, "{rows:#?}");
        assert_eq!(rows[0]["service"], "default/web:http");
        assert_eq!(rows[0]["status"], "pending");
        assert_eq!(rows[0]["backends"][0], "10.244.1.10:8080");
        assert_eq!(rows[1]["service"], "default/big:http");
        assert_eq!(rows[1]["status"], "error");
        assert_eq!(rows[1]["programmed"], false);
        assert_eq!(rows[1]["attempts"], 3);
        assert_eq!(rows[1]["reason"], "map_full");
        // Without the agent, the rows are the kernel's as before.
        let plain = json(&[web()], &[], None);
        assert_eq!(
            plain,
            serde_json::json!([serde_json::to_value(web()).unwrap()])
        );
    }

    #[test]
    fn aligns_columns() {
        let t = table(&[ProgrammedFrontend {
            service: "default/web:http".into(),
            kind: "ClusterIP".into(),
            frontend: "10.96.0.10:80/tcp".into(),
            backends: vec!["10.244.1.10:8080".into(), "10.244.2.10:8080".into()],
        }]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("SERVICE"));
        assert_eq!(lines[0].find("TYPE"), lines[1].find("ClusterIP"));
    }
}
