//! Parsing of `kproxy forward` arguments: the target (`pod/NAME`,
//! `svc/NAME`, ...), port pairs (`LOCAL:REMOTE`, `:REMOTE`, `PORT`, a remote
//! port by name) and `--address`. Pure: no I/O.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("unknown target kind {kind:?} in {target:?} (expected pod/, svc/, deploy/, statefulset/, rs/, ds/, job/ or rc/)")]
    UnknownKind { kind: String, target: String },
    #[error("target {0:?} has no name (expected KIND/NAME, e.g. pod/web)")]
    EmptyName(String),
    #[error("port {port} in {spec:?} is out of range (1-65535)")]
    OutOfRange { port: String, spec: String },
    #[error("invalid port {port:?} in {spec:?}: expected a number or a port name")]
    InvalidPort { port: String, spec: String },
    #[error("invalid --address {0:?}: expected localhost or an IP address")]
    InvalidAddress(String),
    #[error("unsupported protocol {protocol:?} in {spec:?} (expected tcp or udp)")]
    Protocol { protocol: String, spec: String },
}

/// The kind of a forward target, with kubectl's names for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Pod,
    Service,
    Deployment,
    StatefulSet,
    ReplicaSet,
    DaemonSet,
    Job,
    ReplicationController,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        // kubectl accepts the short name, singular, plural and `.group` forms.
        let s = s.to_ascii_lowercase();
        let base = [".v1.apps", ".apps", ".v1.batch", ".batch"]
            .iter()
            .find_map(|g| s.strip_suffix(g))
            .unwrap_or(&s);
        Some(match base {
            "po" | "pod" | "pods" => Kind::Pod,
            "svc" | "service" | "services" => Kind::Service,
            "deploy" | "deployment" | "deployments" => Kind::Deployment,
            "sts" | "statefulset" | "statefulsets" => Kind::StatefulSet,
            "rs" | "replicaset" | "replicasets" => Kind::ReplicaSet,
            "ds" | "daemonset" | "daemonsets" => Kind::DaemonSet,
            "job" | "jobs" => Kind::Job,
            "rc" | "replicationcontroller" | "replicationcontrollers" => {
                Kind::ReplicationController
            }
            _ => return None,
        })
    }

    /// The name used in messages (`service web`).
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Pod => "pod",
            Kind::Service => "service",
            Kind::Deployment => "deployment",
            Kind::StatefulSet => "statefulset",
            Kind::ReplicaSet => "replicaset",
            Kind::DaemonSet => "daemonset",
            Kind::Job => "job",
            Kind::ReplicationController => "replicationcontroller",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: Kind,
    pub name: String,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.noun(), self.name)
    }
}

/// `KIND/NAME`, or a bare `NAME` (a pod, as kubectl).
pub fn parse_target(s: &str) -> Result<Target, SpecError> {
    let (kind, name) = match s.split_once('/') {
        Some((k, n)) => (
            Kind::parse(k).ok_or_else(|| SpecError::UnknownKind {
                kind: k.to_string(),
                target: s.to_string(),
            })?,
            n,
        ),
        None => (Kind::Pod, s),
    };
    if name.is_empty() || name.contains('/') {
        return Err(SpecError::EmptyName(s.to_string()));
    }
    Ok(Target {
        kind,
        name: name.to_string(),
    })
}

/// The remote side of a port pair: a number, or a port's name (the
/// container port's name; for a Service, the Service port's name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemotePort {
    Number(u16),
    Name(String),
}

impl fmt::Display for RemotePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RemotePort::Number(n) => write!(f, "{n}"),
            RemotePort::Name(n) => write!(f, "{n}"),
        }
    }
}

/// The protocol of a port pair (`53/udp`; TCP when not said).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    /// As Kubernetes spells it (`TCP`, `UDP`).
    pub fn k8s(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPair {
    /// 0: pick a free port.
    pub local: u16,
    pub remote: RemotePort,
    pub protocol: Protocol,
    /// The bare `PORT` form: the local port is the remote port's number,
    /// which for a name is only known once resolved (kubectl: the container
    /// port, or for a Service the Service port); `local` is 0 until then.
    pub same: bool,
}

/// As given (`8080:80`, `:http`, `http`, `53/udp`).
impl fmt::Display for PortPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.same, self.local) {
            (true, _) => write!(f, "{}", self.remote)?,
            (false, 0) => write!(f, ":{}", self.remote)?,
            (false, l) => write!(f, "{l}:{}", self.remote)?,
        }
        if self.protocol == Protocol::Udp {
            write!(f, "/udp")?;
        }
        Ok(())
    }
}

fn parse_number(p: &str, spec: &str) -> Option<Result<u16, SpecError>> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let out_of_range = || SpecError::OutOfRange {
        port: p.to_string(),
        spec: spec.to_string(),
    };
    Some(match p.parse::<u64>() {
        Ok(n) if n <= 65535 => Ok(n as u16),
        _ => Err(out_of_range()),
    })
}

/// A port name as Kubernetes allows it (IANA_SVC_NAME: at most 15
/// characters, lowercase letters, digits and '-', at least one letter).
fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn parse_remote(p: &str, spec: &str) -> Result<RemotePort, SpecError> {
    match parse_number(p, spec) {
        Some(Ok(0)) => Err(SpecError::OutOfRange {
            port: p.to_string(),
            spec: spec.to_string(),
        }),
        Some(r) => r.map(RemotePort::Number),
        None if is_port_name(p) => Ok(RemotePort::Name(p.to_string())),
        None => Err(SpecError::InvalidPort {
            port: p.to_string(),
            spec: spec.to_string(),
        }),
    }
}

/// `LOCAL:REMOTE`, `:REMOTE` (a free local port), or `PORT` (the same on
/// both sides; for a name, its number once resolved), optionally followed by `/udp` or `/tcp`. REMOTE may be a
/// port name; LOCAL 0 picks a free port.
pub fn parse_port_pair(full: &str) -> Result<PortPair, SpecError> {
    let (spec, protocol) = match full.rsplit_once('/') {
        Some((s, p)) if p.eq_ignore_ascii_case("udp") => (s, Protocol::Udp),
        Some((s, p)) if p.eq_ignore_ascii_case("tcp") => (s, Protocol::Tcp),
        Some((_, p)) => {
            return Err(SpecError::Protocol {
                protocol: p.to_string(),
                spec: full.to_string(),
            })
        }
        None => (full, Protocol::Tcp),
    };
    parse_ports(spec).map(|mut p| {
        p.protocol = protocol;
        p
    })
}

fn parse_ports(spec: &str) -> Result<PortPair, SpecError> {
    match spec.split_once(':') {
        Some((local, remote)) => {
            let local = if local.is_empty() {
                0
            } else {
                match parse_number(local, spec) {
                    Some(r) => r?,
                    None => {
                        return Err(SpecError::InvalidPort {
                            port: local.to_string(),
                            spec: spec.to_string(),
                        })
                    }
                }
            };
            Ok(PortPair {
                local,
                remote: parse_remote(remote, spec)?,
                protocol: Protocol::Tcp,
                same: false,
            })
        }
        None => {
            let remote = parse_remote(spec, spec)?;
            Ok(PortPair {
                local: match remote {
                    RemotePort::Number(n) => n,
                    RemotePort::Name(_) => 0,
                },
                remote,
                protocol: Protocol::Tcp,
                same: true,
            })
        }
    }
}

/// One local address to listen on. `required: false` for `::1` from
/// `localhost` (skipped where the host has no IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindAddr {
    pub ip: IpAddr,
    pub required: bool,
}

/// `--address` values (each may be a comma-separated list): `localhost`
/// is 127.0.0.1 and, when available, ::1.
pub fn parse_addresses(values: &[String]) -> Result<Vec<BindAddr>, SpecError> {
    let mut out: Vec<BindAddr> = Vec::new();
    let mut push = |a: BindAddr| {
        if let Some(existing) = out.iter_mut().find(|b| b.ip == a.ip) {
            existing.required |= a.required;
        } else {
            out.push(a);
        }
    };
    for part in values
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        if part.eq_ignore_ascii_case("localhost") {
            push(BindAddr {
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                required: true,
            });
            push(BindAddr {
                ip: IpAddr::V6(Ipv6Addr::LOCALHOST),
                required: false,
            });
            continue;
        }
        let ip = part
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .map_err(|_| SpecError::InvalidAddress(part.to_string()))?;
        push(BindAddr { ip, required: true });
    }
    if out.is_empty() {
        return parse_addresses(&["localhost".to_string()]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(s: &str) -> Result<PortPair, SpecError> {
        parse_port_pair(s)
    }
    fn num(local: u16, remote: u16) -> PortPair {
        PortPair {
            local,
            remote: RemotePort::Number(remote),
            protocol: Protocol::Tcp,
            same: false,
        }
    }
    fn same(n: u16) -> PortPair {
        PortPair {
            same: true,
            ..num(n, n)
        }
    }

    #[test]
    fn targets_with_kubectl_aliases() {
        for (s, kind) in [
            ("pod/x", Kind::Pod),
            ("pods/x", Kind::Pod),
            ("po/x", Kind::Pod),
            ("x", Kind::Pod),
            ("svc/x", Kind::Service),
            ("service/x", Kind::Service),
            ("services/x", Kind::Service),
            ("deploy/x", Kind::Deployment),
            ("deployment/x", Kind::Deployment),
            ("deployments.apps/x", Kind::Deployment),
            ("Deployment/x", Kind::Deployment),
            ("sts/x", Kind::StatefulSet),
            ("statefulset/x", Kind::StatefulSet),
            ("statefulsets/x", Kind::StatefulSet),
            ("rs/x", Kind::ReplicaSet),
            ("replicaset/x", Kind::ReplicaSet),
            ("replicasets.apps/x", Kind::ReplicaSet),
            ("ds/x", Kind::DaemonSet),
            ("daemonsets.apps/x", Kind::DaemonSet),
            ("job/x", Kind::Job),
            ("jobs.batch/x", Kind::Job),
            ("rc/x", Kind::ReplicationController),
            ("replicationcontrollers/x", Kind::ReplicationController),
        ] {
            assert_eq!(
                parse_target(s).unwrap(),
                Target {
                    kind,
                    name: "x".into()
                },
                "{s}"
            );
        }
    }

    #[test]
    fn bad_targets_name_the_cause() {
        let e = parse_target("foo/x").unwrap_err();
        assert!(matches!(&e, SpecError::UnknownKind { kind, .. } if kind == "foo"));
        assert!(e.to_string().contains("unknown target kind \"foo\""), "{e}");
        assert!(matches!(
            parse_target("configmap/x"),
            Err(SpecError::UnknownKind { .. })
        ));
        assert!(matches!(parse_target("pod/"), Err(SpecError::EmptyName(_))));
        assert!(matches!(parse_target(""), Err(SpecError::EmptyName(_))));
        assert!(matches!(
            parse_target("pod/a/b"),
            Err(SpecError::EmptyName(_))
        ));
    }

    #[test]
    fn port_pair_forms() {
        assert_eq!(pair("8080:80").unwrap(), num(8080, 80));
        assert_eq!(pair(":80").unwrap(), num(0, 80));
        assert_eq!(pair("0:80").unwrap(), num(0, 80));
        assert_eq!(pair("80").unwrap(), same(80));
        assert_eq!(pair("65535").unwrap(), same(65535));
        assert_eq!(
            pair("8080:http").unwrap(),
            PortPair {
                local: 8080,
                remote: RemotePort::Name("http".into()),
                protocol: Protocol::Tcp,
                same: false,
            }
        );
        assert_eq!(
            pair(":web-2").unwrap(),
            PortPair {
                local: 0,
                remote: RemotePort::Name("web-2".into()),
                protocol: Protocol::Tcp,
                same: false,
            }
        );
        // As kubectl: a bare name is the same port on both sides, its
        // number decided once resolved.
        assert_eq!(
            pair("http").unwrap(),
            PortPair {
                local: 0,
                remote: RemotePort::Name("http".into()),
                protocol: Protocol::Tcp,
                same: true,
            }
        );
        for s in ["8080:80", ":http", "http", "53/udp", ":dns/udp", "8080"] {
            assert_eq!(pair(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn protocols() {
        let udp = |local, remote| PortPair {
            protocol: Protocol::Udp,
            ..num(local, remote)
        };
        assert_eq!(pair("5353:53/udp").unwrap(), udp(5353, 53));
        assert_eq!(
            pair("53/UDP").unwrap(),
            PortPair {
                same: true,
                ..udp(53, 53)
            }
        );
        assert_eq!(pair(":53/udp").unwrap(), udp(0, 53));
        assert_eq!(pair("8080:80/tcp").unwrap(), num(8080, 80));
        assert_eq!(
            pair("5353:dns/udp").unwrap().remote,
            RemotePort::Name("dns".into())
        );
        let e = pair("80/sctp").unwrap_err();
        assert!(matches!(e, SpecError::Protocol { .. }));
        assert!(
            e.to_string().contains("unsupported protocol \"sctp\""),
            "{e}"
        );
    }

    #[test]
    fn ports_out_of_range() {
        for s in [
            "0",
            "65536",
            "8080:0",
            "65536:80",
            "80:65536",
            "99999999999999999999:1",
            ":0",
        ] {
            let e = pair(s).unwrap_err();
            assert!(matches!(e, SpecError::OutOfRange { .. }), "{s}: {e:?}");
            assert!(e.to_string().contains("out of range"), "{e}");
        }
    }

    #[test]
    fn invalid_ports() {
        for s in [
            "",
            "-1",
            "80:",
            "a:80",
            "80:HTTP",
            "80:-x",
            "80:x--y",
            "1.5",
            "80:80:80",
            " 80",
            "80:abcdefghijklmnop",
        ] {
            assert!(
                matches!(
                    pair(s),
                    Err(SpecError::InvalidPort { .. }) | Err(SpecError::OutOfRange { .. })
                ),
                "{s}: {:?}",
                pair(s)
            );
        }
    }

    #[test]
    fn addresses() {
        let v4 = BindAddr {
            ip: "127.0.0.1".parse().unwrap(),
            required: true,
        };
        let v6 = BindAddr {
            ip: "::1".parse().unwrap(),
            required: false,
        };
        assert_eq!(parse_addresses(&[]).unwrap(), vec![v4, v6]);
        assert_eq!(
            parse_addresses(&["localhost".into()]).unwrap(),
            vec![v4, v6]
        );
        assert_eq!(parse_addresses(&["127.0.0.1".into()]).unwrap(), vec![v4]);
        assert_eq!(
            parse_addresses(&["localhost,::1".into()]).unwrap(),
            vec![
                v4,
                BindAddr {
                    required: true,
                    ..v6
                }
            ]
        );
        assert_eq!(
            parse_addresses(&["127.0.0.2, [::1]".into(), "0.0.0.0".into()])
                .unwrap()
                .len(),
            3
        );
        assert!(matches!(
            parse_addresses(&["example.com".into()]),
            Err(SpecError::InvalidAddress(_))
        ));
    }
}
