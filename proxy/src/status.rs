//! `kproxy status` table output.

use crate::dataplane::ProgrammedFrontend;

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
