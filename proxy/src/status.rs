//! `kproxy status`: the frontends as read back from the kernel, plus what
//! the running `kproxy run` left out (asked on its metrics address): IPv6
//! parts of Services are marked, never silently absent.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::dataplane::ProgrammedFrontend;
use crate::model::Rejection;

/// The current rejections of the kproxy whose metrics server is at `addr`;
/// `None` when it cannot be asked (not running, metrics disabled).
pub fn rejections(addr: &str) -> Option<Vec<Rejection>> {
    let addr: SocketAddr = addr.parse().ok()?;
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        conn,
        "GET /kproxy/rejections HTTP/1.0\r\nHost: {addr}\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return None;
    }
    serde_json::from_str(body).ok()
}

/// Rejections that mean "this part of a Service is not programmed because
/// kproxy does not support it": IPv6.
fn unsupported(rejected: &[Rejection]) -> impl Iterator<Item = &Rejection> {
    rejected.iter().filter(|r| r.reason == "ipv6_unsupported")
}

/// `-o json`: the programmed frontends, then one entry per Service whose
/// IPv6 part is not programmed (`"programmed": false` and why).
pub fn json(frontends: &[ProgrammedFrontend], rejected: &[Rejection]) -> serde_json::Value {
    let mut rows: Vec<serde_json::Value> = frontends
        .iter()
        .map(|f| serde_json::to_value(f).unwrap_or_default())
        .collect();
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
/// it could not be asked).
pub fn report(frontends: &[ProgrammedFrontend], rejected: Option<&[Rejection]>) -> String {
    let mut out = table(frontends);
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
    out
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
    let mut widths = headers.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 4]| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(headers);
    for row in &rows {
        line([&row[0], &row[1], &row[2], &row[3]]);
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
        let rows = json(&[], &[v6()]);
        assert_eq!(rows[0]["service"], "default/web6");
        assert_eq!(rows[0]["programmed"], false);
        let text = report(&[], Some(&[v6()]));
        assert!(text.contains("default/web6  [IPv6]"), "{text}");
        assert!(report(&[], None).contains("could not be asked"));
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
