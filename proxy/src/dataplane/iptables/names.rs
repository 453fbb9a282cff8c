//! Chain names and rule comments: everything that turns object names into
//! text inside the ruleset goes through here, so nothing else has to think
//! about length limits or injection.

use sha2::{Digest, Sha256};

use crate::model::{Endpoint, Protocol, ServicePortName};

/// Prefix of every chain kproxy owns.
pub const PREFIX: &str = "KPROXY-";

// Fixed chains.
pub const SERVICES: &str = "KPROXY-SERVICES";
pub const NODEPORTS: &str = "KPROXY-NODEPORTS";
pub const POSTROUTING: &str = "KPROXY-POSTROUTING";
pub const MARK_MASQ: &str = "KPROXY-MARK-MASQ";
/// Only used with more than one `--cluster-cidr`: marks traffic from outside
/// all of them (one rule cannot express "not in A and not in B").
pub const MASQ_NONCLUSTER: &str = "KPROXY-MASQ-NONCLUSTER";
pub const EXTERNAL_SERVICES: &str = "KPROXY-EXTERNAL-SERVICES";
pub const FORWARD: &str = "KPROXY-FORWARD";
pub const FIREWALL: &str = "KPROXY-FIREWALL";

/// Per-service-port chain kinds.
pub const SVC: &str = "KPROXY-SVC-";
pub const SVL: &str = "KPROXY-SVL-";
pub const EXT: &str = "KPROXY-EXT-";
pub const FW: &str = "KPROXY-FW-";
pub const SEP: &str = "KPROXY-SEP-";

/// Longest name text we put in a comment. The kernel allows 255 bytes per
/// comment and we add up to ~70 characters of our own; valid Kubernetes
/// names (63 + 63 + 15 + separators) are never cut.
const MAX_COMMENT: usize = 160;

/// 16 characters of base32(sha256(parts)): short enough for the 28-character
/// chain name limit, long enough that collisions do not happen in practice.
fn hash16(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
    }
    let digest = h.finalize();
    base32_prefix(&digest, 16)
}

/// RFC 4648 base32 (upper case, no padding), first `len` characters.
fn base32_prefix(bytes: &[u8], len: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(len);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
            if out.len() == len {
                return out;
            }
        }
    }
    if bits > 0 && out.len() < len {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// The hash shared by a Service port's SVC/SVL/EXT/FW chains.
pub fn port_hash(name: &ServicePortName) -> String {
    hash16(&[&name.to_string(), name.protocol.as_str()])
}

/// `KPROXY-SEP-…` for one endpoint of one Service port.
#[cfg(test)]
pub fn sep_chain(name: &ServicePortName, ep: &Endpoint) -> String {
    sep_chain_for(&name.to_string(), name.protocol, ep)
}

/// [`sep_chain`] with the Service port name already formatted.
pub fn sep_chain_for(port_name: &str, protocol: Protocol, ep: &Endpoint) -> String {
    let mut s = String::with_capacity(27);
    s.push_str(SEP);
    s.push_str(&hash16(&[port_name, protocol.as_str(), &ep.to_string()]));
    s
}

/// Makes arbitrary text safe to put inside a double-quoted rule comment:
/// only `[A-Za-z0-9 ./:_-]` survive, everything else becomes `_`, and the
/// result is bounded in length. A quote, backslash or newline can therefore
/// never end the comment or the line.
pub fn sanitize_comment(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_COMMENT));
    for c in text.chars() {
        if out.len() >= MAX_COMMENT {
            break;
        }
        let keep = c.is_ascii_alphanumeric() || matches!(c, ' ' | '.' | '/' | ':' | '_' | '-');
        out.push(if keep { c } else { '_' });
    }
    out
}

/// An object name as it appears at the start of our comments: sanitised,
/// and without spaces so `status` can split the name from our own words.
pub fn name_label(name: &str) -> String {
    sanitize_comment(name).replace(' ', "_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServiceKey;

    #[test]
    fn base32_matches_rfc4648_vectors() {
        assert_eq!(base32_prefix(b"foobar", 10), "MZXW6YTBOI");
        assert_eq!(base32_prefix(b"f", 1), "M");
    }

    #[test]
    fn chain_names_fit_the_kernel_limit() {
        let name = ServicePortName {
            service: ServiceKey::new("a".repeat(63), "b".repeat(63)),
            port: "c".repeat(15),
            protocol: Protocol::Sctp,
        };
        let h = port_hash(&name);
        assert_eq!(h.len(), 16);
        for prefix in [SVC, SVL, EXT, FW, SEP] {
            assert!(format!("{prefix}{h}").len() <= 28);
        }
        assert!(SERVICES.len() <= 28 && EXTERNAL_SERVICES.len() <= 28);
        assert!(MASQ_NONCLUSTER.len() <= 28);
    }

    #[test]
    fn sanitize_removes_everything_dangerous() {
        let evil = "ns/x\" -j ACCEPT\n-A INPUT -j ACCEPT\\ 'q' $(rm) `x`;#";
        let s = sanitize_comment(evil);
        assert!(!s.contains('"') && !s.contains('\n') && !s.contains('\\'));
        assert!(!s.contains('\'') && !s.contains('$') && !s.contains('`'));
        assert!(!s.contains(';') && !s.contains('#'));
        assert_eq!(sanitize_comment("default/web:http"), "default/web:http");
        assert!(sanitize_comment(&"é".repeat(1000)).len() <= MAX_COMMENT);
    }
}
