//! The command line as kube-proxy's DaemonSets write it, turned into
//! `kproxy` subcommand syntax before clap sees it:
//!
//! - invoked as `kube-proxy` (the image installs the same binary under that
//!   name), or as `kproxy` with flags but no subcommand: `run` is implied;
//! - flag names are normalized as Kubernetes components do (pflag's
//!   `WordSepNormalizeFunc`): `--add_dir_header` is `--add-dir-header`.

use std::ffi::OsString;
use std::path::Path;

/// Subcommand names of `kproxy` (clap's `help` included).
const SUBCOMMANDS: &[&str] = &[
    "run",
    "cleanup",
    "cleanup-kube-proxy",
    "status",
    "render",
    "forward",
    "help",
];

/// Names under which the binary behaves as kube-proxy (no subcommands).
const KUBE_PROXY_NAMES: &[&str] = &["kube-proxy"];

/// The program name (`argv[0]` without its directory).
pub fn program_name(argv0: &OsString) -> String {
    Path::new(argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Rewrites `argv` (program name first) into `kproxy` syntax; see the module doc.
pub fn normalize(argv: Vec<OsString>) -> Vec<OsString> {
    let mut it = argv.into_iter();
    let Some(argv0) = it.next() else {
        return vec![OsString::from("kproxy")];
    };
    let rest: Vec<OsString> = it.map(normalize_flag_name).collect();
    let as_kube_proxy = KUBE_PROXY_NAMES.contains(&program_name(&argv0).as_str());
    let has_subcommand = rest
        .iter()
        .any(|a| a.to_str().is_some_and(|s| SUBCOMMANDS.contains(&s)));
    let first_is_flag = rest
        .first()
        .and_then(|a| a.to_str())
        .is_some_and(|s| s.starts_with('-') && !matches!(s, "-h" | "--help" | "-V" | "--version"));
    let implied_run = if as_kube_proxy {
        // kube-proxy has no subcommands: everything is `run`'s, `--help` too.
        true
    } else {
        first_is_flag && !has_subcommand
    };
    // kube-proxy's `--version[=true|raw]` prints the version and exits
    // (`--version=false` is a no-op): version scripts run it on the image.
    let mut rest = rest;
    if implied_run {
        let version = |a: &OsString| match a.to_str() {
            Some("--version") => Some(true),
            Some(s) => s.strip_prefix("--version=").map(|v| v != "false"),
            None => None,
        };
        if rest.iter().any(|a| version(a) == Some(true)) {
            return vec![argv0, OsString::from("--version")];
        }
        rest.retain(|a| version(a).is_none());
    }
    let mut out = Vec::with_capacity(rest.len() + 2);
    out.push(argv0);
    if implied_run {
        out.push(OsString::from("run"));
    }
    out.extend(rest);
    out
}

/// `--log_dir=x` -> `--log-dir=x`; values and non-flags are left alone.
fn normalize_flag_name(arg: OsString) -> OsString {
    let Some(s) = arg.to_str() else {
        return arg;
    };
    let Some(body) = s.strip_prefix("--") else {
        return arg;
    };
    let (name, value) = match body.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (body, None),
    };
    if !name.contains('_') {
        return arg;
    }
    let name = name.replace('_', "-");
    OsString::from(match value {
        Some(v) => format!("--{name}={v}"),
        None => format!("--{name}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(args: &[&str]) -> Vec<String> {
        normalize(args.iter().map(OsString::from).collect())
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn kube_proxy_name_implies_run() {
        assert_eq!(
            norm(&["/usr/local/bin/kube-proxy", "--config=/c", "--v=2"]),
            ["/usr/local/bin/kube-proxy", "run", "--config=/c", "--v=2"]
        );
        assert_eq!(norm(&["kube-proxy"]), ["kube-proxy", "run"]);
        assert_eq!(
            norm(&["kube-proxy", "--help"]),
            ["kube-proxy", "run", "--help"]
        );
    }

    #[test]
    fn kproxy_with_flags_and_no_subcommand_is_run() {
        assert_eq!(
            norm(&["kproxy", "--config", "/c"]),
            ["kproxy", "run", "--config", "/c"]
        );
        assert_eq!(
            norm(&["kproxy", "status", "-o", "json"]),
            ["kproxy", "status", "-o", "json"]
        );
        assert_eq!(
            norm(&["kproxy", "--v=2", "status"]),
            ["kproxy", "--v=2", "status"]
        );
        // Help and version stay kproxy's own.
        assert_eq!(norm(&["kproxy", "--help"]), ["kproxy", "--help"]);
        assert_eq!(norm(&["kproxy"]), ["kproxy"]);
    }

    #[test]
    fn kube_proxys_version_flag_prints_the_version() {
        for flag in ["--version", "--version=true", "--version=raw"] {
            assert_eq!(
                norm(&["kube-proxy", "--v=2", flag]),
                ["kube-proxy", "--version"]
            );
        }
        assert_eq!(
            norm(&["kube-proxy", "--version=false", "--v=2"]),
            ["kube-proxy", "run", "--v=2"]
        );
        assert_eq!(norm(&["kproxy", "--version"]), ["kproxy", "--version"]);
    }

    #[test]
    fn underscores_in_flag_names_become_dashes() {
        assert_eq!(
            norm(&["kproxy", "run", "--log_dir=/a_b", "--add_dir_header", "x_y"]),
            ["kproxy", "run", "--log-dir=/a_b", "--add-dir-header", "x_y"]
        );
    }
}
