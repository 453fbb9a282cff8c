//! Values of kube-proxy's flags and config fields, parsed the way kube-proxy
//! parses them (Go booleans, addresses with or without a port, keywords).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

use crate::dataplane::{DetectLocalMode, ProxyMode};

/// A Go `strconv.ParseBool` value, as pflag accepts for boolean flags.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        other => Err(format!("{other:?} is not a boolean (true or false)")),
    }
}

/// `--healthz-bind-address` / `--metrics-bind-address`: an IP with an
/// optional port, or empty to disable the server (kube-proxy's forms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindSpec {
    Disabled,
    Addr { ip: IpAddr, port: Option<u16> },
}

impl BindSpec {
    /// The address to listen on: the spec's port, else `deprecated_port`
    /// (`--healthz-port`, `--metrics-port`; 0 disables, as in kube-proxy),
    /// else `default_port`.
    pub fn resolve(self, deprecated_port: Option<u16>, default_port: u16) -> Option<SocketAddr> {
        if deprecated_port == Some(0) {
            return None;
        }
        match self {
            BindSpec::Disabled => None,
            BindSpec::Addr { ip, port } => Some(SocketAddr::new(
                ip,
                port.or(deprecated_port).unwrap_or(default_port),
            )),
        }
    }
}

impl fmt::Display for BindSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BindSpec::Disabled => f.write_str("\"\" (disabled)"),
            BindSpec::Addr { ip, port: Some(p) } => write!(f, "{}", SocketAddr::new(*ip, *p)),
            BindSpec::Addr { ip, port: None } => write!(f, "{ip}"),
        }
    }
}

/// Parses `ip:port`, `[v6]:port`, a bare IP, or "" (disabled).
pub fn parse_bind_spec(s: &str) -> Result<BindSpec, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(BindSpec::Disabled);
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(BindSpec::Addr {
            ip: addr.ip(),
            port: Some(addr.port()),
        });
    }
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>()
        .map(|ip| BindSpec::Addr { ip, port: None })
        .map_err(|_| format!("{s:?} is not an address: expected ip:port, ip, or empty to disable"))
}

/// kube-proxy's default healthz and metrics addresses for a bind address:
/// `0.0.0.0` / `127.0.0.1`, or `::` / `::1` when the bind address is IPv6.
pub fn default_bind_ips(bind_address: Option<IpAddr>) -> (IpAddr, IpAddr) {
    match bind_address {
        Some(IpAddr::V6(_)) => (
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ),
        _ => (
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        ),
    }
}

/// One entry of `--nodeport-addresses`: a CIDR or one of kube-proxy's keywords.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodePortAddress {
    Cidr(IpNet),
    /// The Node's primary IP(s) (its first InternalIP of each family, or `--bind-address`).
    Primary,
}

impl NodePortAddress {
    /// `localhost` and `all` expand to CIDRs, as in kube-proxy.
    pub fn parse_list(s: &str) -> Result<Vec<NodePortAddress>, String> {
        let mut out = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item {
                "primary" => out.push(NodePortAddress::Primary),
                "localhost" => out.extend(
                    ["127.0.0.0/8", "::1/128"]
                        .iter()
                        .map(|c| NodePortAddress::Cidr(c.parse().expect("valid CIDR"))),
                ),
                "all" => out.extend(
                    ["0.0.0.0/0", "::/0"]
                        .iter()
                        .map(|c| NodePortAddress::Cidr(c.parse().expect("valid CIDR"))),
                ),
                cidr => out.push(NodePortAddress::Cidr(cidr.parse().map_err(|e| {
                    format!("{cidr:?} is not a CIDR nor primary/localhost/all: {e}")
                })?)),
            }
        }
        Ok(out)
    }
}

/// clap value parser for one comma-separated `--nodeport-addresses` value.
pub fn parse_nodeport_addresses(s: &str) -> Result<Vec<NodePortAddress>, String> {
    NodePortAddress::parse_list(s)
}

/// `--detect-local-mode` (kube-proxy's spellings; empty is the default).
pub fn parse_detect_local_mode(s: &str) -> Result<DetectLocalModeName, String> {
    match s {
        "" | "ClusterCIDR" => Ok(DetectLocalModeName::ClusterCidr),
        "NodeCIDR" => Ok(DetectLocalModeName::NodeCidr),
        "BridgeInterface" => Ok(DetectLocalModeName::BridgeInterface),
        "InterfaceNamePrefix" => Ok(DetectLocalModeName::InterfaceNamePrefix),
        other => Err(format!(
            "unknown detect-local-mode {other:?}: ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix"
        )),
    }
}

/// `--detect-local-mode` before the interface name is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectLocalModeName {
    #[default]
    ClusterCidr,
    NodeCidr,
    BridgeInterface,
    InterfaceNamePrefix,
}

impl DetectLocalModeName {
    /// With `--pod-bridge-interface` / `--pod-interface-name-prefix`;
    /// kube-proxy refuses an empty name for the interface modes.
    pub fn with_interfaces(self, bridge: &str, prefix: &str) -> Result<DetectLocalMode, String> {
        match self {
            DetectLocalModeName::ClusterCidr => Ok(DetectLocalMode::ClusterCidr),
            DetectLocalModeName::NodeCidr => Ok(DetectLocalMode::NodeCidr),
            DetectLocalModeName::BridgeInterface if valid_ifname(bridge) => {
                Ok(DetectLocalMode::BridgeInterface(bridge.to_string()))
            }
            DetectLocalModeName::BridgeInterface => Err(format!(
                "--detect-local-mode BridgeInterface needs --pod-bridge-interface (detectLocal.bridgeInterface) set to an interface name, got {bridge:?}"
            )),
            DetectLocalModeName::InterfaceNamePrefix if valid_ifname(prefix) => {
                Ok(DetectLocalMode::InterfaceNamePrefix(prefix.to_string()))
            }
            DetectLocalModeName::InterfaceNamePrefix => Err(format!(
                "--detect-local-mode InterfaceNamePrefix needs --pod-interface-name-prefix (detectLocal.interfaceNamePrefix) set to an interface name prefix, got {prefix:?}"
            )),
        }
    }
}

/// A Linux interface name (at most 15 bytes, no spaces, slashes or quotes):
/// it ends up in iptables rules.
fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b'"' | b'\'' | b'\\' | b'+'))
}

/// `--proxy-mode` as given: kube-proxy's modes plus kproxy's `ebpf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProxyModeArg {
    #[default]
    Iptables,
    Ebpf,
    /// kube-proxy's ipvs mode: kproxy runs iptables mode instead (warned at start).
    Ipvs,
    /// kube-proxy's nftables mode: kproxy runs iptables mode instead (warned at start).
    Nftables,
}

impl ProxyModeArg {
    /// The dataplane kproxy runs for this mode.
    pub fn mode(self) -> ProxyMode {
        match self {
            ProxyModeArg::Ebpf => ProxyMode::Ebpf,
            _ => ProxyMode::Iptables,
        }
    }

    /// Why the requested mode is not the one that runs, if it is not.
    pub fn substitution(self) -> Option<String> {
        match self {
            ProxyModeArg::Ipvs => Some(format!(
                "proxy mode {self} is not implemented by kproxy: running iptables mode, which serves Services the same way \
                 (remove kube-proxy's {self} leftovers with `kube-proxy --cleanup` from the old image; set --proxy-mode iptables or ebpf to silence this)"
            )),
            ProxyModeArg::Nftables => Some(format!(
                "proxy mode {self} is not implemented by kproxy: running iptables mode with nftables mode's node-port defaults \
                 (--nodeport-addresses primary unless set, no localhost node ports), which serves Services the same way \
                 (remove kube-proxy's {self} leftovers with `kube-proxy --cleanup` from the old image; set --proxy-mode iptables or ebpf to silence this)"
            )),
            _ => None,
        }
    }
}

impl fmt::Display for ProxyModeArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProxyModeArg::Iptables => "iptables",
            ProxyModeArg::Ebpf => "ebpf",
            ProxyModeArg::Ipvs => "ipvs",
            ProxyModeArg::Nftables => "nftables",
        })
    }
}

/// Parses `--proxy-mode` / `mode:`; empty is the default (iptables).
pub fn parse_proxy_mode(s: &str) -> Result<ProxyModeArg, String> {
    match s {
        "" | "iptables" => Ok(ProxyModeArg::Iptables),
        "ebpf" => Ok(ProxyModeArg::Ebpf),
        "ipvs" => Ok(ProxyModeArg::Ipvs),
        "nftables" => Ok(ProxyModeArg::Nftables),
        "kernelspace" => Err("proxy mode \"kernelspace\" is kube-proxy's Windows mode; on Linux use iptables or ebpf".into()),
        other => Err(format!(
            "unknown proxy mode {other:?}: iptables or ebpf (ipvs and nftables run as iptables)"
        )),
    }
}

/// `--feature-gates A=true,B=false` (kube-proxy's `MapStringBool`).
pub fn parse_feature_gates(s: &str) -> Result<BTreeMap<String, bool>, String> {
    let mut out = BTreeMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("feature gate {item:?} must be NAME=true or NAME=false"))?;
        let v = parse_go_bool(v.trim()).map_err(|e| format!("feature gate {k}: {e}"))?;
        out.insert(k.trim().to_string(), v);
    }
    Ok(out)
}

/// `--oom-score-adj`: -1000..=1000.
pub fn parse_oom_score_adj(s: &str) -> Result<i32, String> {
    let v: i32 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an integer"))?;
    if !(-1000..=1000).contains(&v) {
        return Err(format!("{v} is out of range: must be within [-1000, 1000]"));
    }
    Ok(v)
}

/// `--iptables-masquerade-bit`: 0..=31.
pub fn parse_masquerade_bit(s: &str) -> Result<u8, String> {
    let v: u8 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a bit number"))?;
    if v > 31 {
        return Err(format!("{v} is out of range: must be within [0, 31]"));
    }
    Ok(v)
}

/// A conntrack count (`--conntrack-max-per-core`, `--conntrack-min`): 0 or more.
pub fn parse_non_negative(s: &str) -> Result<u32, String> {
    let v: i64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an integer"))?;
    u32::try_from(v).map_err(|_| format!("{v} must be 0 or more"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_specs() {
        assert_eq!(parse_bind_spec(""), Ok(BindSpec::Disabled));
        let a = parse_bind_spec("0.0.0.0").unwrap();
        assert_eq!(
            a.resolve(None, 10256),
            Some("0.0.0.0:10256".parse().unwrap())
        );
        assert_eq!(
            a.resolve(Some(10266), 10256),
            Some("0.0.0.0:10266".parse().unwrap())
        );
        assert_eq!(a.resolve(Some(0), 10256), None);
        let b = parse_bind_spec("127.0.0.1:9000").unwrap();
        assert_eq!(
            b.resolve(Some(10266), 10249),
            Some("127.0.0.1:9000".parse().unwrap())
        );
        assert_eq!(
            parse_bind_spec("[::1]:10249").unwrap().resolve(None, 1),
            Some("[::1]:10249".parse().unwrap())
        );
        assert_eq!(
            parse_bind_spec("::").unwrap().resolve(None, 10256),
            Some("[::]:10256".parse().unwrap())
        );
        assert!(parse_bind_spec("localhost:10249").is_err());
    }

    #[test]
    fn nodeport_keywords() {
        let v = NodePortAddress::parse_list("primary,10.0.0.0/8").unwrap();
        assert_eq!(v[0], NodePortAddress::Primary);
        assert_eq!(NodePortAddress::parse_list("localhost").unwrap().len(), 2);
        assert_eq!(NodePortAddress::parse_list("all").unwrap().len(), 2);
        assert!(NodePortAddress::parse_list("10.0.0.0/33").is_err());
        assert!(NodePortAddress::parse_list("").unwrap().is_empty());
    }

    #[test]
    fn modes_and_gates() {
        assert_eq!(parse_proxy_mode(""), Ok(ProxyModeArg::Iptables));
        assert_eq!(
            parse_proxy_mode("ipvs").unwrap().mode(),
            ProxyMode::Iptables
        );
        assert!(parse_proxy_mode("ipvs").unwrap().substitution().is_some());
        assert!(parse_proxy_mode("ebpf").unwrap().substitution().is_none());
        assert!(parse_proxy_mode("kernelspace").is_err());
        let g = parse_feature_gates("A=true, B=false").unwrap();
        assert_eq!(g.get("B"), Some(&false));
        assert!(parse_feature_gates("A").is_err());
        assert!(parse_feature_gates("A=maybe").is_err());
        assert!(parse_oom_score_adj("-999").is_ok());
        assert!(parse_oom_score_adj("-1001").is_err());
        assert!(parse_masquerade_bit("32").is_err());
        assert!(parse_non_negative("-1").is_err());
    }

    #[test]
    fn detect_local_modes_need_their_interface() {
        let m = parse_detect_local_mode("BridgeInterface").unwrap();
        assert!(m.with_interfaces("", "").is_err());
        assert_eq!(
            m.with_interfaces("cbr0", ""),
            Ok(DetectLocalMode::BridgeInterface("cbr0".into()))
        );
        assert!(parse_detect_local_mode("InterfaceNamePrefix")
            .unwrap()
            .with_interfaces("", "veth\" -j ACCEPT")
            .is_err());
        assert!(parse_detect_local_mode("Pod").is_err());
    }
}
