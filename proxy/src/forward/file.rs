//! The file of `kproxy forward -f`: a YAML list of forwards (or a mapping
//! with a `forwards:` list), each with `target` and `ports` as on the
//! command line, and optionally `namespace`, `context`, `cluster`, `user`,
//! `kubeconfig` and `address`; what an entry leaves out comes from the
//! command's flags.
//!
//! ```yaml
//! forwards:
//! - target: svc/api
//!   ports: ["8080:80"]
//!   namespace: prod
//!   context: prod
//! - target: svc/dns
//!   ports: ["5353:53/udp"]
//!   namespace: kube-system
//! ```

use std::path::Path;

use serde::Deserialize;

use super::{ForwardError, ForwardSpec, Impersonate};
use crate::cli::ForwardArgs;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wrapped {
    forwards: Vec<ForwardSpec>,
}

/// The forwards of `path`, each with its display name (`svc/api -n prod`).
pub fn load(path: &Path, args: &ForwardArgs) -> Result<Vec<(String, ForwardSpec)>, ForwardError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ForwardError::Config(format!("cannot read {}: {e}", path.display())))?;
    parse(&text, args).map_err(|e| ForwardError::Config(format!("{}: {e}", path.display())))
}

fn parse(text: &str, args: &ForwardArgs) -> Result<Vec<(String, ForwardSpec)>, String> {
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let specs: Vec<ForwardSpec> = match value {
        serde_yaml::Value::Sequence(_) => {
            serde_yaml::from_value(value).map_err(|e| e.to_string())?
        }
        serde_yaml::Value::Mapping(_) => {
            serde_yaml::from_value::<Wrapped>(value)
                .map_err(|e| e.to_string())?
                .forwards
        }
        _ => return Err("expected a list of forwards (or forwards: [...])".into()),
    };
    if specs.is_empty() {
        return Err("no forwards in the file".into());
    }
    let mut out = Vec::new();
    for (i, mut spec) in specs.into_iter().enumerate() {
        if spec.target.is_empty() || spec.ports.is_empty() {
            return Err(format!(
                "forward {} needs a target and at least one port",
                i + 1
            ));
        }
        let mut name = spec.target.clone();
        if let Some(ns) = &spec.namespace {
            name.push_str(&format!(" -n {ns}"));
        }
        if let Some(ctx) = &spec.context {
            name.push_str(&format!(" --context {ctx}"));
        }
        spec.namespace = spec.namespace.or_else(|| args.namespace.clone());
        spec.context = spec.context.or_else(|| args.context.clone());
        spec.cluster = spec.cluster.or_else(|| args.cluster.clone());
        spec.user = spec.user.or_else(|| args.user.clone());
        spec.server = args.server.clone();
        spec.token = args.token.clone();
        spec.insecure_skip_tls_verify = args.insecure_skip_tls_verify;
        spec.impersonate = Impersonate::from_args(args);
        spec.kubeconfig = spec.kubeconfig.or_else(|| args.kubeconfig.clone());
        if spec.address.is_empty() {
            spec.address = args.address.clone();
        }
        out.push((name, spec));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> ForwardArgs {
        let mut argv = vec!["kproxy", "forward", "-f", "x.yaml"];
        argv.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(argv).unwrap().command {
            crate::cli::Command::Forward(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn entries_take_the_flags_they_leave_out() {
        let text = "forwards:\n- target: svc/api\n  ports: ['8080:80']\n  namespace: prod\n- target: pod/db\n  ports: ['5432', '9187:metrics']\n  address: ['0.0.0.0']\n";
        let got = parse(text, &args(&["-n", "dev", "--context", "c1"])).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "svc/api -n prod");
        assert_eq!(got[0].1.namespace.as_deref(), Some("prod"));
        assert_eq!(got[0].1.context.as_deref(), Some("c1"));
        assert_eq!(got[0].1.address, vec!["localhost"]);
        assert_eq!(got[1].0, "pod/db");
        assert_eq!(got[1].1.namespace.as_deref(), Some("dev"));
        assert_eq!(got[1].1.ports, vec!["5432", "9187:metrics"]);
        assert_eq!(got[1].1.address, vec!["0.0.0.0"]);
        // A bare list works too.
        let got = parse("- target: pod/x\n  ports: ['1']\n", &args(&[])).unwrap();
        assert_eq!(got[0].0, "pod/x");
    }

    #[test]
    fn mistakes_are_named() {
        let e = parse("- target: pod/x\n  port: ['1']\n", &args(&[])).unwrap_err();
        assert!(e.contains("unknown field `port`"), "{e}");
        let e = parse("- target: pod/x\n  ports: []\n", &args(&[])).unwrap_err();
        assert!(
            e.contains("forward 1 needs a target and at least one port"),
            "{e}"
        );
        assert!(parse("forwards: []\n", &args(&[]))
            .unwrap_err()
            .contains("no forwards"));
        assert!(parse("just text", &args(&[]))
            .unwrap_err()
            .contains("expected a list"));
    }

    #[test]
    fn the_cli_takes_a_file_or_a_target() {
        use crate::cli::Cli;
        assert!(Cli::try_parse_from(["kproxy", "forward", "-f", "x.yaml"]).is_ok());
        assert!(Cli::try_parse_from(["kproxy", "forward", "pod/x", "80"]).is_ok());
        assert!(Cli::try_parse_from(["kproxy", "forward", "-f", "x.yaml", "pod/x", "80"]).is_err());
        assert!(Cli::try_parse_from(["kproxy", "forward"]).is_err());
    }
}
